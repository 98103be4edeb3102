"""Network gating (DGC-G): variable k per sample and head, the same in every path.

Under ``gating="network"`` a head keeps every channel scoring strictly above
the model-wide threshold T, and at least its top channel (equal scores: the
lower channel). The reference here is written out independently of the
layer: the scores by their formula, the kept set by that rule (a stable sort
for the top channel), and one plain convolution per head over ``x * gate``.
Every inference algorithm, the compiled op, the export graph, ONNX and the
training computation (values and gradients) must agree with it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgc_convert import DGCConv2d
from dgc_convert.measuring.gate_usage import channel_usage
from dgc_convert.nn import compiled
from dgc_convert.nn.modes import dgc_mode
from dgc_convert.nn.sparse import ALGORITHMS

LAYOUTS = pytest.mark.parametrize("interleaved", [False, True], ids=["blocked", "interleaved"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
PREACT = pytest.mark.parametrize("preact", [False, True], ids=["plain", "preact"])

# (in, out, kernel, stride, padding, heads, size, batch)
CASES = [
    (16, 16, 3, 1, 1, 4, 7, 3),  # 3x3 pad 1
    (32, 24, 3, 2, 1, 2, 9, 1),  # 3x3 stride 2, batch 1
    (24, 32, 1, 1, 0, 4, 6, 2),  # 1x1
    (48, 16, 1, 2, 0, 2, 5, 4),  # 1x1 stride 2
]


def _case_id(case: tuple[int, ...]) -> str:
    c_in, c_out, kernel, stride, _, heads, size, batch = case
    return f"c{c_in}-{c_out}k{kernel}s{stride}h{heads}m{size}b{batch}"


CASE_PARAMS = pytest.mark.parametrize("case", CASES, ids=_case_id)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}


def _layer(
    case: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    interleaved: bool = False,
    preact: bool = False,
    gating: str = "network",
    seed: int = 0,
) -> DGCConv2d:
    """A layer with scores that vary by sample, channel and head; a few channels score exactly 0."""
    c_in, c_out, kernel, stride, padding, heads, _, _ = case
    torch.manual_seed(seed)
    layer = DGCConv2d(
        c_in,
        c_out,
        kernel,
        stride,
        padding,
        bias=True,
        heads=heads,
        squeeze_ratio=4,
        zeta=0.5,
        interleaved=interleaved,
        gating=gating,
        preact=preact,
    )
    with torch.no_grad():
        g = layer.saliency_generator
        g.reduce.mul_(3.0)
        g.expand.mul_(3.0)
        g.beta.uniform_(0.5, 1.5)
        g.beta[:, ::7] = -4.0  # these channels score exactly 0
        if layer.norm is not None:
            layer.norm.running_mean.uniform_(-0.5, 0.5)
            layer.norm.running_var.uniform_(0.5, 2.0)
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.norm.bias.uniform_(-0.2, 0.4)
    return layer.to(dtype)


def _input(case: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> Tensor:
    c_in, _, _, _, _, _, size, batch = case
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c_in, size, size + 1, generator=generator).to(dtype)


# -- the independent reference ---------------------------------------------------


def _reference_scores(layer: DGCConv2d, x: Tensor) -> tuple[Tensor, Tensor]:
    """(what the convolution sees, scores (B, heads, C)) by the formulas of docs/method.md."""
    if layer.norm is not None:
        norm = layer.norm
        assert norm.running_mean is not None and norm.running_var is not None
        x = F.batch_norm(
            x,
            norm.running_mean.clone(),
            norm.running_var.clone(),
            norm.weight,
            norm.bias,
            training=norm.training,
            eps=norm.eps,
        ).relu()
    g = layer.saliency_generator
    if layer.unit_scores:
        return x, x.new_ones(x.shape[0], layer.heads, layer.in_channels)
    pooled = x.mean(dim=(2, 3))
    hidden = torch.einsum("bc,hdc->bhd", pooled, g.reduce).relu()
    scores = (torch.einsum("bhd,hcd->bhc", hidden, g.expand) + g.beta).relu()
    return x, scores


def _reference_mask(scores: Tensor, threshold: float | None = None, kept: int | None = None) -> Tensor:
    """Kept channels: strictly above ``threshold`` plus each head's first top channel,
    or (head-wise) the first ``kept`` of a stable descending sort."""
    order = scores.detach().sort(dim=2, descending=True, stable=True).indices
    if threshold is None:
        assert kept is not None
        return torch.zeros_like(scores, dtype=torch.bool).scatter(2, order[..., :kept], True)
    above = scores.detach() > threshold
    return above.scatter(2, order[..., :1], True)


def _reference_conv(layer: DGCConv2d, x: Tensor, gate: Tensor) -> Tensor:
    """One plain convolution per head over ``x * gate[:, head]``, with the head's own filters."""
    heads, per_head = layer.heads, layer.out_channels // layer.heads
    outputs = []
    for h in range(heads):
        rows = slice(h, None, heads) if layer.interleaved else slice(h * per_head, (h + 1) * per_head)
        outputs.append(F.conv2d(x * gate[:, h, :, None, None], layer.weight[rows], None, layer.stride, layer.padding))
    out = torch.stack(outputs, dim=2).flatten(1, 2) if layer.interleaved else torch.cat(outputs, dim=1)
    if layer.bias is not None:
        out = out + layer.bias.view(1, -1, 1, 1)
    return out


