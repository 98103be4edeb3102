"""DGCConv2d against the method (docs/method.md) and an independent loop."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dgc_convert import DGCConv2d, kept_channel_count
from dgc_convert.nn.channel_order import (
    interleave_head_major,
    interleaved_blocked_rows,
    interleaved_output_order,
    to_output_order,
)
from dgc_convert.nn.functional import gated_conv2d, head_weights

LAYOUTS = pytest.mark.parametrize("interleaved", [False, True], ids=["blocked", "interleaved"])


def owned_rows(out_channels: int, heads: int, head: int, interleaved: bool) -> slice:
    """The output channels (rows of the dense weight) ``head`` owns, written out independently of the code:
    the contiguous block ``head*n : (head+1)*n`` (blocked) or ``head::heads`` (interleaved)."""
    per_head = out_channels // heads
    return slice(head, None, heads) if interleaved else slice(head * per_head, (head + 1) * per_head)


def reference_forward(layer: DGCConv2d, x: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample, per head: index_select the kept channels, scale them,
    conv2d with the head's filters. Blocked: head ``i``'s filters are
    ``weight[i*n:(i+1)*n]`` and the heads' outputs are concatenated.
    Interleaved: its filters are ``weight[i::heads]``, placed at output
    channels ``i::heads``."""
    if scores is None:
        scores = layer.saliency(x)
    k = kept_channel_count(layer.in_channels, float(layer.zeta_t))
    per_head = layer.out_channels // layer.heads
    rows = []
    for b in range(x.shape[0]):
        out_b = [None] * layer.out_channels
        heads_out = []
        for i in range(layer.heads):
            # The k largest; equal scores go to the lower channel (stable sort).
            keep = scores[b, i].detach().sort(descending=True, stable=True).indices[:k]
            y = x[b].index_select(0, keep) * scores[b, i].index_select(0, keep)[:, None, None]
            if layer.interleaved:
                filters = layer.weight[i :: layer.heads]
            else:
                filters = layer.weight[i * per_head : (i + 1) * per_head]
            o = F.conv2d(y[None], filters.index_select(1, keep), None, layer.stride, layer.padding, layer.dilation)[0]
            heads_out.append(o)
            for j in range(o.shape[0]):
                out_b[j * layer.heads + i] = o[j]
        rows.append(torch.stack(out_b) if layer.interleaved else torch.cat(heads_out))
    out = torch.stack(rows)
    if layer.bias is not None:
        out = out + layer.bias.view(1, -1, 1, 1)
    return out


def make_layer(c_in=8, c_out=8, kernel=3, heads=4, zeta=0.5, dtype=torch.float64, interleaved=False, **conv_kwargs):
    conv = nn.Conv2d(c_in, c_out, kernel, **conv_kwargs).to(dtype)
    return DGCConv2d.from_conv(conv, heads=heads, squeeze_ratio=2, zeta=zeta, interleaved=interleaved)


# -- identity -----------------------------------------------------------------

IDENTITY_CASES = [
    dict(kernel_size=1),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=5, padding=2),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding=2),
    dict(kernel_size=5, stride=2, dilation=2),
    dict(kernel_size=(3, 1), padding=(1, 0)),
]


@pytest.mark.parametrize("geometry", IDENTITY_CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("size", [(9, 13), (16, 16), (3, 4)])
@LAYOUTS
def test_identity_with_unit_scores_and_no_pruning(geometry, bias, size, interleaved):
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 8, bias=bias, **geometry).double()
    layer = DGCConv2d.from_conv(conv, heads=4, zeta=0.5, interleaved=interleaved)
    layer.set_zeta_t(0.0)
    layer.unit_scores = True
    x = torch.randn(3, 12, *size, dtype=torch.float64)
    reach = [d * (k - 1) + 1 - 2 * p for k, d, p in zip(conv.kernel_size, conv.dilation, conv.padding)]
    if any(r > s for r, s in zip(reach, size)):
        pytest.skip("kernel reaches beyond the padded input")
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-10)


def test_from_conv_copies_rather_than_shares():
    conv = nn.Conv2d(8, 8, 3, bias=True)
    layer = DGCConv2d.from_conv(conv)
    with torch.no_grad():
        layer.weight.zero_()
    assert conv.weight.abs().sum() > 0
    assert layer.bias is not None and torch.equal(layer.bias, conv.bias)


