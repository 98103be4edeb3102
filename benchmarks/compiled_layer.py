"""Per-layer speed of the compiled DGC op (``dgc_convert::dgc_conv2d``) against dense.

Usage: python benchmarks/compiled_layer.py [--repeats 25] [--threads 1 2] [--batch 1 8]
                                           [--zeta 0.5 0.75] [--no-frozen] [--only 64@56]

ResNet-50-like shapes (3x3 with padding 1 and 1x1), heads 4, bias (a
BatchNorm-folded layer). Dense is timed two ways, both on channels-last input:
``cl`` is ``F.conv2d`` with a channels-last weight and bias, ``frozen`` is
``torch.compile`` of a one-conv module with ``torch._inductor.config.freezing``
under ``torch.no_grad()``. ``dgc`` is one call of the op (saliency, selection,
sparse convolution; channels-last output) through ``compiled.dgc_conv2d`` with
the blocked head layout, ``dgc-i`` the same for an interleaved layer: the op
(which computes blocked) on its weight rows in blocked order, then its one
relabelling of output channels (``channel_order.to_output_order``).

Every figure is the median of interleaved repeats, in milliseconds per batch.
"ratio" is dgc / the faster dense; "MACs" is the DGC layer's MAC ratio
(``dgc_layer_macs``, saliency included); "realised" is
``(1 - ratio) / (1 - MACs)``, the share of the theoretical saving that became
real ("real-i": interleaved). The process re-executes itself with ``OMP_WAIT_POLICY=PASSIVE`` so that
idle OpenMP workers do not spin against the timed thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dgc_convert import DGCConv2d
from dgc_convert.measuring.macs import dgc_layer_macs
from dgc_convert.nn import compiled
from dgc_convert.nn.channel_order import interleaved_output_order, to_output_order

# (name, in, out, kernel, size)
SHAPES = [
    ("64@56 3x3", 64, 64, 3, 56),
    ("128@28 3x3", 128, 128, 3, 28),
    ("256@14 3x3", 256, 256, 3, 14),
    ("512@7 3x3", 512, 512, 3, 7),
    ("256->64@56", 256, 64, 1, 56),
    ("64->256@56", 64, 256, 1, 56),
    ("512->128@28", 512, 128, 1, 28),
    ("1024->256@14", 1024, 256, 1, 14),
    ("2048->512@7", 2048, 512, 1, 7),
]
HEADS = 4


def _medians(runs: dict[str, Callable[[], object]], repeats: int, target_ms: float = 3.0) -> dict[str, float]:
    """Median ms per call of each run over interleaved repeats; each sample times enough calls to last ~target_ms."""
    inner: dict[str, int] = {}
    for key, run in runs.items():
        for _ in range(3):
            run()
        start = time.perf_counter()
        run()
        once = (time.perf_counter() - start) * 1e3
        inner[key] = max(1, min(200, int(target_ms / max(once, 1e-3))))
    samples: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            n = inner[key]
            start = time.perf_counter()
            for _ in range(n):
                run()
            samples[key].append((time.perf_counter() - start) * 1e3 / n)
    return {key: statistics.median(values) for key, values in samples.items()}


class _OneConv(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _frozen(conv: nn.Conv2d, x: torch.Tensor) -> Callable[[], object]:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    torch._dynamo.config.recompile_limit = 256
    module = _OneConv(conv).eval()
    fn = torch.compile(module, dynamic=False)
    with torch.no_grad():
        fn(x)
    return lambda: fn(x)


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    if not compiled.available():
        print(f"compiled op unavailable: {compiled.unavailable_reason()}")
        return
    print(
        f"compiled op: {compiled.vector_level()}; torch {torch.__version__}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    frozen_cache: dict[tuple[str, int], Callable[[], object]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s): ms per batch; ratio = dgc / min(cl, frozen)")
        print(
            f"{'layer':<14} {'zeta':>4} {'B':>2} | {'cl':>8} {'frozen':>8} {'dgc':>8} {'dgc-i':>8} | "
            f"{'ratio':>5} {'MACs':>5} {'realised':>8} {'real-i':>6}"
        )
        for name, c_in, c_out, kernel, size in SHAPES:
            if args.only and name not in args.only:
                continue
            for batch in args.batch:
                torch.manual_seed(0)
                conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=True).eval()
                x = torch.randn(batch, c_in, size, size).contiguous(memory_format=torch.channels_last)
                conv_cl = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=True).eval()
                conv_cl.load_state_dict(conv.state_dict())
                conv_cl = conv_cl.to(memory_format=torch.channels_last)
                weight_cl, bias = conv_cl.weight, conv_cl.bias
                runs: dict[str, Callable[[], object]] = {
                    "cl": lambda: F.conv2d(x, weight_cl, bias, 1, kernel // 2),
                }
                if args.frozen:
                    key = (name, batch)
                    if key not in frozen_cache:
                        frozen_cache[key] = _frozen(conv_cl, x)
                    runs["frozen"] = frozen_cache[key]
                layers = {}
                for zeta in args.zeta:
                    layer = DGCConv2d.from_conv(conv, heads=HEADS, zeta=zeta).eval()
                    layers[zeta] = layer
                    g = layer.saliency_generator
                    order = interleaved_output_order(c_out, HEADS)
                    for interleaved in (False, True):
                        # Each variant its own copies of every parameter: the runs are
                        # interleaved, and a shared one would be warm in cache for the second.
                        call_args = (
                            x,
                            g.reduce.detach().clone(),
                            g.expand.detach().clone(),
                            g.beta.detach().clone(),
                            compiled.pack_weight(layer.weight, HEADS),
                            layer.bias.detach().clone(),
                            layer.kept_channels,
                            layer.stride,
                            layer.padding,
                            layer.dilation,
                            False,
                        )
                        if interleaved:
                            runs[f"dgc{zeta}True"] = lambda call_args=call_args, order=order: to_output_order(
                                compiled.dgc_conv2d(*call_args), order
                            )
                        else:
                            runs[f"dgc{zeta}False"] = lambda call_args=call_args: compiled.dgc_conv2d(*call_args)
                t = _medians(runs, args.repeats)
                dense = min(t["cl"], t.get("frozen", float("inf")))
                for zeta, layer in layers.items():
                    dgc, dgc_i = t[f"dgc{zeta}False"], t[f"dgc{zeta}True"]
                    mac_ratio = dgc_layer_macs(layer, size, size) / (kernel * kernel * c_in * c_out * size * size)
                    ratio = dgc / dense
                    realised = (1 - ratio) / (1 - mac_ratio)
                    realised_i = (1 - dgc_i / dense) / (1 - mac_ratio)
                    frozen_text = f"{t['frozen']:8.3f}" if "frozen" in t else f"{'-':>8}"
                    print(
                        f"{name:<14} {zeta:>4} {batch:>2} | {t['cl']:8.3f} {frozen_text} {dgc:8.3f} {dgc_i:8.3f} | "
                        f"{ratio:5.2f} {mac_ratio:5.2f} {realised:8.2f} {realised_i:6.2f}",
                        flush=True,
                    )


def main() -> None:
    if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--zeta", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--no-frozen", dest="frozen", action="store_false", help="skip the torch.compile dense")
    parser.add_argument("--only", nargs="+", help="layer names to run, e.g. 64@56 3x3")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