def _separated_threshold(*score_sets: Tensor) -> float:
    """A float32 T in the middle of the positive scores, in their widest gap there, so
    that float rounding (the compiled op, onnxruntime) cannot move a score across it."""
    values = torch.cat([s.detach().double().flatten() for s in score_sets]).unique()
    values = values[values > 0]
    low, high = int(0.35 * len(values)), int(0.65 * len(values))
    gaps = values[low + 1 : high + 1] - values[low:high]
    i = low + int(gaps.argmax())
    return float(((values[i] + values[i + 1]) / 2).float())


def _assert_separated(scores: Tensor, threshold: float) -> None:
    """No score within rounding of T, and, where a head keeps only its top channel, no near-tie at the top."""
    scores = scores.detach().double()
    margin = 1e-5 * max(abs(threshold), 1e-3)
    assert bool(((scores - threshold).abs() > margin).all()), "a score sits within rounding of T"
    top2 = scores.topk(2, dim=2).values
    alone = (scores > threshold).sum(dim=2) == 0
    assert not bool((alone & (top2[..., 0] - top2[..., 1] <= 1e-5 * top2[..., 0])).any()), "near-tie at the top"


def _network_gated(case, x, **kw) -> tuple[DGCConv2d, float, Tensor]:
    """A network-gated layer (eval) whose threshold leaves different counts per (sample, head) on ``x``."""
    layer = _layer(case, dtype=x.dtype, **kw).eval()
    with torch.no_grad():
        scores = layer.saliency(x)
    threshold = _separated_threshold(scores)
    _assert_separated(scores, threshold)
    layer.set_threshold(threshold)
    assert layer.thresholded and layer.threshold_value == threshold
    mask = layer.selection_mask(scores)
    counts = mask.sum(dim=2)
    assert counts.unique().numel() > 1, "every head keeps the same count: k does not vary"
    assert bool((counts >= 1).all()) and bool((counts < layer.in_channels).all())
    return layer, threshold, mask


# -- 1. variable k: every path equals the masked computation and the reference ----