# -- reference loop -------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("zeta", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("size", [(5, 6), (12, 12)])  # small maps run head by head, larger per sample
@LAYOUTS
def test_forward_matches_reference_loop(heads, zeta, size, interleaved):
    torch.manual_seed(heads)
    layer = make_layer(c_in=10, c_out=8, heads=heads, zeta=zeta, padding=1, bias=True, interleaved=interleaved)
    x = torch.randn(3, 10, *size, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("algorithm", ["per_head", "per_sample", "stacked"])
def test_every_algorithm_agrees_with_plain_autograd(algorithm):
    torch.manual_seed(1)
    x = torch.randn(4, 6, 7, 9, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(4, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    args = ((2, 1), (1, 2), (1, 2))
    out = gated_conv2d(x, gate, weight, *args, algorithm=algorithm)
    grads = torch.autograd.grad(out.square().sum(), (x, gate, weight))
    # Plain autograd through one explicit masked copy per head is the baseline.
    copies = [F.conv2d(x * gate[:, h, :, None, None], weight[3 * h : 3 * h + 3], None, *args) for h in range(3)]
    expected = torch.cat(copies, 1)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, gate, weight))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["per_head", "per_sample", "stacked"])
def test_channels_last_input_trains(algorithm):
    torch.manual_seed(2)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    gate = torch.rand(2, 3, 6, dtype=torch.float64)
    weight = torch.randn(9, 6, 3, 3, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, gate, weight)]
    plain = [t.contiguous().clone().requires_grad_() for t in (x, gate, weight)]
    out = gated_conv2d(*inputs, padding=(1, 1), algorithm=algorithm)
    want = gated_conv2d(*plain, padding=(1, 1), algorithm="per_head")
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    grad_out = torch.randn_like(want).contiguous(memory_format=torch.channels_last)
    for got, expected in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(want, plain, grad_out)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_blocked_head_weights_are_a_view_and_the_mappings_invert():
    weight = torch.randn(12, 5, 3, 3)
    blocked = head_weights(weight, 4)
    assert blocked.shape == (4, 3, 5, 3, 3) and blocked.data_ptr() == weight.data_ptr() and blocked._base is weight
    assert torch.equal(blocked[2], weight[6:9])
    # The interleaved layout: head h owns the dense rows h::H; in blocked order they are rows h*n + j.
    rows, order = interleaved_blocked_rows(12, 4), interleaved_output_order(12, 4)
    assert torch.equal(weight[rows][6:9], weight[2::4])  # head 2's filters, blocked
    assert torch.equal(rows[order], torch.arange(12)) and torch.equal(order[rows], torch.arange(12))  # inverses
    assert torch.equal(interleave_head_major(weight[rows].view(4, 3, 5, 3, 3)), weight)
    out = torch.arange(2 * 12 * 2 * 2.0).view(2, 12, 2, 2)  # head-major: channel h*3 + j is head h's j-th
    shuffled = to_output_order(out, order)
    assert torch.equal(shuffled[:, 1 * 4 + 2], out[:, 2 * 3 + 1])  # dense channel j*H + h
    last = to_output_order(out.contiguous(memory_format=torch.channels_last), order)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, shuffled)


@pytest.mark.parametrize("algorithm", ["eval", "per_head", "per_sample", "stacked"])
def test_the_layouts_are_a_relabelling_of_output_channels(algorithm, monkeypatch):
    """An interleaved layer equals the blocked layer whose filters are the same
    heads' filters in blocked order, with the outputs relabelled alike."""
    torch.manual_seed(4)
    interleaved = make_layer(c_in=10, c_out=12, heads=4, zeta=0.5, padding=1, bias=True, interleaved=True)
    blocked = make_layer(c_in=10, c_out=12, heads=4, zeta=0.5, padding=1, bias=True)
    # blocked row h*n + j holds the interleaved row j*H + h (n = 3, H = 4)
    order = torch.arange(12).view(3, 4).t().flatten()
    state = interleaved.state_dict()
    state["weight"], state["bias"] = state["weight"][order], state["bias"][order]
    blocked.load_state_dict(state)
    x = torch.randn(3, 10, 6, 6, dtype=torch.float64)
    if algorithm == "eval":
        interleaved.eval(), blocked.eval()
        with torch.no_grad():
            for name in ("masked", "gather_conv", "gather_bmm", "stacked", "export"):
                interleaved.inference_algorithm = blocked.inference_algorithm = name
                torch.testing.assert_close(blocked(x), interleaved(x)[:, order], rtol=0, atol=0, msg=name)
        return
    # Training: the same outputs and gradients, relabelled, whichever training algorithm runs.
    import dgc_convert.nn.layer as layer_module

    def forced(*args):
        return gated_conv2d(*args, algorithm=algorithm)

    monkeypatch.setattr(layer_module, "gated_conv2d", forced)
    got, want = blocked(x), interleaved(x)
    torch.testing.assert_close(got, want[:, order], rtol=0, atol=0)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(blocked.weight.grad, interleaved.weight.grad[order], rtol=0, atol=1e-12)
    torch.testing.assert_close(blocked.bias.grad, interleaved.bias.grad[order], rtol=0, atol=1e-12)


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="algorithm"):
        gated_conv2d(torch.ones(1, 2, 3, 3), torch.ones(1, 1, 2), torch.ones(2, 2, 1, 1), algorithm="fast")


