"""Measured speed: the dense model, the DGC model computed densely, and the DGC inference path.

``benchmark(dense, dgc, ...)`` prepares both models the same way
(``prepare_for_inference``: BatchNorm folded), times the dense model in its
faster memory layout (channels-last or not), the DGC model with every layer on
the masked (training) computation, and the DGC model on its sparse inference
path, with warm-up and interleaved repeats, and reports medians in
milliseconds per batch, the speedup over dense, the MAC ratio, and the
fraction of the theoretical saving that became real. A per-layer breakdown
times each convolution with forward hooks.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dgc_convert.macs import MacReport, count_macs, normalize_input_size
from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.nn.modes import find_dgc_layers
from dgc_convert.prepare import prepare_for_inference

__all__ = ["BenchResult", "LayerTiming", "benchmark", "realized_fraction"]


def realized_fraction(dense_ms: float, dgc_ms: float, mac_ratio: float) -> float | None:
    """Share of the theoretical saving that became real: (1 - dgc/dense) / (1 - mac_ratio); None without a saving."""
    if mac_ratio >= 1.0 or dense_ms <= 0:
        return None
    return (1.0 - dgc_ms / dense_ms) / (1.0 - mac_ratio)


@dataclass
class LayerTiming:
    """One convolution: median milliseconds per batch in each variant, MACs per sample, and the algorithm used."""

    name: str
    dense_ms: float
    dgc_masked_ms: float
    dgc_ms: float
    dense_macs: int
    dgc_macs: int
    algorithm: str | None
    speedup: float = 0.0
    mac_ratio: float = 1.0
    realized_fraction: float | None = None


@dataclass
class BenchResult:
    """Whole-model medians (milliseconds per batch) and the per-layer breakdown."""

    model: str
    batch_size: int
    input_size: tuple[int, int, int]
    threads: int
    repeats: int
    dense_layout: str
    dense_ms: float
    dgc_masked_ms: float
    dgc_ms: float
    speedup: float
    mac_ratio: float
    realized_fraction: float | None
    dense_macs: int
    dgc_macs: int
    layers: list[LayerTiming] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``dgc-convert bench --json``."""
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        return data


def _time(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def _layer_times(model: nn.Module, x: torch.Tensor, passes: int) -> dict[str, float]:
    """Median milliseconds of every convolution's forward over ``passes`` runs."""
    starts: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, DGCConv2d)):
            handles.append(
                module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
            )
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, n=name: samples.setdefault(n, []).append((time.perf_counter() - starts[n]) * 1e3)
                )
            )
    try:
        for _ in range(passes):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: statistics.median(values) for name, values in samples.items()}


def _set_algorithm(model: nn.Module, algorithm: str) -> None:
    """For good: the model is the benchmark's own prepared copy."""
    for layer in find_dgc_layers(model):
        layer.inference_algorithm = algorithm