@CASE_PARAMS
@DTYPES
@PREACT
@LAYOUTS
def test_variable_k_every_path_agrees(case, dtype, preact, interleaved):
    x = _input(case, dtype)
    layer, threshold, mask = _network_gated(case, x, interleaved=interleaved, preact=preact)
    tol = _tol(dtype)
    pointwise = layer.kernel_size == (1, 1) and layer.padding == (0, 0)
    with torch.no_grad():
        seen, ref_scores = _reference_scores(layer, x)
        torch.testing.assert_close(layer.saliency(x), ref_scores, **tol)
        assert torch.equal(mask, _reference_mask(ref_scores, threshold))
        assert torch.equal(layer.gates(x).mask, mask)
        layer.inference_algorithm = "masked"
        expected = layer(x)
        torch.testing.assert_close(expected, _reference_conv(layer, seen, ref_scores * mask), **tol)

        names = [a for a in ALGORITHMS if a != "masked" and (a != "gather_pointwise" or pointwise)]
        for algorithm in [*names, "export", "auto"]:
            layer.inference_algorithm = algorithm
            with compiled.paused():  # auto: the timed PyTorch algorithms
                out = layer(x)
            torch.testing.assert_close(out, expected, **tol, msg=algorithm)
            if algorithm != "export":
                assert layer.last_algorithm in ALGORITHMS
        if dtype == torch.float32 and compiled.available():
            for algorithm in ("compiled", "auto"):
                layer.inference_algorithm = algorithm
                layer.last_algorithm = None
                out = layer(x)
                assert layer.last_algorithm == "compiled"
                torch.testing.assert_close(out, expected, **tol, msg=algorithm)

        # The training computation; with preact the norm stays in eval mode
        # (in training it would normalise with the batch's statistics).
        layer.train()
        if layer.norm is not None:
            layer.norm.eval()
        torch.testing.assert_close(layer(x), expected, **tol, msg="training computation")
        assert layer.last_gate_record is not None


@CASE_PARAMS
@PREACT
@LAYOUTS
def test_training_gradients_equal_plain_autograd(case, preact, interleaved):
    """float64, train mode (preact: BatchNorm on batch statistics): gradients
    w.r.t. input, weight, bias, saliency and norm parameters equal those of the
    reference, which gates a copy of the input per head and convolves it."""
    layer = _layer(case, dtype=torch.float64, interleaved=interleaved, preact=preact).train()
    x = _input(case, torch.float64).requires_grad_()
    with torch.no_grad():
        threshold = _separated_threshold(_reference_scores(layer, x)[1])
    layer.set_threshold(threshold)
    out = layer(x)
    seen, scores = _reference_scores(layer, x)
    mask = _reference_mask(scores, threshold)
    assert mask.sum(dim=2).unique().numel() > 1
    expected = _reference_conv(layer, seen, scores * mask)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = layer.saliency_generator
    params = [x, layer.weight, layer.bias, g.reduce, g.expand, g.beta]
    if layer.norm is not None:
        params += [layer.norm.weight, layer.norm.bias]
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((out * upstream).sum(), params)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), params)
    names = ["x", "weight", "bias", "reduce", "expand", "beta", "norm.weight", "norm.bias"]
    for name, got, want in zip(names, grads, expected_grads):
        assert got.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


def test_zeta_zero_keeps_every_channel_whatever_the_threshold():
    case = CASES[0]
    x = _input(case, torch.float64)
    layer = _layer(case, dtype=torch.float64).eval()
    layer.set_threshold(10.0)  # above every score
    layer.set_zeta_t(0.0)
    assert not layer.thresholded
    with torch.no_grad():
        seen, scores = _reference_scores(layer, x)
        assert bool(layer.gates(x).mask.all())
        expected = _reference_conv(layer, seen, scores)
        for algorithm in [*ALGORITHMS, "export"]:
            if algorithm == "gather_pointwise":
                continue
            layer.inference_algorithm = algorithm
            torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12, msg=algorithm)
        layer.set_zeta_t(0.5)  # thresholded again: nothing is above T, each head keeps its top channel alone
        assert bool((layer.gates(x).mask.sum(dim=2) == 1).all())


# -- 2. ONNX ----------------------------------------------------------------------


def _randomise_norm(layer: DGCConv2d) -> None:
    assert layer.norm is not None
    with torch.no_grad():
        layer.norm.running_mean.uniform_(-0.5, 0.5)
        layer.norm.running_var.uniform_(0.5, 2.0)
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.2, 0.4)


