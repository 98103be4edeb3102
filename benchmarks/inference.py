"""Inference speed of the DGC model against the fastest dense model, whole models and per layer.

Usage: python benchmarks/inference.py [--quick] [--threads 1,2] [--repeats 10]
       [--cases r50-b1-z0.75,...] [--no-memory] [--layers]

Prints the CPU (model name, avx512f/avx2) and torch version, then for each
case (ResNet-50 at 224 batch 1 zeta 0.5 and 0.75, batch 8 zeta 0.75,
ResNet-18 batch 1 zeta 0.75) at 1 and 2 threads (``torch.set_num_threads``):
dense eager (BatchNorm folded, the fastest of NCHW, channels-last and
channels-last with prepacked weights), dense compiled (``torch.compile`` with
inductor freezing), the DGC model eager and compiled, the speedup of the
faster DGC engine over the fastest dense one, the MAC ratio, and the target
beside it. Figures come from ``dgc_convert.measuring.bench.benchmark`` (medians of
interleaved repeats, milliseconds per batch; compiling is not timed, its
first-call time is printed). Then the peak memory of one inference per
variant, in a fresh process each (Linux): the resident high-water mark
(VmHWM, reset through ``/proc/self/clear_refs`` after warm-up and
compiling) during one inference, minus the resident size before the models
were built. ``--layers`` adds the per-layer table (ResNet shapes, dense
``nn.Conv2d`` against one DGC layer's inference path).

``--quick``: ResNet-18 and ResNet-50 batch 1 zeta 0.75, 5 repeats, memory of
ResNet-50 only. A full run takes about 10-15 minutes on 2 cores. Set
``OMP_WAIT_POLICY=PASSIVE`` on a shared machine (and compare figures at the
same setting).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dgc_convert import DGCConv2d, convert, create_model
from dgc_convert.measuring.bench import benchmark, realized_fraction
from dgc_convert.measuring.macs import dgc_layer_macs

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]

# (key, model, batch, zeta, target speedup over the fastest dense model)
CASES = [
    ("r50-b1-z0.75", "resnet50", 1, 0.75, 1.6),
    ("r50-b1-z0.5", "resnet50", 1, 0.5, 1.1),
    ("r50-b8-z0.75", "resnet50", 8, 0.75, 1.3),
    ("r18-b1-z0.75", "resnet18", 1, 0.75, 1.3),
]
QUICK = ("r18-b1-z0.75", "r50-b1-z0.75")


def cpu_summary() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("Flags:"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in ("avx512f", "avx2"))
    return f"{model} ({os.cpu_count()} CPUs; {present})"


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


def _models(name: str, zeta: float) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = create_model(name)
    dgc = copy.deepcopy(dense)
    convert(dgc, heads=4, zeta=zeta)
    return dense, dgc


def model_table(cases: list[tuple[str, str, int, float, float]], threads: list[int], repeats: int) -> None:
    print("whole models at 224 (ms per batch; speedup: fastest dense / faster DGC engine)")
    print(
        f"{'case':<13} {'thr':>3} | {'dense':>8} {'frozen':>8} | {'DGC':>8} {'DGC cmp':>8} | "
        f"{'speedup':>7} {'target':>6} {'MACs':>5} {'realised':>8} | compile s (dense, DGC)"
    )
    for key, name, batch, zeta, target in cases:
        dense, dgc = _models(name, zeta)
        for count in threads:
            r = benchmark(
                dense, dgc, name=name, batch_size=batch, input_size=224, repeats=repeats, threads=count, layers=False
            )
            frozen = "-" if r.dense_compiled_ms is None else f"{r.dense_compiled_ms:8.2f}"
            compiled = "-" if r.dgc_compiled_ms is None else f"{r.dgc_compiled_ms:8.2f}"
            met = "ok" if r.speedup >= target else "MISS"
            compile_s = (
                "-"
                if r.dense_compile_s is None or r.dgc_compile_s is None
                else f"{r.dense_compile_s:.1f}, {r.dgc_compile_s:.1f}"
            )
            realised = "-" if r.realized_fraction is None else f"{r.realized_fraction:8.2f}"
            print(
                f"{key:<13} {count:>3} | {r.dense_eager_ms:8.2f} {frozen:>8} | {r.dgc_eager_ms:8.2f} {compiled:>8} | "
                f"{r.speedup:6.2f}x {target:5.1f}x {r.mac_ratio:5.2f} {realised:>8} | {compile_s}  {met} "
                f"(dense {r.dense_engine} {r.dense_layout}, DGC {r.dgc_engine})",
                flush=True,
            )
            for note in r.notes:
                print(f"  note: {note}")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(name: str, batch: int, zeta: float, variant: str, threads: int) -> None:
    """In a fresh process: prepare one variant, warm it up (compile), reset the high-water mark, run once."""
    from dgc_convert.serving.prepare import prepare_for_inference

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    start = _status_kib("VmRSS")  # python and torch, before any model
    dense, dgc = _models(name, zeta)
    model = dense if variant.startswith("dense") else dgc
    del dense, dgc
    engine = "compile" if variant.endswith("compiled") else "eager"
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    report = prepare_for_inference(model, engine, example_input=x if engine == "compile" else None)
    run = report.model
    assert run is not None
    with torch.no_grad():
        for _ in range(2):
            run(x)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        run(x)
    peak = _status_kib("VmHWM")
    print(f"{(peak - start) / 1024:.1f}")


def memory_table(cases: list[tuple[str, str, int, float, float]], threads: int) -> None:
    print(f"peak memory of one inference, fresh process per variant, {threads} thread(s) (MiB)")
    print("(peak resident during one warm inference minus the process before building the models; compiled")
    print(" variants also hold the compiler's own memory)")
    print(f"{'case':<13} {'variant':<15} {'peak MiB':>9}")
    variants = ("dense_eager", "dense_compiled", "dgc_eager", "dgc_compiled")
    for key, name, batch, zeta, _ in cases:
        for variant in variants:
            code = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import inference as b; "
                f"b.memory_child({name!r}, {batch}, {zeta!r}, {variant!r}, {threads})"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                print(f"{key:<13} {variant:<15} failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:100]}")
                continue
            print(f"{key:<13} {variant:<15} {lines[-1]:>9}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-18 and ResNet-50 batch 1 zeta 0.75, 5 repeats")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 10; quick 5)")
    parser.add_argument("--cases", default=None, help=f"comma-separated subset of {', '.join(c[0] for c in CASES)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    parser.add_argument("--layers", action="store_true", help="add the per-layer table")
    args = parser.parse_args()
    wanted = args.cases.split(",") if args.cases else (QUICK if args.quick else [c[0] for c in CASES])
    unknown = set(wanted) - {c[0] for c in CASES}
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    cases = [c for c in CASES if c[0] in wanted]
    threads = [int(t) for t in args.threads.split(",")]
    repeats = args.repeats or (5 if args.quick else 10)
    print(f"torch {torch.__version__}; {cpu_summary()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    start = time.perf_counter()
    torch.set_flush_denormal(True)
    if args.layers:
        layer_table(repeats)
    model_table(cases, threads, repeats)
    if not args.no_memory and sys.platform.startswith("linux"):
        memory_cases = [c for c in cases if c[1] == "resnet50"] if args.quick else cases
        memory_table(memory_cases, threads[0])
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