# -- exactly k ------------------------------------------------------------------


@pytest.mark.parametrize("zeta", [0.0, 0.3, 0.5, 0.75, 0.99])
def test_exactly_k_channels_per_head_and_sample(zeta):
    torch.manual_seed(0)
    layer = make_layer(c_in=16, c_out=8, heads=4, zeta=zeta)
    x = torch.randn(5, 16, 6, 6, dtype=torch.float64)
    mask = layer.gates(x).mask
    expected = max(1, 16 - round(zeta * 16))
    assert layer.kept_channels == expected
    assert (mask.sum(dim=2) == expected).all()


def test_ties_do_not_change_k():
    layer = make_layer(c_in=16, c_out=8, heads=4, zeta=0.5)
    scores = torch.ones(3, 4, 16, dtype=torch.float64)
    scores[0, 0, :12] = 0.0  # zeros tie too
    assert (layer.selection_mask(scores).sum(dim=2) == 8).all()
    layer.unit_scores = True
    assert (layer.gates(torch.randn(3, 16, 5, 5, dtype=torch.float64)).mask.sum(dim=2) == 8).all()


def test_kept_channel_count_rounds_and_keeps_one():
    assert kept_channel_count(64, 0.5) == 32
    assert kept_channel_count(20, 0.55) == 9
    assert kept_channel_count(3, 0.9) == 1
    assert kept_channel_count(10, 0.0) == 10


# -- gradients --------------------------------------------------------------------


@pytest.mark.parametrize("size", [(5, 5), (16, 16)])
@LAYOUTS
def test_weight_gradient_is_zero_on_channels_a_head_dropped(size, interleaved):
    torch.manual_seed(3)
    layer = make_layer(c_in=12, c_out=8, heads=4, zeta=0.5, padding=1, interleaved=interleaved)
    x = torch.randn(1, 12, *size, dtype=torch.float64)
    mask = layer.gates(x).mask[0]  # (heads, C)
    layer(x).square().sum().backward()
    grad = layer.weight.grad
    for i in range(layer.heads):
        head_grad = grad[owned_rows(layer.out_channels, layer.heads, i, interleaved)]  # (C'/H, C, k, k)
        dropped = ~mask[i]
        assert head_grad[:, dropped].abs().max() == 0
        assert head_grad[:, mask[i]].abs().sum() > 0


def test_saliency_parameters_learn_from_task_loss_and_sparsity_term():
    torch.manual_seed(0)
    layer = make_layer(c_in=12, c_out=8, heads=4, zeta=0.5, padding=1)
    x = torch.randn(2, 12, 6, 6, dtype=torch.float64)
    params = list(layer.saliency_generator.parameters())

    task = layer(x).square().mean()
    task_grads = torch.autograd.grad(task, params)
    assert all(g.abs().sum() > 0 for g in task_grads)

    layer(x)
    sparsity = layer.sparsity_loss
    expected = sum(layer.saliency(x)[:, i].mean() for i in range(layer.heads))
    torch.testing.assert_close(sparsity, expected)
    sparsity_grads = torch.autograd.grad(sparsity, params)
    assert all(g.abs().sum() > 0 for g in sparsity_grads)