def _topk_well_separated(layer: DGCConv2d, x: Tensor) -> bool:
    """No score within float rounding of a head's k-th largest (head-wise selection)."""
    with torch.no_grad():
        scores = layer.saliency(x).double()
    top = scores.topk(layer.kept_channels + 1, dim=2).values
    gap = top[..., -2] - top[..., -1]
    return not bool(((gap > 0) & (gap <= 1e-5 * top[..., -2]) & (top[..., -1] > 0)).any())


def test_onnx_keeps_network_gating_and_matches_eager(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (the dynamo exporter)")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    torch.manual_seed(3)
    network = DGCConv2d(16, 32, 3, padding=1, bias=True, heads=4, squeeze_ratio=4, zeta=0.5, gating="network")
    head = DGCConv2d(32, 16, 3, stride=2, padding=1, heads=2, squeeze_ratio=4, zeta=0.5, preact=True)
    with torch.no_grad():
        network.saliency_generator.reduce.mul_(3.0)
        network.saliency_generator.expand.mul_(3.0)
        network.saliency_generator.beta.uniform_(0.5, 1.5)
    _randomise_norm(head)
    model = nn.Sequential(network, nn.ReLU(), head).eval()
    generator = torch.Generator().manual_seed(4)
    inputs = {batch: torch.randn(batch, 16, 8, 8, generator=generator) for batch in (1, 3)}
    with torch.no_grad():
        scores = [network.saliency(x) for x in inputs.values()]
        threshold = _separated_threshold(*scores)
        for s in scores:
            _assert_separated(s, threshold)
        network.set_threshold(threshold)
        assert network.selection_mask(torch.cat(scores)).sum(dim=2).unique().numel() > 1
        for x in inputs.values():
            assert _topk_well_separated(head, torch.relu(network(x)))

    path = tmp_path / "dgc_g.onnx"
    with dgc_mode(model, algorithm="export"):
        torch.onnx.export(
            model,
            (inputs[3],),
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
            external_data=False,
            verbose=False,
        )
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"ArgMax", "Greater", "TopK"} <= ops, ops  # the network gate and the head-wise one are in the graph
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, x in inputs.items():
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad(), dgc_mode(model, algorithm="masked"):
            expected = model(x)
        with torch.no_grad():
            eager = model(x)  # the default path (the compiled op where it runs)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=f"batch {batch}")
        torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5, msg=f"eager batch {batch}")


# -- 3. ties go to the lower channel in every path -----------------------------------


def _tied_layer(gating: str, interleaved: bool, beta: float | Tensor, preact: bool = False) -> DGCConv2d:
    """Scores equal to relu(beta) exactly: the generator's expand is zero."""
    torch.manual_seed(5)
    layer = DGCConv2d(
        16, 8, 3, padding=1, bias=True, heads=2, zeta=0.5, gating=gating, interleaved=interleaved, preact=preact
    )
    with torch.no_grad():
        layer.saliency_generator.expand.zero_()
        layer.saliency_generator.beta.copy_(torch.as_tensor(beta).expand_as(layer.saliency_generator.beta))
    if preact:
        _randomise_norm(layer)
    return layer.eval()


def _all_paths(layer: DGCConv2d, x: Tensor) -> dict[str, Tensor]:
    outputs = {}
    with torch.no_grad():
        for algorithm in ("masked", "gather_conv", "gather_bmm", "stacked", "export", "auto"):
            layer.inference_algorithm = algorithm
            with compiled.paused() if algorithm == "auto" else contextlib.nullcontext():
                outputs[algorithm] = layer(x)
        if compiled.available():
            layer.inference_algorithm = "compiled"
            outputs["compiled"] = layer(x)
        layer.train()
        if layer.norm is not None:
            layer.norm.eval()
        outputs["training"] = layer(x)
        layer.eval()
    return outputs