def benchmark(
    dense: nn.Module,
    dgc: nn.Module,
    *,
    name: str = "model",
    batch_size: int = 1,
    input_size: int | tuple[int, ...] = 224,
    repeats: int = 10,
    warmup: int = 3,
    threads: int | None = None,
    layers: bool = True,
) -> BenchResult:
    """Time ``dense`` against ``dgc`` (a converted copy) on random input of ``batch_size``.

    Both models are deep-copied and prepared; the originals are untouched.
    Returns medians of ``repeats`` interleaved runs after ``warmup`` runs each.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    size = normalize_input_size(input_size)
    x = torch.randn(batch_size, *size)
    with torch.no_grad():  # ordinary tensors: the weight caches track their versions
        dense_nchw = copy.deepcopy(dense)
        prepare_for_inference(dense_nchw)
        masked = copy.deepcopy(dgc)
        prepare_for_inference(masked)
        _set_algorithm(masked, "masked")
        sparse = copy.deepcopy(masked)
        _set_algorithm(sparse, "auto")
        runs = _Runs(
            x=x,
            x_cl=x.contiguous(memory_format=torch.channels_last),
            dense_nchw=dense_nchw,
            dense_cl=copy.deepcopy(dense_nchw).to(memory_format=torch.channels_last),
            masked=masked,
            sparse=sparse,
            dense_macs=count_macs(dense, size),
            dgc_macs=count_macs(dgc, size),
        )
    # Untrained weights can produce denormal floats, which slow CPUs down and
    # would favour whichever variant meets fewer of them. Process-wide
    # setting: switched back off (torch's default) afterwards.
    torch.set_flush_denormal(True)
    try:
        with torch.inference_mode():
            return _measure(runs, name, repeats, warmup, layers)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


@dataclass
class _Runs:
    """The prepared variants, their inputs and the MAC counts of the original models."""

    x: torch.Tensor
    x_cl: torch.Tensor
    dense_nchw: nn.Module
    dense_cl: nn.Module
    masked: nn.Module
    sparse: nn.Module
    dense_macs: MacReport
    dgc_macs: MacReport


def _measure(runs: _Runs, name: str, repeats: int, warmup: int, layers: bool) -> BenchResult:
    variants = {
        "dense_nchw": lambda: runs.dense_nchw(runs.x),
        "dense_cl": lambda: runs.dense_cl(runs.x_cl),
        "masked": lambda: runs.masked(runs.x),
        "sparse": lambda: runs.sparse(runs.x),
    }
    for run in variants.values():
        for _ in range(warmup):
            run()  # the sparse path times its algorithms on its first call per shape
    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(repeats):
        for key, run in variants.items():
            times[key].append(_time(run))
    medians = {key: statistics.median(values) for key, values in times.items()}
    channels_last = medians["dense_cl"] < medians["dense_nchw"]
    dense_ms = min(medians["dense_cl"], medians["dense_nchw"])
    dense_macs, dgc_macs = runs.dense_macs.total_macs, runs.dgc_macs.total_macs
    mac_ratio = dgc_macs / dense_macs if dense_macs else 1.0
    result = BenchResult(
        model=name,
        batch_size=runs.x.shape[0],
        input_size=runs.dense_macs.input_size,
        threads=torch.get_num_threads(),
        repeats=repeats,
        dense_layout="channels_last" if channels_last else "nchw",
        dense_ms=dense_ms,
        dgc_masked_ms=medians["masked"],
        dgc_ms=medians["sparse"],
        speedup=dense_ms / medians["sparse"],
        mac_ratio=mac_ratio,
        realized_fraction=realized_fraction(dense_ms, medians["sparse"], mac_ratio),
        dense_macs=dense_macs,
        dgc_macs=dgc_macs,
    )
    if layers:
        dense_run = (runs.dense_cl, runs.x_cl) if channels_last else (runs.dense_nchw, runs.x)
        result.layers = _per_layer(runs, *dense_run, max(3, repeats // 2))
    return result


def _per_layer(runs: _Runs, dense_model: nn.Module, dense_x: torch.Tensor, passes: int) -> list[LayerTiming]:
    dense_t = _layer_times(dense_model, dense_x, passes)
    masked_t = _layer_times(runs.masked, runs.x, passes)
    sparse_t = _layer_times(runs.sparse, runs.x, passes)
    dense_macs, dgc_macs = runs.dense_macs.by_name(), runs.dgc_macs.by_name()
    sparse_modules = dict(runs.sparse.named_modules())
    rows = []
    for name, d in dense_t.items():
        if name not in sparse_t:
            continue
        module = sparse_modules.get(name)
        dgc_layer = isinstance(module, DGCConv2d)
        row = LayerTiming(
            name=name,
            dense_ms=d,
            dgc_masked_ms=masked_t.get(name, d),
            dgc_ms=sparse_t[name],
            dense_macs=dense_macs[name].macs if name in dense_macs else 0,
            dgc_macs=dgc_macs[name].macs if name in dgc_macs else 0,
            algorithm=getattr(module, "last_algorithm", None) if dgc_layer else None,
        )
        row.speedup = row.dense_ms / row.dgc_ms if row.dgc_ms else 0.0
        row.mac_ratio = row.dgc_macs / row.dense_macs if row.dense_macs else 1.0
        row.realized_fraction = realized_fraction(row.dense_ms, row.dgc_ms, row.mac_ratio) if dgc_layer else None
        rows.append(row)
    return rows
