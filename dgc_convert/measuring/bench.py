"""Measured speed: the fastest dense model a user could deploy against the DGC inference path.

Both are prepared for inference and timed interleaved after warm-up (medians, milliseconds per
batch), with a per-layer breakdown. Which dense variants compete, how engines pair up and how
threads are set: ``docs/serving.md``, "Benchmarking".
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dgc_convert.conversion.shapes import normalize_input_size
from dgc_convert.errors import first_line
from dgc_convert.measuring.engines import BENCH_ENGINES
from dgc_convert.measuring.macs import MacReport, count_macs
from dgc_convert.measuring.memory import require_batch_memory
from dgc_convert.nn.layer import DGCConv2d
from dgc_convert.nn.modes import find_dgc_layers
from dgc_convert.nn.network_gate import untrained_threshold
from dgc_convert.progress import NO_PROGRESS, Progress
from dgc_convert.serving.prepare import InferenceReport, prepare_for_inference

__all__ = ["BENCH_ENGINES", "BenchResult", "LayerTiming", "benchmark", "realized_fraction"]


def realized_fraction(dense_ms: float, dgc_ms: float, mac_ratio: float) -> float | None:
    """Share of the theoretical saving that became real: (1 - dgc/dense) / (1 - mac_ratio); None without a saving."""
    if mac_ratio >= 1.0 or dense_ms <= 0:
        return None
    return (1.0 - dgc_ms / dense_ms) / (1.0 - mac_ratio)


@dataclass
class LayerTiming:
    """One convolution of the eager models: median milliseconds per batch in each variant, MACs per sample,
    the algorithm used, and for DGC layers the saliency / top-k / rest split of ``dgc_ms``."""

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
    saliency_ms: float | None = None
    select_ms: float | None = None
    conv_ms: float | None = None


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
    dgc_macs_expected: bool = False  # network gating (DGC-G): dgc_macs is the cost expected at the target
    dense_engine: str = "eager"
    dgc_engine: str = "eager"
    dense_eager_ms: float = 0.0
    dense_compiled_ms: float | None = None
    dgc_eager_ms: float = 0.0
    dgc_compiled_ms: float | None = None
    dense_compile_s: float | None = None
    dgc_compile_s: float | None = None
    dgc_in_graph: str | None = None
    notes: list[str] = field(default_factory=list)
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


def _prepared(model: nn.Module, **options: Any) -> tuple[nn.Module, InferenceReport]:
    copied = copy.deepcopy(model)
    report = prepare_for_inference(copied, **options)
    return copied, report


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
    engine: str = "auto",
    progress: Progress = NO_PROGRESS,
) -> BenchResult:
    """Time ``dense`` against ``dgc`` (a converted copy) on random input of ``batch_size``.

    Both models are deep-copied and prepared; the originals are untouched.
    Returns medians of ``repeats`` interleaved runs after ``warmup`` runs each.
    ``engine``: ``"eager"``, ``"compile"`` (an error if compiling fails) or
    ``"auto"`` (compile, else eager with a note). See the module docstring.
    ``progress`` is told each step and each timed run (see ``dgc_convert.progress``).
    """
    if engine not in BENCH_ENGINES:
        raise ValueError(f"engine must be one of {', '.join(BENCH_ENGINES)}, not {engine!r}")
    previous_threads = torch.get_num_threads()
    size = normalize_input_size(input_size)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        progress.step("preparing the dense and DGC variants")
        dense_macs = count_macs(dense, size)
        require_batch_memory(dense_macs, batch_size, what="timing")
        torch.manual_seed(0)
        x = torch.randn(batch_size, *size)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        notes: list[str] = []
        with torch.no_grad():  # ordinary tensors: the weight caches track their versions
            dense_nchw, _ = _prepared(dense, channels_last=False, pack=False)
            dense_cl, _ = _prepared(dense, pack=False)
            dense_packed, _ = _prepared(dense)
            masked, _ = _prepared(dgc, channels_last=False, pack=False)
            _set_algorithm(masked, "masked")
            sparse, _ = _prepared(dgc)
            _set_algorithm(sparse, "auto")
            runs = _Runs(
                x=x,
                x_cl=x_cl,
                dense_eager={"nchw": dense_nchw, "channels_last": dense_cl, "channels_last+packed": dense_packed},
                masked=masked,
                sparse=sparse,
                dense_macs=dense_macs,
                dgc_macs=count_macs(dgc, size),
            )
        # Untrained weights can produce denormal floats, which slow CPUs down and
        # would favour whichever variant meets fewer of them. Process-wide
        # setting: switched back off (torch's default) afterwards.
        torch.set_flush_denormal(True)
        if engine != "eager":
            _compile_variants(dense, dgc, runs, engine, notes, progress)
        result = _measure(runs, name, repeats, warmup, layers, fastest_dgc=engine == "auto", progress=progress)
        result.notes = notes + result.notes
        return result
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


def _compile_variants(
    dense: nn.Module, dgc: nn.Module, runs: _Runs, engine: str, notes: list[str], progress: Progress
) -> None:
    """Compile both models (the first call compiles; timed as ``*_compile_s``), or note why not."""
    try:
        progress.step("compiling the dense model (torch.compile)")
        dense_compiled, dense_report = _prepared(dense, engine="compile", example_input=runs.x_cl)
        progress.step("compiling the DGC model (torch.compile)")
        dgc_compiled, dgc_report = _prepared(dgc, engine="compile", example_input=runs.x_cl)
    except Exception as error:  # torch.compile fails in many ways (no compiler, unsupported ops)
        if engine == "compile":
            raise
        notes.append(f"torch.compile failed ({type(error).__name__}: {first_line(error, 200)}); measured eager only")
        return
    runs.dense_compiled, runs.dgc_compiled = dense_report.model, dgc_report.model
    runs.dense_compile_s, runs.dgc_compile_s = dense_report.compile_seconds, dgc_report.compile_seconds
    runs.dgc_in_graph = dgc_report.dgc_in_graph
    runs.keep = [dense_compiled, dgc_compiled]


@dataclass
class _Runs:
    """The prepared variants, their inputs and the MAC counts of the original models."""

    x: torch.Tensor
    x_cl: torch.Tensor
    dense_eager: dict[str, nn.Module]  # by layout
    masked: nn.Module
    sparse: nn.Module
    dense_macs: MacReport
    dgc_macs: MacReport
    dense_compiled: Callable[..., Any] | None = None
    dgc_compiled: Callable[..., Any] | None = None
    dense_compile_s: float | None = None
    dgc_compile_s: float | None = None
    dgc_in_graph: str | None = None
    keep: list[nn.Module] = field(default_factory=list)


def _in(
    context: Callable[[], AbstractContextManager[Any]], model: Callable[..., Any], x: torch.Tensor
) -> Callable[[], Any]:
    def run() -> Any:
        with context():
            return model(x)

    return run


def _measure(
    runs: _Runs, name: str, repeats: int, warmup: int, layers: bool, fastest_dgc: bool, progress: Progress
) -> BenchResult:
    # Eager models run under inference_mode (what serving code would use);
    # compiled ones under no_grad (inference_mode makes dynamo recompile).
    variants = {
        f"dense:{layout}": _in(torch.inference_mode, model, runs.x if layout == "nchw" else runs.x_cl)
        for layout, model in runs.dense_eager.items()
    }
    variants["masked"] = _in(torch.inference_mode, runs.masked, runs.x)
    variants["sparse"] = _in(torch.inference_mode, runs.sparse, runs.x_cl)
    if runs.dense_compiled is not None and runs.dgc_compiled is not None:
        variants["dense:compiled"] = _in(torch.no_grad, runs.dense_compiled, runs.x_cl)
        variants["dgc:compiled"] = _in(torch.no_grad, runs.dgc_compiled, runs.x_cl)
    progress.step(f"warming up {len(variants)} variants", len(variants) * warmup)
    for run in variants.values():
        for _ in range(warmup):
            run()  # the sparse path times its algorithms on its first call per shape
            progress.advance()
    times: dict[str, list[float]] = {key: [] for key in variants}
    progress.step(f"timing {len(variants)} variants, interleaved", len(variants) * repeats)
    for _ in range(repeats):
        for key, run in variants.items():
            times[key].append(_time(run))
            progress.advance()
    medians = {key: statistics.median(values) for key, values in times.items()}
    layout = min(runs.dense_eager, key=lambda name: medians[f"dense:{name}"])
    dense_eager_ms = medians[f"dense:{layout}"]
    dense_compiled_ms = medians.get("dense:compiled")
    compiled = dense_compiled_ms is not None
    dense_ms = dense_eager_ms if dense_compiled_ms is None else min(dense_eager_ms, dense_compiled_ms)
    dense_engine = "eager" if dense_ms == dense_eager_ms else "compile"
    dgc_compiled = compiled and (not fastest_dgc or medians["dgc:compiled"] < medians["sparse"])
    dgc_ms = medians["dgc:compiled"] if dgc_compiled else medians["sparse"]
    dense_macs, dgc_macs = runs.dense_macs.total_macs, runs.dgc_macs.total_macs
    mac_ratio = dgc_macs / dense_macs if dense_macs else 1.0
    untrained = untrained_threshold(runs.masked)
    result = BenchResult(
        model=name,
        batch_size=runs.x.shape[0],
        input_size=runs.dense_macs.input_size,
        threads=torch.get_num_threads(),
        repeats=repeats,
        dense_layout=layout,
        dense_ms=dense_ms,
        dgc_masked_ms=medians["masked"],
        dgc_ms=dgc_ms,
        speedup=dense_ms / dgc_ms,
        mac_ratio=mac_ratio,
        # An untrained DGC-G threshold keeps (nearly) every channel: no saving to realise.
        realized_fraction=None if untrained else realized_fraction(dense_ms, dgc_ms, mac_ratio),
        dense_macs=dense_macs,
        dgc_macs=dgc_macs,
        dgc_macs_expected=runs.dgc_macs.expected,
        dense_engine=dense_engine,
        dgc_engine="compile" if dgc_compiled else "eager",
        dense_eager_ms=dense_eager_ms,
        dense_compiled_ms=dense_compiled_ms,
        dgc_eager_ms=medians["sparse"],
        dgc_compiled_ms=medians.get("dgc:compiled"),
        dense_compile_s=runs.dense_compile_s,
        dgc_compile_s=runs.dgc_compile_s,
        dgc_in_graph=runs.dgc_in_graph,
    )
    if untrained:
        result.notes.append(
            "DGC-G threshold not learned yet (0): the model keeps every positive-score channel, not the "
            "expected MACs; bench a trained model for the realised saving"
        )
    if layers:
        dense_x = runs.x if layout == "nchw" else runs.x_cl
        progress.step("timing every layer")
        with torch.inference_mode():
            result.layers = _per_layer(runs, runs.dense_eager[layout], dense_x, max(3, repeats // 2))
    return result


def _dgc_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input every DGC layer sees in one forward pass."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
        for name, module in model.named_modules()
        if isinstance(module, DGCConv2d)
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def _split_times(layer: DGCConv2d, x: torch.Tensor, passes: int) -> tuple[float, float]:
    """Median milliseconds of ``saliency`` and of ``select`` (top-k) on the input the layer saw."""
    x = x.contiguous()  # as the inference path does before scoring
    saliency, select = [], []
    for _ in range(passes + 1):  # the first pass warms up
        start = time.perf_counter()
        scores = layer.saliency(x)
        middle = time.perf_counter()
        layer.select(scores)
        end = time.perf_counter()
        saliency.append((middle - start) * 1e3)
        select.append((end - middle) * 1e3)
    return statistics.median(saliency[1:]), statistics.median(select[1:])


def _per_layer(runs: _Runs, dense_model: nn.Module, dense_x: torch.Tensor, passes: int) -> list[LayerTiming]:
    dense_t = _layer_times(dense_model, dense_x, passes)
    masked_t = _layer_times(runs.masked, runs.x, passes)
    sparse_t = _layer_times(runs.sparse, runs.x_cl, passes)
    dgc_inputs = _dgc_inputs(runs.sparse, runs.x_cl)
    dense_macs, dgc_macs = runs.dense_macs.by_name(), runs.dgc_macs.by_name()
    sparse_modules = dict(runs.sparse.named_modules())
    rows = []
    for name, d in dense_t.items():
        if name not in sparse_t:
            continue
        module = sparse_modules.get(name)
        row = LayerTiming(
            name=name,
            dense_ms=d,
            dgc_masked_ms=masked_t.get(name, d),
            dgc_ms=sparse_t[name],
            dense_macs=dense_macs[name].macs if name in dense_macs else 0,
            dgc_macs=dgc_macs[name].macs if name in dgc_macs else 0,
            algorithm=getattr(module, "last_algorithm", None) if isinstance(module, DGCConv2d) else None,
        )
        row.speedup = row.dense_ms / row.dgc_ms if row.dgc_ms else 0.0
        row.mac_ratio = row.dgc_macs / row.dense_macs if row.dense_macs else 1.0
        if isinstance(module, DGCConv2d):
            row.realized_fraction = realized_fraction(row.dense_ms, row.dgc_ms, row.mac_ratio)
            if name in dgc_inputs:
                row.saliency_ms, row.select_ms = _split_times(module, dgc_inputs[name], passes)
                row.conv_ms = max(0.0, row.dgc_ms - row.saliency_ms - row.select_ms)
        rows.append(row)
    return rows