@LAYOUTS
def test_all_zero_scores_select_the_lowest_channels(interleaved):
    x = torch.randn(3, 16, 6, 6)
    layer = _tied_layer("head", interleaved, beta=-1.0)  # every score relu(-1) = 0
    scores = layer.saliency(x)
    assert not bool(scores.any())
    lowest = torch.arange(8).expand(3, 2, 8)
    assert torch.equal(layer.select(scores).sort(dim=2).values, lowest)
    mask = layer.selection_mask(scores)
    assert bool(mask[..., :8].all()) and not bool(mask[..., 8:].any())
    assert torch.equal(layer.gates(x).mask, mask)
    assert torch.equal(mask, _reference_mask(scores, kept=8))
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(3))
    (usage,) = channel_usage(nn.Sequential(layer), dataset, batch_size=2)  # what `dgc-convert inspect` shows
    assert torch.equal(usage.frequency, mask[0].float())
    # Every path: only the bias is left.
    bias = layer.bias.detach().view(1, -1, 1, 1).expand(3, -1, 6, 6)
    for name, out in _all_paths(layer, x).items():
        torch.testing.assert_close(out, bias, rtol=0, atol=1e-6, msg=name)

    network = _tied_layer("network", interleaved, beta=-1.0)
    network.set_threshold(0.25)
    scores = network.saliency(x)
    # Nothing above T: each head keeps its top channel, the lowest of the equal zeros.
    mask = network.selection_mask(scores)
    assert bool(mask[..., 0].all()) and not bool(mask[..., 1:].any())
    index = network.select(scores)
    assert index.shape[2] == 1 and bool((index == 0).all())
    assert not bool(network.kept_scores(scores, index).any())
    network.set_threshold(-0.5)  # every score (0) is above a negative T
    assert bool(network.selection_mask(scores).all())
    for name, out in _all_paths(network, x).items():
        torch.testing.assert_close(out, bias, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("preact", [False, True], ids=["plain", "preact"])
@LAYOUTS
def test_equal_nonzero_scores_keep_the_lowest_channels(interleaved, preact):
    x = torch.randn(3, 16, 6, 6)
    layer = _tied_layer("head", interleaved, beta=0.7, preact=preact)  # every score 0.7
    with torch.no_grad():
        seen, scores = _reference_scores(layer, x)
    assert bool((scores == 0.7).all())
    assert torch.equal(layer.select(scores).sort(dim=2).values, torch.arange(8).expand(3, 2, 8))
    mask = layer.selection_mask(scores)
    assert torch.equal(mask, _reference_mask(scores, kept=8)) and bool(mask[..., :8].all())
    with torch.no_grad():
        expected = _reference_conv(layer, seen, scores * mask)
    for name, out in _all_paths(layer, x).items():
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=name)


@LAYOUTS
def test_network_gating_drops_ties_at_the_threshold_and_keeps_the_lowest_top(interleaved):
    x = torch.randn(2, 16, 6, 6)
    # Channels score 0.25, 0.5 or 0.75 in turn (exactly: relu(beta), float32-representable).
    beta = torch.tensor([0.25, 0.5, 0.75] * 5 + [0.5])
    layer = _tied_layer("network", interleaved, beta=beta)
    with torch.no_grad():
        seen, scores = _reference_scores(layer, x)
    cases = {
        0.5: beta > 0.5,  # ties at T dropped: only the 0.75s
        0.25: beta > 0.25,  # the 0.5s and 0.75s
        0.75: torch.arange(16) == 2,  # none above: the first 0.75, channel 2
        1.0: torch.arange(16) == 2,
    }
    for threshold, keep in cases.items():
        layer.set_threshold(threshold)
        mask = layer.selection_mask(scores)
        assert torch.equal(mask, keep.expand_as(mask)), threshold
        assert torch.equal(mask, _reference_mask(scores, threshold))
        with torch.no_grad():
            expected = _reference_conv(layer, seen, scores * mask)
        for name, out in _all_paths(layer, x).items():
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"T={threshold} {name}")
    # All scores equal and none above T: channel 0 alone.
    flat = _tied_layer("network", interleaved, beta=0.5)
    flat.set_threshold(0.5)
    with torch.no_grad():
        seen, scores = _reference_scores(flat, x)
        mask = flat.selection_mask(scores)
        assert bool(mask[..., 0].all()) and int(mask.sum()) == 2 * 2
        expected = _reference_conv(flat, seen, scores * mask)
    for name, out in _all_paths(flat, x).items():
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"flat {name}")