@settings(max_examples=25, deadline=None)
@given(
    c_in=st.integers(1, 9),
    per_head=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 3, 4]),
    zeta=st.floats(0.0, 0.95),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.sampled_from([1, 2]),
    dilation=st.sampled_from([1, 2]),
    height=st.integers(4, 12),
    width=st.integers(4, 12),
    batch=st.integers(1, 3),
    bias=st.booleans(),
    interleaved=st.booleans(),
)
def test_gradients_match_reference_loop(
    c_in, per_head, heads, zeta, kernel, stride, dilation, height, width, batch, bias, interleaved
):
    torch.manual_seed(0)
    padding = dilation * (kernel // 2)
    layer = make_layer(
        c_in=c_in,
        c_out=heads * per_head,
        kernel=kernel,
        heads=heads,
        zeta=zeta,
        stride=stride,
        dilation=dilation,
        padding=padding,
        bias=bias,
        interleaved=interleaved,
    )
    x = torch.randn(batch, c_in, height, width, dtype=torch.float64, requires_grad=True)
    target = torch.randn_like(layer(x))
    params = [x] + [p for p in layer.parameters()]

    got = torch.autograd.grad((layer(x) * target).sum(), params)
    want = torch.autograd.grad((reference_forward(layer, x) * target).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


# -- state, dtypes, validation ---------------------------------------------------


def test_zeta_t_round_trips_through_state_dict():
    layer = make_layer(c_in=16, c_out=8, zeta=0.75)
    layer.set_zeta_t(0.3125)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_layer(c_in=16, c_out=8, zeta=0.75)
    assert float(fresh.zeta_t) == 0.75
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert float(fresh.zeta_t) == 0.3125
    assert fresh.kept_channels == 16 - 5
    assert "zeta_t" in layer.state_dict()


def test_zeta_t_survives_dtype_casts_exactly():
    layer = make_layer(c_in=256, c_out=8, zeta=0.55, dtype=torch.float32)
    k = layer.kept_channels
    layer.to(torch.bfloat16)
    assert layer.zeta_t.dtype == torch.float64 and float(layer.zeta_t) == 0.55
    assert layer.kept_channels == k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_run_forward_and_backward_on_cpu(dtype):
    torch.manual_seed(0)
    layer = make_layer(c_in=16, c_out=8, heads=4, zeta=0.5, padding=1, dtype=dtype)
    for size in (5, 16):
        x = torch.randn(2, 16, size, size, dtype=dtype, requires_grad=True)
        out = layer(x)
        assert out.dtype == dtype and out.shape == (2, 8, size - 2 + 2, size)
        out.float().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad.float()).all()
        want = reference_forward(layer, x)
        tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(out.float(), want.float(), rtol=tolerance, atol=tolerance)


def test_autocast_bfloat16_trains():
    torch.manual_seed(0)
    layer = make_layer(c_in=16, c_out=8, padding=1, dtype=torch.float32)
    x = torch.randn(2, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(heads=3), "heads=3"),
        (dict(heads=0), "heads"),
        (dict(zeta=1.0), "zeta"),
        (dict(zeta=-0.1), "zeta"),
        (dict(zeta=float("nan")), "zeta"),
        (dict(squeeze_ratio=0.5), "squeeze_ratio"),
    ],
)
def test_invalid_arguments_name_the_argument_and_value(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        DGCConv2d(8, 8, 3, **kwargs)


def test_set_zeta_t_validates():
    layer = DGCConv2d(8, 8, 3)
    with pytest.raises(ValueError, match="zeta_t"):
        layer.set_zeta_t(1.0)


@pytest.mark.parametrize(
    "conv, culprit",
    [
        (nn.Conv2d(8, 8, 3, groups=2), "groups"),
        (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), "padding_mode"),
        (nn.Conv2d(8, 8, 4, padding="same"), "padding"),
    ],
)
def test_from_conv_refuses_unsupported_convs(conv, culprit):
    with pytest.raises(ValueError, match=culprit):
        DGCConv2d.from_conv(conv)


def test_string_padding_becomes_numeric_when_exact():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    for conv in (nn.Conv2d(8, 8, 3, padding="same"), nn.Conv2d(8, 8, 3, padding="valid", dilation=2)):
        conv = conv.double()
        layer = DGCConv2d.from_conv(conv, zeta=0.0)
        layer.unit_scores = True
        torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-10)


def test_hidden_width_and_repr():
    layer = DGCConv2d(64, 32, 3, heads=4, squeeze_ratio=16)
    assert layer.saliency_generator.hidden == 4
    assert DGCConv2d(256, 32, 3, squeeze_ratio=16).saliency_generator.hidden == 16
    assert "heads=4" in repr(layer) and "zeta_t=0.5" in repr(layer)
    assert layer.sparsity_loss is None
    assert layer.interleaved is False and "interleaved" not in repr(layer)
    assert DGCConv2d.from_conv(nn.Conv2d(8, 8, 3)).interleaved is False
    old = DGCConv2d(64, 32, 3, interleaved=True)
    assert old.interleaved is True and "zeta_t=0.5, interleaved=True" in repr(old)


