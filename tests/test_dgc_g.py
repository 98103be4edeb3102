"""DGC-G: the network-wise threshold is learned to the target MAC fraction, and ranks agree on it."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dgc_convert.conversion.surgery import set_zeta, sparsity_loss
from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.nn.modes import find_dgc_layers
from dgc_convert.nn.network_gate import (
    THRESHOLD_MOMENTUM,
    batch_threshold,
    network_gated,
    update_threshold,
)


def test_batch_threshold_keeps_the_target_share_of_macs():
    # Layer a: entries cost 1 MAC; layer b: entries cost 3 MACs.
    a = torch.tensor([0.9, 0.1, 0.5, 0.3])
    b = torch.tensor([0.8, 0.2])
    # Sorted: 0.9(a,1) 0.8(b,3) 0.5(a,1) 0.3(a,1) 0.2(b,3) 0.1(a,1); total 10 MACs.
    # Keeping half of every layer's MACs wants 5: 0.9 + 0.8 + 0.5 reach 5.
    threshold = batch_threshold([(a, 1, 0.5), (b, 3, 0.5)])
    assert threshold == pytest.approx((0.5 + 0.3) / 2)
    # Nothing to drop: no threshold.
    assert batch_threshold([(a, 1, 1.0)]) is None
    # Equal scores at the cut are dropped together (strictly above T is kept).
    tied = torch.tensor([1.0, 0.5, 0.5, 0.5])
    assert batch_threshold([(tied, 1, 0.5)]) == pytest.approx(0.5)


def _network(zeta=0.5, **kw):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        DGCConv2d(16, 32, 3, padding=1, stride=2, zeta=zeta, gating="network", **kw),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        DGCConv2d(32, 32, 3, padding=1, zeta=zeta, gating="network", **kw),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        DGCConv2d(32, 64, 1, zeta=zeta, gating="network", **kw),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 4),
    )


def _synthetic(count, generator):
    labels = torch.randint(0, 4, (count,), generator=generator)
    images = torch.randn(count, 3, 12, 12, generator=generator) * 0.5
    # Each class lights up its own quadrant: learnable, and inputs differ per sample.
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * 6 : row * 6 + 6, col * 6 : col * 6 + 6] += 1.0
    return images, labels


def kept_mac_fraction(layer_scores):
    """Fraction of the DGC convolutions' MACs kept: each kept (sample, head, channel)
    entry weighted by the MACs it costs."""
    kept = total = 0.0
    for layer, scores, pixels in layer_scores:
        cost = layer.kept_channel_macs(pixels, 1)
        kept += float(layer.selection_mask(scores).sum()) * cost
        total += scores.numel() * cost
    return kept / total


def _eval_fraction(model, images):
    layers = find_dgc_layers(model)
    seen = []
    hooks = [
        layer.register_forward_hook(
            lambda m, args, out: seen.append((m, m.saliency(args[0]), out.shape[2] * out.shape[3]))
        )
        for layer in layers
    ]
    model.eval()
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return kept_mac_fraction(seen)


def test_threshold_reaches_the_target_mac_fraction_on_held_out_data():
    model = _network(zeta=0.5)
    generator = torch.Generator().manual_seed(1)
    train_x, train_y = _synthetic(512, generator)
    held_x, _ = _synthetic(256, generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps, batch = 240, 32
    layers = network_gated(model)
    thresholds = []
    for step in range(steps):
        model.train()
        # The three stages in miniature: warm-up, ramp to zeta, hold.
        progress = step / steps
        fraction = 0.0 if progress < 1 / 12 else min(1.0, (progress - 1 / 12) / (3 / 4 - 1 / 12))
        set_zeta(layers, fraction=fraction)
        index = torch.randint(0, train_x.shape[0], (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index]) + 1e-4 * sparsity_loss(layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        thresholds.append(update_threshold(model))
    assert thresholds[0] is None  # warm-up: every channel kept, T not moved
    assert all(layer.threshold_value == layers[0].threshold_value for layer in layers)
    assert layers[0].threshold_value > 0
    fraction = _eval_fraction(model, held_x)
    assert fraction == pytest.approx(0.5, rel=0.02)
    # Heads really keep different numbers of channels.
    counts = layers[0].selection_mask(layers[0].saliency(_hidden(model, held_x[:16]))).sum(dim=2)
    assert counts.unique().numel() > 1


def _hidden(model, images):
    with torch.no_grad():
        return model[:3](images)


def test_update_threshold_needs_a_training_forward_and_ignores_head_wise_models():
    head_wise = nn.Sequential(DGCConv2d(8, 8, 1))
    assert update_threshold(head_wise) is None
    model = nn.Sequential(DGCConv2d(8, 8, 1, gating="network"))
    with pytest.raises(RuntimeError, match="training-mode forward"):
        update_threshold(model)
    model.train()(torch.randn(2, 8, 3, 3))
    # One step moves T by the momentum towards the batch threshold.
    layer = model[0]
    scores, pixels = layer.last_gate_record
    target = batch_threshold([(scores, pixels * 2, 0.5)])
    assert update_threshold(model) == pytest.approx(THRESHOLD_MOMENTUM * target, rel=1e-6)
    with pytest.raises(ValueError, match="momentum"):
        update_threshold(model, momentum=0.0)


def test_non_finite_scores_leave_the_threshold_alone():
    model = nn.Sequential(DGCConv2d(8, 8, 1, gating="network")).train()
    model[0].set_threshold(0.25)
    model(torch.full((2, 8, 3, 3), float("nan")))
    assert update_threshold(model) is None
    assert model[0].threshold_value == 0.25


def test_the_threshold_compares_in_float32_at_least_and_loads_rounded():
    layer = DGCConv2d(8, 8, 1, gating="network")
    layer.set_threshold(0.3)
    assert layer.threshold_value == float(torch.tensor(0.3, dtype=torch.float32))
    # A bf16 score just above T (float32) stays above: T is not rounded to bf16 (0.30078125).
    scores = torch.full((1, 4, 8), 0.30078125, dtype=torch.bfloat16)
    assert layer.selection_mask(scores).all()
    state = layer.state_dict()
    state["threshold"] = torch.tensor(0.1, dtype=torch.float64)
    loaded = DGCConv2d(8, 8, 1, gating="network")
    loaded.load_state_dict(state)
    assert loaded.threshold_value == float(torch.tensor(0.1, dtype=torch.float32))
    state["threshold"] = torch.tensor(float("nan"), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="threshold is NaN"):
        loaded.load_state_dict(state)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights on every rank
        model = nn.Sequential(DGCConv2d(16, 16, 3, padding=1, zeta=0.5, gating="network")).train()
        torch.manual_seed(100 + rank)  # different data on every rank
        local = []
        for _ in range(3):
            model(torch.randn(4, 16, 6, 6))
            scores, pixels = model[0].last_gate_record
            local.append(batch_threshold([(scores, 9 * 4 * pixels, 0.5)]))
            update_threshold(model)
        queue.put((rank, model[0].threshold_value, local))
    finally:
        dist.destroy_process_group()


def test_ranks_hold_the_same_threshold():
    world, port = 2, _free_port()
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_rank, args=(r, world, port, queue)) for r in range(world)]
    for p in processes:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    (_, t0, local0), (_, t1, local1) = results
    assert t0 == t1
    assert local0 != local1  # the ranks saw different batches
    # T is the moving average of the ranks' mean batch threshold.
    expected = 0.0
    for a, b in zip(local0, local1):
        expected += THRESHOLD_MOMENTUM * ((a + b) / 2 - expected)
    assert t0 == pytest.approx(expected, rel=1e-5)
