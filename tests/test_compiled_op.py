"""The compiled DGC op (dgc_convert::dgc_conv2d) equals the training computation.

The reference is the layer in eval mode with ``inference_algorithm = "masked"``
(the training computation) on the same input. The op's selection is compared
through outputs only: zero-score channels may be chosen differently, which
multiplies them by 0 either way.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dgc_convert import DGCConv2d
from dgc_convert.nn import compiled
from dgc_convert.nn.channel_order import interleaved_blocked_rows, interleaved_output_order, to_output_order

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def op():
    if not compiled.available():
        pytest.skip(f"compiled op unavailable: {compiled.unavailable_reason()}")
    return compiled


def _layer(c_in, c_out, kernel, stride, padding, dilation, heads, zeta, bias=True):
    layer = DGCConv2d(c_in, c_out, kernel, stride, padding, dilation, bias=bias, heads=heads, zeta=zeta).eval()
    layer.inference_algorithm = "masked"
    return layer


def _well_separated(layer, x):
    """True when no score sits within float rounding of the k-th largest
    (where two float32 computations of the scores could select differently)."""
    if layer.unit_scores or layer.kept_channels >= layer.in_channels:
        return True
    with torch.no_grad():
        scores = layer.saliency(x).double()
    top = scores.topk(layer.kept_channels + 1, dim=2).values
    kth, next_ = top[..., -2], top[..., -1]
    gap = kth - next_  # exact ties (e.g. every score equal to beta) are broken by channel in both
    close = (gap > 0) & (gap <= 1e-5 * kth.abs().clamp_min(1e-3))
    return not bool((close & (next_ > 0)).any())


def _input(layer, batch, size, channels_last, seed):
    for attempt in range(20):
        torch.manual_seed(seed * 100 + attempt)
        x = torch.randn(batch, layer.in_channels, size, size + 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if _well_separated(layer, x):
            return x
    raise AssertionError("no input with well-separated scores")


def _interleaved(layer):
    """The layer's head layout (layers without the attribute are interleaved)."""
    return bool(getattr(layer, "interleaved", True))


def _relabel(weight_or_bias, heads, *, to_interleaved):
    """Rows (output channels) moved between the layouts: blocked row h*n + j
    is interleaved row j*H + h."""
    rows = weight_or_bias.shape[0]
    n = rows // heads
    if to_interleaved:
        view = weight_or_bias.reshape(heads, n, *weight_or_bias.shape[1:])
    else:
        view = weight_or_bias.reshape(n, heads, *weight_or_bias.shape[1:])
    return view.transpose(0, 1).reshape(weight_or_bias.shape)


def _relabel_output(out, heads, *, to_interleaved):
    return _relabel(out.transpose(0, 1), heads, to_interleaved=to_interleaved).transpose(0, 1)


def _in_layout(layer, tensor, interleaved, output=False):
    """``tensor`` (weight, bias or output in the layer's layout) in the layout ``interleaved``."""
    if tensor is None or interleaved == _interleaved(layer):
        return tensor
    relabel = _relabel_output if output else _relabel
    return relabel(tensor.detach(), layer.heads, to_interleaved=interleaved)


# (in, out, kernel, stride, padding, dilation, heads, zeta, size)
CASES = [
    (16, 8, 3, 1, 1, 1, 1, 0.5, 9),  # 8 outputs per head: one partial vector
    (32, 64, 1, 1, 0, 1, 4, 0.75, 8),  # 16 per head
    (24, 96, 3, 2, 1, 1, 2, 0.3, 7),  # 48 per head, stride 2
    (40, 80, 5, 1, 2, 1, 2, 0.9, 8),  # 40 per head: tail block, 5x5 same
    (16, 56, 7, 2, 3, 1, 7, 0.5, 11),  # 7x7 stride 2, heads 7, 8 per head
    (20, 64, 3, 1, 2, 2, 8, 0.6, 10),  # dilation 2
    (18, 24, 3, 1, 0, 1, 3, 0.0, 6),  # no padding, zeta 0
    (64, 512, 1, 2, 0, 1, 1, 0.5, 5),  # 512 per head: many column blocks, 1x1 stride 2
    (48, 200, 3, 1, 1, 1, 1, 0.75, 5),  # 200 per head
    (12, 36, 5, 2, 0, 1, 6, 0.25, 9),  # 5x5 stride 2, no padding
]