@pytest.mark.parametrize("gating", ["head", "network"])
def test_preact_conversion_equals_a_hand_built_bn_relu_dgc_chain(gating):
    """``preact`` is exactly BatchNorm2d -> ReLU -> the same DGC layer without it,
    in training (batch statistics, running-stat updates, gradients) and in eval."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=True).double()
    # What conversion builds (surgery's apply_conversion calls from_conv).
    layer = DGCConv2d.from_conv(conv, heads=4, zeta=0.5, preact=True, gating=gating)
    model = nn.Sequential(layer)
    if gating == "network":
        layer.set_threshold(0.95)
    plain = DGCConv2d(16, 32, 3, padding=1, stride=2, bias=True, heads=4, zeta=0.5, gating=gating).double()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("norm.")})
    norm = nn.BatchNorm2d(16).double()
    norm.load_state_dict(layer.norm.state_dict())
    chain = nn.Sequential(norm, nn.ReLU(), plain)
    x = torch.randn(4, 16, 9, 9, dtype=torch.float64) - 0.3
    for mode in ("train", "eval"):
        model.train(mode == "train")
        chain.train(mode == "train")
        a_in, b_in = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = model(a_in), chain(b_in)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        if mode == "train":
            (a * torch.arange(a.numel(), dtype=a.dtype).view_as(a).sin()).sum().backward()
            (b * torch.arange(b.numel(), dtype=b.dtype).view_as(b).sin()).sum().backward()
            torch.testing.assert_close(a_in.grad, b_in.grad, rtol=0, atol=1e-12)
            torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=0, atol=1e-12)
            torch.testing.assert_close(layer.norm.weight.grad, norm.weight.grad, rtol=0, atol=1e-12)
            torch.testing.assert_close(layer.norm.running_mean, norm.running_mean, rtol=0, atol=1e-15)


@pytest.mark.parametrize("training", [True, False])
def test_shapes_batch_0_and_unbatched_input_behave_like_nn_conv2d(training):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, padding=1, stride=2)
    layer = DGCConv2d.from_conv(conv, heads=4, zeta=0.5).train(training)
    conv.train(training)
    for shape in [(0, 32, 9, 9), (32, 9, 9), (3, 32, 9, 9)]:
        x = torch.randn(*shape)
        assert layer(x).shape == conv(x).shape, shape
    single = torch.randn(32, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(single), layer(single.unsqueeze(0)).squeeze(0))
    for bad in [torch.randn(1, 16, 9, 9), torch.randn(16, 9, 9)]:
        with pytest.raises(RuntimeError) as dense_error:
            conv(bad)
        with pytest.raises(RuntimeError) as dgc_error:
            layer(bad)
        assert str(dgc_error.value) == str(dense_error.value)  # "... to have 32 channels, but got 16 channels instead"


def test_a_model_deep_copies_after_a_forward_with_gradients():
    # EMA and "keep the best model" patterns copy the model mid-training.
    model = nn.Sequential(DGCConv2d(16, 32, 3, padding=1, heads=4), nn.ReLU(), DGCConv2d(32, 32, 1, heads=4))
    out = model(torch.randn(2, 16, 8, 8))
    twin = copy.deepcopy(model)
    assert all(layer.sparsity_loss is None for layer in twin if isinstance(layer, DGCConv2d))
    assert (
        model[0].sparsity_loss is not None and model[0].sparsity_loss.grad_fn is not None
    )  # the original keeps its own
    out.sum().backward()
    x = torch.randn(2, 16, 8, 8)
    model.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))


def test_inference_algorithm_is_checked_when_set():
    layer = DGCConv2d(16, 32, 1)
    with pytest.raises(ValueError, match="got None"):
        layer.inference_algorithm = None
    assert layer.inference_algorithm == "auto"


def test_a_converted_resnet18_traces_with_torch_fx_and_torch_jit():
    """torch.fx: each DGC layer is one call_module node (a leaf); torch.jit.trace: the graph
    form (no timing, no caches), so the trace checks out and takes other batch sizes."""
    import warnings

    from dgc_convert import convert, create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10)
    convert(model, input_size=32)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    dgc_calls = [
        n for n in traced.graph.nodes if n.op == "call_module" and isinstance(traced.get_submodule(n.target), DGCConv2d)
    ]
    assert len(dgc_calls) == 19
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated in favour of torch.export
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        scripted = torch.jit.trace(model, x)  # check_trace: a second trace must give the same graph
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
        other = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(scripted(other), model(other), rtol=1e-5, atol=1e-5)


def test_torch_compile_trains_and_serves_a_converted_model():
    """Beside fx and jit: torch.compile keeps a converted model's train step (gradients
    included) and its eval forward equal to eager."""
    from dgc_convert import convert, dgc_layers

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1, bias=False),
    )
    convert(model, heads=2, zeta=0.5, input_size=16)
    assert len(dgc_layers(model)) == 2  # not the stem
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    compiled(x).square().mean().backward()
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).square().mean().backward()
    assert compiled_grads and compiled_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-3, atol=1e-5, msg=name)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
