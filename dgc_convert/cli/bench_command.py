"""``dgc-convert bench MODEL``: time a model dense, as DGC computed densely, and on the DGC inference path."""

from __future__ import annotations

from pathlib import Path

import typer

from dgc_convert.cli.exits import handles_errors, require_png
from dgc_convert.cli.options import (
    BatchSizeOption,
    GatingOption,
    HeadsOption,
    InputSizeOption,
    MinChannelsOption,
    NumClassesOption,
    PreactOption,
    SourceOption,
    SqueezeRatioOption,
    SqueezeRuleOption,
    ZetaOption,
)
from dgc_convert.display import StepProgress, output_console
from dgc_convert.measuring.engines import BENCH_ENGINES

__all__ = ["BENCH_HELP", "bench_command"]

BENCH_HELP = "Time MODEL (or a trained checkpoint) dense, as DGC computed densely, and on the DGC inference path."


@handles_errors
def bench_command(
    model: str = typer.Argument(
        ...,
        help="Model name, or a saved model: a .safetensors file from --save or dgc_convert.save, or a training run's last/ or best/ directory.",
    ),
    heads: HeadsOption = None,
    zeta: ZetaOption = None,
    squeeze_ratio: SqueezeRatioOption = None,
    gating: GatingOption = None,
    preact: PreactOption = None,
    squeeze_rule: SqueezeRuleOption = None,
    min_channels: MinChannelsOption = None,
    source: SourceOption = None,
    batch_size: BatchSizeOption = 1,
    input_size: InputSizeOption = None,
    num_classes: NumClassesOption = None,
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's)."),
    repeats: int = typer.Option(10, "--repeats", min=1, help="Timed runs per variant (median reported)."),
    warmup: int = typer.Option(3, "--warmup", min=1, help="Untimed runs per variant first."),
    layers: int = typer.Option(15, "--layers", min=0, help="Slowest dense layers to list (0: none)."),
    engine: str = typer.Option(
        "auto",
        "--engine",
        help="eager, compile (torch.compile with inductor freezing), or auto: compile when it works, the faster DGC engine.",
    ),
    json_output: bool = typer.Option(
        False,
        "--json",
        help="Print JSON on stdout: dense_ms, dense_eager_ms, dense_engine, dgc_engine, dgc_masked_ms, dgc_ms, "
        "speedup, mac_ratio, realized_fraction, dgc_macs_expected, layers.",
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Also draw every layer's dense and DGC times (saliency and top-k apart) as bars into FILE.png.",
    ),
) -> None:
    """Benchmark MODEL (a name, or a saved model against its untrained dense twin) and print the
    medians and the slowest layers, or ``--json``; ``--plot`` draws every layer's times."""
    # Options first, before torch is imported: a bad one is a quick one-line error.
    if engine not in BENCH_ENGINES:
        raise typer.BadParameter(f"must be one of {', '.join(BENCH_ENGINES)}", param_hint="--engine")
    require_png(plot, "--plot")
    from dgc_convert.cli.render import print_bench, print_json
    from dgc_convert.cli.sources import models_for_bench
    from dgc_convert.conversion.settings import model_settings
    from dgc_convert.measuring.bench import benchmark

    model_settings(name=model, input_size=input_size, num_classes=num_classes)  # the schema's bounds, before any work
    conversion = {
        "heads": heads,
        "zeta": zeta,
        "squeeze_ratio": squeeze_ratio,
        "gating": gating,
        "preact": preact,
        "squeeze_rule": squeeze_rule,
        "min_channels": min_channels,
    }
    with StepProgress() as progress:
        progress.step(f"building {model}")
        dense, dgc, name, default_size = models_for_bench(
            model, conversion, source=source, input_size=input_size, num_classes=num_classes
        )
        result = benchmark(
            dense,
            dgc,
            name=name,
            batch_size=batch_size,
            input_size=input_size or default_size,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
            layers=json_output or layers > 0 or plot is not None,  # the plot draws every layer
            engine=engine,
            progress=progress,
        )
    drawn = None
    if plot is not None:
        from dgc_convert.measuring.bench_figure import write_bench_layers

        drawn = write_bench_layers(result, plot)
    if json_output:
        print_json({**result.to_dict(), **({"plot": str(drawn)} if drawn else {})})
    else:
        print_bench(result, layer_rows=layers)
        if drawn:
            output_console().print(f"per-layer times drawn to {drawn}", highlight=False, markup=False)