def test_float64_scores_near_the_threshold_agree_in_every_path():
    """In float64 two scores within C * 2**-40 may be ordered by channel; the
    sparse algorithms must still convolve exactly the channels the mask keeps."""
    layer = _tied_layer("network", False, beta=0.1).double()
    layer.set_threshold(0.5)
    with torch.no_grad():
        beta = layer.saliency_generator.beta
        beta[:, 0] = beta[:, 1] = 0.5  # at T: dropped
        beta[:, 14] = beta[:, 15] = 0.5 * (1 + 2**-50)  # above T, keys just below channel 1's
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        seen, scores = _reference_scores(layer, x)
        mask = layer.selection_mask(scores)
        assert bool(mask[..., 14:].all())
        index = layer.select(scores)
        kept = torch.zeros_like(mask).scatter(2, index, layer.kept_scores(scores, index) > 0)
        assert torch.equal(kept, mask & (scores > 0))
        expected = _reference_conv(layer, seen, scores * mask)
        for algorithm in ("masked", "gather_conv", "gather_bmm", "stacked", "export"):
            layer.inference_algorithm = algorithm
            torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12, msg=algorithm)


# -- 4. the compiled op with a threshold -------------------------------------------


@pytest.fixture(scope="module")
def op():
    if not compiled.available():
        pytest.skip(f"compiled op unavailable: {compiled.unavailable_reason()}")
    return compiled


def _op_call(op, layer: DGCConv2d, x: Tensor, threshold: float, kept: int | None = None, unit: bool = False):
    g = layer.saliency_generator
    with torch.no_grad():
        out = op.dgc_conv2d(
            x,
            g.reduce.detach(),
            g.expand.detach(),
            g.beta.detach(),
            op.pack_weight(layer.blocked_weight(), layer.heads),
            layer.blocked_bias().detach(),
            layer.in_channels if kept is None else kept,
            layer.stride,
            layer.padding,
            layer.dilation,
            unit,
            threshold,
        )
        return layer.to_output_order(out)  # the op computes blocked; an interleaved layer relabels once