def _ids(case):
    c_in, c_out, k, s, p, d, h, z, _ = case
    return f"{c_in}-{c_out}k{k}s{s}p{p}d{d}h{h}z{z}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_op_equals_the_training_computation(op, case, batch):
    c_in, c_out, kernel, stride, padding, dilation, heads, zeta, size = case
    torch.manual_seed(len(CASES) * batch + CASES.index(case))
    layer = _layer(c_in, c_out, kernel, stride, padding, dilation, heads, zeta)
    channels_last = batch != 3  # both layouts across the batch sizes
    x = _input(layer, batch, size, channels_last, seed=batch)
    with torch.no_grad():
        reference = layer(x)
        out = op.dgc_conv2d_for_layer(layer, x)
    assert out.shape == reference.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference, **TOL)

    # Both layouts: blocked (head h owns outputs and weight rows h*n + j) and
    # interleaved (j*H + h), each with the weight relabelled to compute the same.
    # The op computes blocked: an interleaved weight's rows go in blocked order,
    # and its output is relabelled once afterwards.
    g = layer.saliency_generator
    rows, order = interleaved_blocked_rows(c_out, heads), interleaved_output_order(c_out, heads)
    for interleaved in (False, True):
        weight, bias = _in_layout(layer, layer.weight, interleaved), _in_layout(layer, layer.bias, interleaved)
        if interleaved:
            weight, bias = weight[rows], bias[rows]
        with torch.no_grad():
            out = op.dgc_conv2d(
                x,
                g.reduce,
                g.expand,
                g.beta,
                op.pack_weight(weight, heads),
                bias,
                layer.kept_channels,
                layer.stride,
                layer.padding,
                layer.dilation,
            )
        if interleaved:
            out = to_output_order(out, order)
        torch.testing.assert_close(out, _in_layout(layer, reference, interleaved, output=True), **TOL)


@pytest.mark.parametrize("interleaved", [False, True])
def test_layer_attribute_selects_the_layout(op, interleaved):
    layer = _layer(16, 48, 3, 1, 1, 1, 4, 0.5)
    x = _input(layer, 2, 6, True, seed=3)
    with torch.no_grad():
        expected = _in_layout(layer, layer(x), interleaved, output=True)
        weight, bias = _in_layout(layer, layer.weight, interleaved), _in_layout(layer, layer.bias, interleaved)
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        layer.interleaved = interleaved
        out = op.dgc_conv2d_for_layer(layer, x)
    torch.testing.assert_close(out, expected, **TOL)


def test_packed_weight_follows_weight_changes(op):
    layer = _layer(16, 32, 3, 1, 1, 1, 4, 0.5)
    x = _input(layer, 1, 6, True, seed=5)
    with torch.no_grad():
        first = op.packed_weight_for(layer)
        assert op.packed_weight_for(layer).data_ptr() == first.data_ptr()  # packed once
        layer.weight.mul_(2.0)
        assert not torch.equal(op.packed_weight_for(layer), first)  # packed again
        torch.testing.assert_close(op.dgc_conv2d_for_layer(layer, x), layer(x), **TOL)


