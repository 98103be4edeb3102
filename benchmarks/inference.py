"""Inference speed of the DGC sparse path against dense, per layer and for whole models.

Usage: python benchmarks/inference.py [--repeats 15] [--only layers|models]

Per layer: ResNet shapes 64@56, 128@28, 256@14, 512@7 (C -> C channels),
3x3 (padding 1) and 1x1, zeta 0.5 and 0.75, batch 1 and 32, heads 4. Dense is
an ``nn.Conv2d`` timed NCHW and channels-last, the faster counted; "masked" is
the DGC layer on the training computation; "sparse" is its inference path
("auto": the fastest exact algorithm, timed once per case). Whole models:
resnet18 and resnet50 at 224, batch 1 and 8, zeta 0.5 and 0.75, through
``dgc_convert.bench.benchmark`` (both models with BatchNorm folded).

Every ratio is to dense measured in the same run (median of interleaved
repeats, milliseconds). "realised" is (1 - sparse/dense) / (1 - MAC ratio):
the share of the theoretical saving that became real.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from dgc_convert import DGCConv2d, convert, create_model
from dgc_convert.bench import benchmark, realized_fraction
from dgc_convert.macs import dgc_layer_macs

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def _medians(runs: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            samples[key].append((time.perf_counter() - start) * 1e3)
    return {key: statistics.median(values) for key, values in samples.items()}


@torch.inference_mode()
def layer_table(repeats: int) -> None:
    print("per layer (ms per batch; ratio = sparse / dense)")
    print(
        f"{'layer':<14} {'zeta':>4} {'batch':>5} | {'dense':>8} {'masked':>8} {'sparse':>8} | "
        f"{'ratio':>5} {'MACs':>5} {'realised':>8}  algorithm"
    )
    for channels, size in SHAPES:
        for kernel in (3, 1):
            for zeta in (0.5, 0.75):
                for batch in (1, 32):
                    torch.manual_seed(0)
                    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False).eval()
                    conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
                    with torch.no_grad():
                        layer = DGCConv2d.from_conv(conv, heads=4, zeta=zeta).eval()
                    masked = copy.deepcopy(layer)
                    masked.inference_algorithm = "masked"
                    x = torch.randn(batch, channels, size, size)
                    x_cl = x.contiguous(memory_format=torch.channels_last)
                    t = _medians(
                        {
                            "nchw": lambda: conv(x),
                            "cl": lambda: conv_cl(x_cl),
                            "masked": lambda: masked(x),
                            "sparse": lambda: layer(x),
                        },
                        repeats,
                    )
                    dense = min(t["nchw"], t["cl"])
                    mac_ratio = dgc_layer_macs(layer, size, size) / (
                        kernel * kernel * channels * channels * size * size
                    )
                    realised = realized_fraction(dense, t["sparse"], mac_ratio)
                    print(
                        f"{channels}@{size} {kernel}x{kernel:<6} {zeta:>4} {batch:>5} | {dense:8.3f} {t['masked']:8.3f} "
                        f"{t['sparse']:8.3f} | {t['sparse'] / dense:5.2f} {mac_ratio:5.2f} {realised:8.2f}  {layer.last_algorithm}",
                        flush=True,
                    )


def model_table(repeats: int) -> None:
    print("whole models at 224 (ms per batch; BatchNorm folded in both)")
    print(
        f"{'model':<10} {'zeta':>4} {'batch':>5} | {'dense':>8} {'masked':>8} {'sparse':>8} | "
        f"{'speedup':>7} {'MACs':>5} {'realised':>8}"
    )
    for name in ("resnet18", "resnet50"):
        for zeta in (0.5, 0.75):
            for batch in (1, 8):
                torch.manual_seed(0)
                dense = create_model(name)
                dgc = copy.deepcopy(dense)
                convert(dgc, heads=4, zeta=zeta)
                r = benchmark(dense, dgc, name=name, batch_size=batch, input_size=224, repeats=repeats, layers=False)
                print(
                    f"{name:<10} {zeta:>4} {batch:>5} | {r.dense_ms:8.2f} {r.dgc_masked_ms:8.2f} {r.dgc_ms:8.2f} | "
                    f"{r.speedup:7.2f} {r.mac_ratio:5.2f} {r.realized_fraction:8.2f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", choices=["layers", "models"])
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only != "models":
        layer_table(args.repeats)
    if args.only != "layers":
        model_table(args.repeats)


if __name__ == "__main__":
    main()
