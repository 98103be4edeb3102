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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from dgc_convert.layer import DGCConv2d
from dgc_convert.macs import count_macs, normalize_input_size
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
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, n=name: samples.setdefault(n, []).append((time.perf_counter() - starts[n]) * 1e3)))
    try:
        for _ in range(passes):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: statistics.median(values) for name, values in samples.items()}


def _set_algorithm(model: nn.Module, algorithm: str) -> None:
    for module in model.modules():
        if isinstance(module, DGCConv2d):
            module.inference_algorithm = algorithm


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
    dense_macs = count_macs(dense, size).total_macs
    dgc_macs = count_macs(dgc, size).total_macs
    with torch.no_grad():  # ordinary tensors: the weight caches track their versions
        dense_nchw = copy.deepcopy(dense)
        prepare_for_inference(dense_nchw)
        dense_cl = copy.deepcopy(dense_nchw).to(memory_format=torch.channels_last)
        masked = copy.deepcopy(dgc)
        prepare_for_inference(masked)
        _set_algorithm(masked, "masked")
        sparse = copy.deepcopy(masked)
        _set_algorithm(sparse, "auto")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    # Untrained weights can produce denormal floats, which slow CPUs down and
    # would favour whichever variant meets fewer of them. Process-wide
    # setting: switched back off (torch's default) afterwards.
    torch.set_flush_denormal(True)
    try:
        with torch.inference_mode():
            return _measure(name, x, x_cl, size, dense, dgc, dense_nchw, dense_cl, masked, sparse, dense_macs, dgc_macs,
                            repeats, warmup, layers)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


def _measure(name, x, x_cl, size, dense, dgc, dense_nchw, dense_cl, masked, sparse, dense_macs, dgc_macs,
             repeats, warmup, layers) -> BenchResult:
    batch_size = x.shape[0]

    variants = {
        "dense_nchw": lambda: dense_nchw(x),
        "dense_cl": lambda: dense_cl(x_cl),
        "masked": lambda: masked(x),
        "sparse": lambda: sparse(x),
    }
    for run in variants.values():
        for _ in range(warmup):
            run()  # the sparse path times its algorithms on its first call per shape
    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(repeats):
        for key, run in variants.items():
            times[key].append(_time(run))
    medians = {key: statistics.median(values) for key, values in times.items()}
    dense_layout = "channels_last" if medians["dense_cl"] < medians["dense_nchw"] else "nchw"
    dense_ms = min(medians["dense_cl"], medians["dense_nchw"])
    mac_ratio = dgc_macs / dense_macs if dense_macs else 1.0
    result = BenchResult(
        model=name, batch_size=batch_size, input_size=size, threads=torch.get_num_threads(), repeats=repeats,
        dense_layout=dense_layout, dense_ms=dense_ms, dgc_masked_ms=medians["masked"], dgc_ms=medians["sparse"],
        speedup=dense_ms / medians["sparse"], mac_ratio=mac_ratio,
        realized_fraction=realized_fraction(dense_ms, medians["sparse"], mac_ratio),
        dense_macs=dense_macs, dgc_macs=dgc_macs,
    )
    if layers:
        result.layers = _per_layer(dense_cl if dense_layout == "channels_last" else dense_nchw,
                                   x_cl if dense_layout == "channels_last" else x, masked, sparse, x, dense, dgc, size, repeats)
    return result


def _per_layer(dense_model, dense_x, masked, sparse, x, dense, dgc, size, repeats) -> list[LayerTiming]:
    passes = max(3, repeats // 2)
    dense_t = _layer_times(dense_model, dense_x, passes)
    masked_t = _layer_times(masked, x, passes)
    sparse_t = _layer_times(sparse, x, passes)
    dense_macs = count_macs(dense, size).by_name()
    dgc_macs = count_macs(dgc, size).by_name()
    sparse_modules = dict(sparse.named_modules())
    rows = []
    for name, d in dense_t.items():
        if name not in sparse_t:
            continue
        module = sparse_modules.get(name)
        dgc_layer = isinstance(module, DGCConv2d)
        row = LayerTiming(
            name=name, dense_ms=d, dgc_masked_ms=masked_t.get(name, d), dgc_ms=sparse_t[name],
            dense_macs=dense_macs[name].macs if name in dense_macs else 0,
            dgc_macs=dgc_macs[name].macs if name in dgc_macs else 0,
            algorithm=getattr(module, "last_algorithm", None) if dgc_layer else None,
        )
        row.speedup = row.dense_ms / row.dgc_ms if row.dgc_ms else 0.0
        row.mac_ratio = row.dgc_macs / row.dense_macs if row.dense_macs else 1.0
        row.realized_fraction = realized_fraction(row.dense_ms, row.dgc_ms, row.mac_ratio) if dgc_layer else None
        rows.append(row)
    return rows