@CASE_PARAMS
@pytest.mark.parametrize("batch", [1, 3])
@LAYOUTS
def test_op_with_threshold_equals_the_reference(op, case, batch, interleaved):
    case = (*case[:-1], batch)
    x = _input(case, torch.float32, seed=batch)
    layer, threshold, _ = _network_gated(case, x, interleaved=interleaved)
    with torch.no_grad():
        seen, scores = _reference_scores(layer, x)
        expected = _reference_conv(layer, seen, scores * _reference_mask(scores, threshold))
    out = _op_call(op, layer, x, threshold)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # With a threshold ``kept`` is unused: a small one must not shrink the kept set (or the scratch space).
    torch.testing.assert_close(_op_call(op, layer, x, threshold, kept=1), expected, rtol=1e-5, atol=1e-5)
    # Channels-last input, same result.
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(_op_call(op, layer, x_cl, threshold), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@LAYOUTS
def test_op_unit_scores_with_threshold(op, batch, interleaved):
    case = (24, 16, 3, 1, 1, 4, 6, batch)
    layer = _layer(case, interleaved=interleaved)
    x = _input(case, torch.float32)
    with torch.no_grad():
        dense = F.conv2d(x, layer.weight, layer.bias, 1, 1)
        first = F.conv2d(x[:, :1], layer.weight[:, :1], layer.bias, 1, 1)
    for threshold in (0.0, 0.999, -2.0):  # 1 > T: every channel
        torch.testing.assert_close(_op_call(op, layer, x, threshold, unit=True), dense, rtol=1e-5, atol=1e-5)
    for threshold in (1.0, 3.0):  # 1 <= T: none above, the top one is channel 0
        torch.testing.assert_close(_op_call(op, layer, x, threshold, unit=True), first, rtol=1e-5, atol=1e-5)
    # The layer agrees (unit scores, thresholded).
    layer.unit_scores = True
    layer.eval()
    layer.set_threshold(1.0)
    with torch.no_grad():
        for algorithm in ("compiled", "masked", "gather_bmm", "export"):
            layer.inference_algorithm = algorithm
            torch.testing.assert_close(layer(x), first, rtol=1e-5, atol=1e-5, msg=algorithm)


@pytest.mark.parametrize("batch", [1, 4])
def test_op_negative_threshold_keeps_every_nonzero_score(op, batch):
    case = (32, 24, 3, 2, 1, 2, 7, batch)
    layer = _layer(case)  # channels 0, 7, 14, ... score 0
    x = _input(case, torch.float32)
    with torch.no_grad():
        seen, scores = _reference_scores(layer, x)
        assert bool((scores == 0).any()) and bool((scores > 0).any())
        expected = _reference_conv(layer, seen, scores)  # every channel, zeros add nothing
    torch.testing.assert_close(_op_call(op, layer, x, -0.5), expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    layer.set_threshold(-0.5)
    layer.inference_algorithm = "compiled"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # All scores 0 and T negative: only the bias.
    with torch.no_grad():
        layer.saliency_generator.beta.fill_(-10.0)
        bias = layer.bias.view(1, -1, 1, 1).expand_as(expected)
        torch.testing.assert_close(_op_call(op, layer, x, -0.5), bias, rtol=0, atol=1e-6)
        torch.testing.assert_close(_op_call(op, layer, x, 0.5), bias, rtol=0, atol=1e-6)


# -- 5. selection_mask, select and kept_scores ----------------------------------------


@pytest.mark.parametrize("channels", [16, 24, 40, 48])
@DTYPES
def test_select_mask_and_kept_scores_are_consistent(channels, dtype):
    layer = DGCConv2d(channels, 8, 1, heads=2, zeta=0.5, gating="network").to(dtype)
    generator = torch.Generator().manual_seed(channels)
    scores = torch.rand(4, 2, channels, generator=generator).to(dtype)
    scores[scores < 0.2] = 0.0  # exact zeros among them
    scores[1, 0] = 0.0  # one head with every score 0
    step = max(1, channels // 16)
    for threshold in (-0.1, 0.0, 0.3, 0.6, 0.9, 2.0):
        layer.set_threshold(threshold)
        mask = layer.selection_mask(scores)
        expected_mask = _reference_mask(scores, threshold)
        assert torch.equal(mask, expected_mask), threshold
        above = (scores > threshold).sum(dim=2)
        assert torch.equal(mask.sum(dim=2), above.clamp_min(1))  # above T, or the forced top channel
        if threshold >= 0:  # above a non-negative T means a nonzero score
            forced = (above == 0).sum()
            assert int(mask.sum()) == int(((scores > 0) & (scores > threshold)).sum() + forced)
        else:
            assert bool(mask.all())
        index = layer.select(scores)
        width = index.shape[2]
        widest = int(mask.sum(dim=2).max())
        assert width == min(channels, -(-widest // step) * step) and (width % step == 0 or width == channels)
        assert bool((index.sort(dim=2).values.diff(dim=2) > 0).all())  # distinct channels per head
        kept = layer.kept_scores(scores, index)
        in_mask = mask.gather(2, index)
        # Every kept channel is in the index; padding columns get score 0.
        assert torch.equal(in_mask.sum(dim=2), mask.sum(dim=2))
        assert bool((kept[~in_mask] == 0).all())
        assert torch.equal(kept[in_mask], scores.gather(2, index)[in_mask])
        torch.testing.assert_close(kept.sum(dim=2), (scores * mask).sum(dim=2), **_tol(dtype))
