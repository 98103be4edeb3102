"""Forward+backward time and peak memory of one DGC layer against dense and
against the authors' per-head masked-copy computation.

Usage: python benchmarks/layer_step.py [--batch 32] [--zeta 0.5] [--heads 4] [--repeats 7]

For each ResNet-like 3x3 shape it prints the median time of one
forward+backward step (milliseconds) and the peak memory allocated during the
step (MiB: growth of the peak resident memory, VmHWM, of a fresh process
over one step; Linux), the times also as ratios to dense. Repeats of the three
variants are interleaved so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dgc_convert import DGCConv2d

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


class MaskedCopyDGC(nn.Module):
    """The authors' computation: one masked, scaled copy of the input per head,
    all heads at once as a grouped convolution, plain autograd. Same gates as
    the DGC layer it wraps (shares its parameters)."""

    def __init__(self, layer: DGCConv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        scores, mask = layer.gates(x)
        gate = scores * mask
        batch, channels, height, width = x.shape
        copies = (x[:, None] * gate[..., None, None]).reshape(batch, layer.heads * channels, height, width)
        heads_first = (
            layer.weight.view(-1, layer.heads, *layer.weight.shape[1:]).transpose(0, 1).reshape_as(layer.weight)
        )
        out = F.conv2d(copies, heads_first, None, layer.stride, layer.padding, layer.dilation, groups=layer.heads)
        # Channel shuffle: (B, H, C'/H) -> (B, C'/H, H).
        return out.view(batch, layer.heads, -1, *out.shape[2:]).transpose(1, 2).flatten(1, 2)


def step(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).sum().backward()


def build(variant: str, channels: int, size: int, args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(args.batch, channels, size, size, requires_grad=True)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    if variant == "dense":
        return conv, x
    dgc = DGCConv2d.from_conv(conv, heads=args.heads, zeta=args.zeta)
    return (dgc if variant == "dgc" else MaskedCopyDGC(dgc)), x


def peak_memory_mib(variant: str, channels: int, size: int, args: argparse.Namespace) -> float:
    """Growth of the process's peak resident memory over one step, in MiB.

    Measured in a fresh process per variant (the high-water mark never goes
    down), after the model and input exist and before the first step.
    """
    code = (
        "import sys, argparse, torch\n"
        "sys.path.insert(0, %r)\n"
        "import layer_step as b\n"
        "args = argparse.Namespace(batch=%d, heads=%d, zeta=%r)\n"
        "m, x = b.build(%r, %d, %d, args)\n"
        "before = b.high_water_kib()\n"
        "b.step(m, x)\n"
        "print(b.high_water_kib() - before)\n"
    ) % (str(Path(__file__).parent), args.batch, args.heads, args.zeta, variant, channels, size)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024


def high_water_kib() -> int:
    """This process's peak resident memory (VmHWM), KiB. Unlike ru_maxrss it
    is not inherited from the parent across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--zeta", type=float, default=0.5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
        f"heads {args.heads}, zeta {args.zeta}, 3x3 stride 1, forward+backward"
    )
    header = f"{'shape':>10} | {'dense ms':>9} {'DGC ms':>9} {'masked ms':>9} | {'DGC/dense':>9} {'masked/dense':>12} | {'dense MiB':>9} {'DGC MiB':>8} {'masked MiB':>10}"
    print(header)
    print("-" * len(header))
    for channels, size in SHAPES:
        conv, x = build("dense", channels, size, args)
        dgc = DGCConv2d.from_conv(conv, heads=args.heads, zeta=args.zeta)
        variants = {"dense": conv, "dgc": dgc, "masked": MaskedCopyDGC(dgc)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for module in variants.values():
            step(module, x)  # warm-up
        for _ in range(args.repeats):
            for name, module in variants.items():
                start = time.perf_counter()
                step(module, x)
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        mib = {name: peak_memory_mib(name, channels, size, args) for name in variants}
        print(
            f"{channels:>4}@{size:<5} | {ms['dense']:9.1f} {ms['dgc']:9.1f} {ms['masked']:9.1f} | "
            f"{ms['dgc'] / ms['dense']:9.2f} {ms['masked'] / ms['dense']:12.2f} | "
            f"{mib['dense']:9.1f} {mib['dgc']:8.1f} {mib['masked']:10.1f}"
        )


if __name__ == "__main__":
    main()