@pytest.mark.parametrize("zeta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("interleaved", [True, False])
def test_all_tied_scores_keep_the_lowest_channels(op, zeta, interleaved):
    # expand = 0 and a constant beta: every score is relu(beta) = 0.7, so the
    # layer keeps channels 0..k-1, and so must the op.
    layer = _layer(24, 32, 3, 1, 1, 1, 4, zeta)
    with torch.no_grad():
        layer.saliency_generator.expand.zero_()
        layer.saliency_generator.beta.fill_(0.7)
        x = _input(layer, 3, 7, True, seed=7)
        expected = _in_layout(layer, layer(x), interleaved, output=True)
        weight, bias = _in_layout(layer, layer.weight, interleaved), _in_layout(layer, layer.bias, interleaved)
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        layer.interleaved = interleaved
        out = op.dgc_conv2d_for_layer(layer, x)
    torch.testing.assert_close(out, expected, **TOL)


def test_zero_scores_are_skipped_and_ties_among_them_do_not_matter(op):
    # Most scores exactly 0 (beta very negative on most channels): k exceeds
    # the positive scores, so zero-score channels fill the kept set.
    layer = _layer(32, 32, 3, 1, 1, 1, 2, 0.25)
    with torch.no_grad():
        beta = layer.saliency_generator.beta
        beta.fill_(-10.0)
        beta[:, ::5] = 1.0
        x = _input(layer, 4, 6, True, seed=9)
        torch.testing.assert_close(op.dgc_conv2d_for_layer(layer, x), layer(x), **TOL)
        # Every score 0: the output is the bias alone.
        beta.fill_(-10.0)
        out = op.dgc_conv2d_for_layer(layer, x)
        torch.testing.assert_close(out, layer.bias.view(1, -1, 1, 1).expand_as(out), **TOL)


@pytest.mark.parametrize("kernel", [1, 3])
def test_unit_scores_at_zeta_zero_is_the_dense_convolution(op, kernel):
    layer = _layer(24, 40, kernel, 1, kernel // 2, 1, 4, 0.0)
    layer.unit_scores = True
    x = torch.randn(2, 24, 7, 7)
    with torch.no_grad():
        dense = torch.nn.functional.conv2d(x, layer.weight, layer.bias, 1, kernel // 2)
        out = op.dgc_conv2d_for_layer(layer, x)
        torch.testing.assert_close(out, dense, **TOL)
        layer.set_zeta_t(0.5)
        torch.testing.assert_close(op.dgc_conv2d_for_layer(layer, x), layer(x), **TOL)


def test_thread_counts_agree(op):
    layer = _layer(64, 128, 3, 1, 1, 1, 4, 0.5)
    x = _input(layer, 1, 12, True, seed=11)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(op.dgc_conv2d_for_layer(layer, x))
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        reference = layer(x)
    for out in outs:
        torch.testing.assert_close(out, reference, **TOL)


def test_bad_arguments_raise(op):
    layer = _layer(16, 16, 3, 1, 1, 1, 4, 0.5)
    packed = op.packed_weight_for(layer)
    g = layer.saliency_generator
    x = torch.randn(1, 16, 5, 5)
    args = (g.reduce.detach(), g.expand.detach(), g.beta.detach(), packed, None)
    with pytest.raises(RuntimeError, match="kept"):
        op.dgc_conv2d(x, *args, 17, (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="input channels"):
        op.dgc_conv2d(torch.randn(1, 8, 5, 5), *args, 4, (1, 1), (1, 1), (1, 1))
    with pytest.raises(RuntimeError, match="float32"):
        op.dgc_conv2d(x.double(), *args, 4, (1, 1), (1, 1), (1, 1))


class _Op(torch.nn.Module):
    """A small module calling the op, as a compiled model would."""

    def __init__(self, layer):
        super().__init__()
        g = layer.saliency_generator
        self.register_buffer("reduce", g.reduce.detach().clone())
        self.register_buffer("expand", g.expand.detach().clone())
        self.register_buffer("beta", g.beta.detach().clone())
        self.register_buffer("packed", compiled.pack_weight(layer.blocked_weight(), layer.heads))
        self.register_buffer("bias", layer.blocked_bias().detach().clone())
        self.kept = layer.kept_channels
        self.conv_args = (layer.stride, layer.padding, layer.dilation)

    def forward(self, x):
        y = compiled.dgc_conv2d(
            x, self.reduce, self.expand, self.beta, self.packed, self.bias, self.kept, *self.conv_args
        )
        return torch.relu(y) + 1.0


def test_torch_compile_treats_the_op_as_one_call(op):
    layer = _layer(16, 32, 3, 2, 1, 1, 4, 0.5)
    module = _Op(layer).eval()
    x = _input(layer, 2, 9, True, seed=13)
    with torch.no_grad():
        eager = module(x)
        torch.testing.assert_close(eager, torch.relu(layer(x)) + 1.0, **TOL)
        compiled_module = torch.compile(module, fullgraph=True)
        out = compiled_module(x)
    torch.testing.assert_close(out, eager, **TOL)
    # The fake agrees with the real op on shape and (channels-last) strides.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = compiled.dgc_conv2d(
            mode.from_tensor(x),
            *(mode.from_tensor(t) for t in (module.reduce, module.expand, module.beta, module.packed, module.bias)),
            module.kept,
            *module.conv_args,
        )
    real = compiled.dgc_conv2d(
        x, module.reduce, module.expand, module.beta, module.packed, module.bias, module.kept, *module.conv_args
    )
    assert fake.shape == real.shape and fake.stride() == real.stride()


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


_FALLBACK_PROBE = """
import warnings
warnings.simplefilter("always")
from dgc_convert.nn import compiled
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first, second = compiled.available(), compiled.available()
print(first, second, len(caught))
for w in caught:
    print(w.category.__name__, str(w.message).replace(chr(10), " "))
"""


def test_disabled_build_warns_once_and_is_unavailable():
    result = _run_python(_FALLBACK_PROBE, DGC_CONVERT_NO_COMPILE="1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "False False 1"
    assert "DGC_CONVERT_NO_COMPILE" in lines[1] and "RuntimeWarning" in lines[1]


def test_missing_compiler_warns_once_and_is_unavailable():
    result = _run_python(_FALLBACK_PROBE, CXX="/nonexistent/c++", DGC_CONVERT_NO_COMPILE="0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "False False 1"
    assert "compiler" in lines[1]


def test_torch_export_keeps_the_op_as_one_node(op):
    layer = _layer(16, 32, 3, 1, 1, 1, 4, 0.5)
    module = _Op(layer).eval()
    x = _input(layer, 2, 8, True, seed=17)
    exported = torch.export.export(module, (x,))
    calls = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert calls.count(torch.ops.dgc_convert.dgc_conv2d.default) == 1
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), module(x), **TOL)
