"""The ``dgc-convert`` command line: a thin Typer shell over the Python API.

``dgc-convert MODEL [options]`` converts a model and reports the MAC saving;
subcommands (``list-models``, ``recipe``, ``train``, ...) sit beside it. Every
command parses options, calls the API and hands the result to ``render``.
Bad input is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from dgc_convert._version import __version__
from dgc_convert.cli.import_authors import IMPORT_AUTHORS_HELP, import_authors_command
from dgc_convert.cli.render import print_conversion, print_json, print_model_list
from dgc_convert.conversion.dense_weights import WEIGHTS_SUFFIXES
from dgc_convert.conversion.settings import ConvertSection, ModelSection
from dgc_convert.conversion.zoo import require_model_info
from dgc_convert.display import StepProgress, error_console, output_console
from dgc_convert.errors import DGCConvertError, TrainingDiverged
from dgc_convert.files.names import LAST_CHECKPOINT
from dgc_convert.training.recipe import DataSection, Recipe

if TYPE_CHECKING:
    from torch import nn

    from dgc_convert.progress import Progress
    from dgc_convert.training.data import DataBundle

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
# The OS refusing a path the user gave is bad input; any other OSError (a disk
# that fills up or fails, out of memory or file handles) is the run failing.
_BAD_PATH = (
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
    errno.ELOOP,
)

Command = TypeVar("Command", bound=Callable[..., Any])


def _default(section: type[ConvertSection] | type[ModelSection], key: str) -> str:
    """A setting's default as the schema holds it, for help texts."""
    value = section.model_fields[key].default
    if isinstance(value, bool):
        return "on" if value else "off"
    return "the model's" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


# Options shared by several commands, declared once (help texts name the schema's defaults).
HeadsOption = Annotated[
    int | None,
    typer.Option("--heads", help=f"Heads per converted layer (default {_default(ConvertSection, 'heads')})."),
]
ZetaOption = Annotated[
    float | None,
    typer.Option(
        "--zeta",
        help=f"Pruning ratio: fraction of input channels each head drops, in [0, 1) (default {_default(ConvertSection, 'zeta')}).",
    ),
]
SqueezeRatioOption = Annotated[
    float | None,
    typer.Option(
        "--squeeze-ratio",
        help=f"Saliency generator squeeze ratio d (default {_default(ConvertSection, 'squeeze_ratio')}).",
    ),
]
GatingOption = Annotated[
    str | None,
    typer.Option(
        "--gating",
        help="head: each head keeps its top k channels; network: DGC-G, every channel scoring above one "
        "model-wide threshold, so k varies per sample and MAC figures are expected ones "
        f"(default {_default(ConvertSection, 'gating')}).",
    ),
]
PreactOption = Annotated[
    bool | None,
    typer.Option(
        "--preact/--no-preact",
        help="Give each DGC layer its own BatchNorm + ReLU in front of its gates and convolution, as the "
        f"authors' networks have (default {_default(ConvertSection, 'preact')}).",
    ),
]
SqueezeRuleOption = Annotated[
    str | None,
    typer.Option(
        "--squeeze-rule",
        help="Saliency generator width and init: standard (max(C//d, 4), uniform) or authors (their code's: "
        f"d halved below 80 channels, kaiming normal) (default {_default(ConvertSection, 'squeeze_rule')}).",
    ),
]
MinChannelsOption = Annotated[
    int | None,
    typer.Option(
        "--min-channels",
        help=f"Fewest input channels worth gating (default {_default(ConvertSection, 'min_channels')}).",
    ),
]
SourceOption = Annotated[str | None, typer.Option("--source", help="auto, timm or torchvision (default auto).")]
InputSizeOption = Annotated[
    int | None, typer.Option("--input-size", help="Square input side in pixels (default: the model's).")
]
CheckpointOption = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help=f"Start from trained dense weights: a {', '.join(WEIGHTS_SUFFIXES)} file, or a training run's "
        "last/ or best/ directory holding a dense model (read strictly; pickles only as weights-only). "
        "Wins over the recipe's model.checkpoint.",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a recipe value: KEY.PATH=VALUE (YAML value), e.g. train.epochs=3. Repeatable."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout and nothing else.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Samples per forward.")]
SavedModelArgument = Annotated[
    Path, typer.Argument(help="A saved model (.safetensors) or a training run's last/ or best/ directory.")
]
DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        help="A recipe file (its data section) or a data set: digits, synthetic, cifar10, cifar100, imagefolder.",
    ),
]
RootOption = Annotated[Path | None, typer.Option("--root", help="Data directory for cifar10/cifar100/imagefolder.")]


class _DefaultToConvert(TyperGroup):
    """Route ``dgc-convert MODEL ...`` to the ``convert`` command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's vendored click Context has no public name
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultToConvert,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert timm and torchvision CNNs into Dynamic Group Convolution networks.\n\n"
    "Run `dgc-convert MODEL --heads 4 --zeta 0.5` to convert a model and see the MAC saving.",
)


class _CommandFailed(Exception):
    """A command's one-line failure, printed by ``handles_errors`` once the command's progress
    line is gone (printed while it is shown, the line would be erased with it)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """End the command with ``error: MESSAGE`` on stderr and exit ``code``."""
    raise _CommandFailed(message, code)


def _print_failure(message: str, code: int) -> None:
    from rich.markup import escape  # a message's own brackets (pip install "x[extra]") are text, not markup

    error_console().print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)
    raise typer.Exit(code)


def _internal_error(error: BaseException) -> None:
    """A bug, not bad input: one line, the full traceback in a file, exit 1."""
    with tempfile.NamedTemporaryFile("w", prefix="dgc-convert-error-", suffix=".txt", delete=False) as handle:
        handle.write("".join(traceback.format_exception(error)))
    first = str(error).splitlines()[0] if str(error) else ""
    _print_failure(
        f"internal error ({type(error).__name__}: {first[:200]}); traceback written to {handle.name}", EXIT_RUN_FAILED
    )


def _os_error_exit(error: OSError) -> int:
    """A path the user gave that cannot be written or read (read-only, missing, a file in the way)
    is bad input (2); anything else, a full disk first, is the run failing (1)."""
    return EXIT_BAD_INPUT if error.errno in _BAD_PATH else EXIT_RUN_FAILED


def _os_error_text(error: OSError) -> str:
    """``PATH: what the OS said`` (just the latter when no path is known)."""
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


def handles_errors(command: Command) -> Command:
    """The project's own errors become one line on stderr and exit 2 (a diverged
    run exits 1); anything else is an internal error (exit 1, traceback in a file)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits and usage errors
            raise
        except _CommandFailed as failure:
            _print_failure(failure.message, failure.code)
        except TrainingDiverged as error:
            _print_failure(str(error), EXIT_RUN_FAILED)
        except DGCConvertError as error:
            _print_failure(str(error), EXIT_BAD_INPUT)
        except OSError as error:  # a path the user gave (unwritable, missing: 2), or a full disk (1)
            _print_failure(_os_error_text(error), _os_error_exit(error))
        except KeyboardInterrupt:
            _print_failure("interrupted", EXIT_INTERRUPTED)
        except Exception as error:
            _internal_error(error)

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dgc-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Convert timm and torchvision CNNs into Dynamic Group Convolution networks."""


def _as_trained(recipe: Recipe) -> ModelSection:
    """The recipe's model section as ``train`` builds it: the data set's class count
    and the image size the run trains at, where the section leaves them unset."""
    from dgc_convert.training.data import DataError, dataset_classes
    from dgc_convert.training.setup import recipe_image_size

    spec = recipe.model
    update: dict[str, Any] = {}
    # An image folder that is not there keeps the model's own head.
    if spec.num_classes is None:
        with contextlib.suppress(DataError):
            update["num_classes"] = dataset_classes(recipe.data)
    # train's order: data.image_size first, then model.input_size, then the data set's native size.
    if recipe_image_size(recipe) is not None:
        update["input_size"] = recipe_image_size(recipe)
    return spec.model_copy(update=update)


@app.command("convert", help="Convert MODEL and report, for every convolution, what happened and the MACs saved.")
@handles_errors
def convert_command(
    model: Annotated[
        str | None, typer.Argument(help="Model name (timm or torchvision; timm:NAME / torchvision:NAME to choose).")
    ] = None,
    heads: HeadsOption = None,
    zeta: ZetaOption = None,
    squeeze_ratio: SqueezeRatioOption = None,
    gating: GatingOption = None,
    preact: PreactOption = None,
    squeeze_rule: SqueezeRuleOption = None,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="Glob over module names; only matching convs convert. Repeatable."),
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Glob over module names to leave dense. Repeatable.")
    ] = None,
    min_channels: MinChannelsOption = None,
    input_size: InputSizeOption = None,
    source: SourceOption = None,
    checkpoint: CheckpointOption = None,
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", help="Take model and convert settings from a recipe; options given here win."),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Verify the converted model equals the original at zeta 0 with unit scores.")
    ] = False,
    save_path: Annotated[
        Path | None,
        typer.Option(
            "--save", help="Write the converted (untrained) model to FILE.safetensors; dgc_convert.load opens it."
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    from dgc_convert.conversion.settings import convert_settings, model_settings
    from dgc_convert.measuring.conversion_summary import summarize_conversion
    from dgc_convert.training.recipe import load_recipe

    base_convert: ConvertSection | None = None
    base_model: ModelSection | None = None
    if recipe is not None:
        loaded = load_recipe(recipe)
        if not loaded.convert.enabled:
            _fail(f"{recipe}: convert.enabled is false; nothing to convert")
        base_convert, base_model = loaded.convert, _as_trained(loaded)
    elif model is None:
        _fail("give a MODEL name or --recipe FILE (see `dgc-convert --help`)")
    # The recipe's values, then the options given here: one validation, the schema's.
    model_spec = model_settings(
        base_model, name=model, source=source, input_size=input_size, checkpoint=str(checkpoint) if checkpoint else None
    )
    settings = convert_settings(
        base_convert,
        heads=heads,
        zeta=zeta,
        squeeze_ratio=squeeze_ratio,
        gating=gating,
        preact=preact,
        squeeze_rule=squeeze_rule,
        include=include or None,
        exclude=exclude or None,
        min_channels=min_channels,
    )
    with StepProgress() as progress:
        summary = summarize_conversion(model_spec, settings, check=check, progress=progress)
        saved = None
        if save_path is not None:
            assert summary.converted_model is not None  # summarize_conversion always returns it
            from dgc_convert.conversion.saved_models import save

            progress.step(f"saving to {save_path}")
            saved = save(summary.converted_model, save_path, input_size=summary.input_size)
    if json_output:
        weights = {"checkpoint": model_spec.checkpoint} if model_spec.checkpoint else {}
        print_json({**summary.to_dict(), **weights, **({"saved": str(saved)} if saved else {})})
    else:
        print_conversion(summary)
        if model_spec.checkpoint:
            output_console().print(
                f"started from the weights in {model_spec.checkpoint}", highlight=False, markup=False
            )
        if saved:
            output_console().print(f"saved to {saved} (load it with dgc_convert.load)", highlight=False, markup=False)


@app.command("list-models", help="List model names from timm and torchvision matching PATTERN (glob or substring).")
@handles_errors
def list_models_command(
    pattern: str = typer.Argument("*", help="Glob such as 'resnet*', or a substring."),
    json_output: JsonOption = False,
) -> None:
    from dgc_convert.conversion.zoo import list_models

    models = list_models(pattern)
    if json_output:
        print_json([{"name": n, "library": lib} for n, lib in models])
    elif not models:
        _fail(f"no model matches {pattern!r}")
    else:
        print_model_list(models)


recipe_app = typer.Typer(no_args_is_help=True, help="Check recipe files and show them resolved.")
app.add_typer(recipe_app, name="recipe")


def _resolve_recipe_model(file: Path, spec: ModelSection) -> tuple[str, str]:
    """(bare name, library) the recipe's model.name and model.source resolve to, without building the
    model; an unknown name is one line naming the file, with close matches."""
    from dgc_convert.conversion.zoo import resolve
    from dgc_convert.errors import UnknownModelError

    try:
        bare, library, _ = resolve(spec.name, spec.source)
    except UnknownModelError as error:
        raise UnknownModelError(f"{file}: model.name: {error}") from None
    return bare, library


@recipe_app.command("validate", help="Check FILE against the recipe schema; one line saying what is wrong, or OK.")
@handles_errors
def recipe_validate_command(
    file: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_values: SetOption = None,
) -> None:
    from dgc_convert.conversion.dense_weights import find_weights_file
    from dgc_convert.errors import WeightsFileError
    from dgc_convert.training.recipe import load_recipe

    recipe = load_recipe(file, set_values)
    name, library = _resolve_recipe_model(file, recipe.model)
    weights = ", pretrained" if recipe.model.pretrained else ""
    if recipe.model.checkpoint is not None:
        try:  # exists and is a weights file; read only when a run starts
            find_weights_file(recipe.model.checkpoint)
        except WeightsFileError as error:
            raise WeightsFileError(f"{file}: model.checkpoint: {error}") from None
        weights = f", starting from {recipe.model.checkpoint}"
    c = recipe.convert
    state = (
        "dense baseline"
        if not c.enabled
        else f"DGC heads {c.heads}, zeta {c.zeta:g}"
        + (f", {c.gating} gating" if c.gating != _default(ConvertSection, "gating") else "")
        + (", pre-activation" if c.preact else "")
        + (f", squeeze rule {c.squeeze_rule}" if c.squeeze_rule != _default(ConvertSection, "squeeze_rule") else "")
    )
    typer.echo(
        f"{file}: OK ({name} from {library}{weights}, {state}, {recipe.train.epochs} epochs on {recipe.data.dataset})"
    )


@recipe_app.command(
    "show", help="Print FILE resolved (every default filled in) and its three stages as epoch and iteration ranges."
)
@handles_errors
def recipe_show_command(
    file: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_values: SetOption = None,
    json_output: JsonOption = False,
) -> None:
    from dataclasses import asdict

    from dgc_convert.cli.render import print_recipe
    from dgc_convert.training.data import DataError, train_set_size
    from dgc_convert.training.recipe import load_recipe
    from dgc_convert.training.schedule import Schedule
    from dgc_convert.training.trainer import iterations_per_epoch

    recipe = load_recipe(file, set_values)
    _, library = _resolve_recipe_model(file, recipe.model)  # a name no library builds is an error here too
    t = recipe.train
    try:
        samples: int | None = train_set_size(recipe.data)
    except DataError as error:
        samples, missing = None, str(error)
    # Without the data, stages are still exact in epochs when measured on a fine grid.
    per_epoch = iterations_per_epoch(samples, t.batch_size) if samples is not None else 10_000
    if per_epoch < 1:
        _fail(f"{file}: train.batch_size={t.batch_size} is larger than the {samples} training samples")
    schedule = Schedule.from_train(t, per_epoch)
    stages = [asdict(s) for s in schedule.stages()]
    shown_per_epoch: int | None = per_epoch
    if samples is None:
        for stage in stages:
            stage["start_iteration"] = stage["end_iteration"] = None
        shown_per_epoch = None
    data = recipe.model_dump(mode="json")
    if json_output:
        print_json(
            {
                "recipe": data,
                "library": library,
                "train_samples": samples,
                "iterations_per_epoch": shown_per_epoch,
                "stages": stages,
            }
        )
    else:
        print_recipe(data, stages, shown_per_epoch, samples, note=None if samples is not None else missing)


@app.command("train", help="Train RECIPE from scratch with the three-stage schedule (also under torchrun).")
@handles_errors
def train_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/).")],
    set_values: SetOption = None,
    checkpoint: CheckpointOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from output.directory/last exactly where it stopped.")
    ] = False,
) -> None:
    from dgc_convert.conversion.settings import model_settings
    from dgc_convert.training.progress_bars import TrainProgress
    from dgc_convert.training.recipe import load_recipe
    from dgc_convert.training.trainer import is_main_process, train

    loaded = load_recipe(recipe, set_values)
    if checkpoint is not None:  # as --set model.checkpoint=PATH: part of the recipe a resume must repeat
        loaded = loaded.model_copy(update={"model": model_settings(loaded.model, checkpoint=str(checkpoint))})
    reporter = TrainProgress() if is_main_process() else None
    try:
        result = train(loaded, resume=resume, reporter=reporter)
    except KeyboardInterrupt:
        _fail("aborted before a checkpoint could be written; the last one written (if any) is kept", EXIT_INTERRUPTED)
    finally:  # a run that raised never reached on_finish: its bars go before the error line
        if reporter is not None:
            reporter.close()
    if result.status == "interrupted":
        given = [*[f"--set {v}" for v in set_values or []], *([f"--checkpoint {checkpoint}"] if checkpoint else [])]
        again = " ".join(["dgc-convert train", str(recipe), *given, "--resume"])
        if is_main_process():
            error_console().print(
                f"stopped at epoch {result.epochs_completed + 1}, iteration {result.iteration} of "
                f"{result.total_iterations}; checkpoint written to {result.output_dir / LAST_CHECKPOINT}. Continue with: {again}",
                highlight=False,
                markup=False,
            )
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command(
    "bench", help="Time MODEL (or a trained checkpoint) dense, as DGC computed densely, and on the DGC inference path."
)
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
    from dgc_convert.measuring.bench import BENCH_ENGINES

    if engine not in BENCH_ENGINES:
        raise typer.BadParameter(f"must be one of {', '.join(BENCH_ENGINES)}", param_hint="--engine")
    _require_png(plot, "--plot")
    from dgc_convert.cli.render import print_bench
    from dgc_convert.cli.sources import models_for_bench
    from dgc_convert.conversion.settings import model_settings
    from dgc_convert.measuring.bench import benchmark

    model_settings(name=model, input_size=input_size)  # the schema's bound on --input-size, before any work
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
        dense, dgc, name, default_size = models_for_bench(model, conversion, source=source, input_size=input_size)
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


def _require_png(path: Path | None, option: str) -> None:
    """Pictures are PNGs: another suffix would name a file holding something else."""
    if path is not None and path.suffix.lower() != ".png":
        _fail(f"{option} {path}: must name a .png file")


@app.command(
    "plot",
    help="Draw the curves of one or more training runs on the same axes: top-1, loss, zeta_t and MACs per sample "
    "against epoch (e.g. a DGC run against its dense baseline).",
)
@handles_errors
def plot_command(
    runs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN_DIR", help="Training runs' output directories (each holds metrics.jsonl)."),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="The PNG to write (default: curves.png in the current directory).")
    ] = Path("curves.png"),
) -> None:
    from dgc_convert.files.names import CURVES_FILE, METRICS_FILE
    from dgc_convert.files.plots import read_runs, write_curves

    _require_png(out, "--out")
    curves = read_runs(runs)
    # A run's own curves.png is its trainer's: only the same single run may be redrawn into it.
    target = out.resolve()
    if (
        target.name == CURVES_FILE
        and (target.parent / METRICS_FILE).is_file()
        and [r.resolve() for r in runs] != [target.parent]
    ):
        _fail(f"{out} is the curves picture of the run in {target.parent}; choose another --out")
    written = write_curves(curves, out, title=None if len(curves) == 1 else "training curves")
    console = output_console()
    console.print(f"wrote {written}", highlight=False, markup=False)
    for run in curves:
        console.print(f"  {run.summary}", highlight=False, markup=False)


def _model_and_held_out(
    file: Path, data: str, root: Path | None, progress: Progress
) -> tuple[nn.Module, DataSection, DataBundle]:
    """The saved model at FILE and the held-out split of --data (a recipe file or a data set name)."""
    from pydantic import ValidationError

    from dgc_convert.conversion.saved_models import load
    from dgc_convert.training.data import build_data
    from dgc_convert.training.recipe import load_recipe

    progress.step(f"loading {file}")
    model = load(file)
    info = require_model_info(model)
    if Path(data).suffix in (".yaml", ".yml") or Path(data).is_file():
        section = load_recipe(data).data
    else:
        try:
            section = DataSection.model_validate({"dataset": data, "root": str(root) if root else None})
        except ValidationError as error:  # an unknown data set, or a missing root
            _fail(f"--data {data!r}: {error.errors()[0]['msg'].removeprefix('Value error, ')}")
    progress.step(f"loading the {section.dataset} data")
    bundle = build_data(
        section.model_copy(update={"augmentation": "none"}),
        image_size=info.input_size[-1],
        num_classes=info.num_classes,
        seed=0,
        model=model,
    )
    return model, section, bundle


@app.command("eval", help="Evaluate a saved model on a data set: top-1/top-5 and the MACs per sample it really spent.")
@handles_errors
def eval_command(
    file: SavedModelArgument,
    data: DataOption,
    root: RootOption = None,
    batch_size: BatchSizeOption = 64,
    json_output: JsonOption = False,
) -> None:
    from dgc_convert.cli.render import print_evaluation
    from dgc_convert.conversion.surgery import dgc_layers
    from dgc_convert.measuring.evaluate import evaluate

    with StepProgress() as progress:
        model, section, bundle = _model_and_held_out(file, data, root, progress)
        info = require_model_info(model)
        report = evaluate(model, bundle.val, batch_size=batch_size, input_size=info.input_size, progress=progress)
    # DGC-G: the static figure is the cost expected at the target, not a fixed one.
    expected = any(layer.gating == "network" for _, layer in dgc_layers(model))
    if report.nonfinite_samples:  # on stderr in both modes: --json keeps stdout to the JSON
        error_console().print(
            f"[yellow]warning:[/yellow] {report.nonfinite_samples} of {report.samples} samples gave non-finite "
            f"outputs (NaN/inf logits); accuracy counts them as wrong and the loss is {report.loss:.4g}",
            markup=True,
            highlight=False,
        )
    if json_output:
        print_json({"model": str(file), "data": section.dataset, **report.to_dict(), "static_macs_expected": expected})
    else:
        print_evaluation(report, str(file), section.dataset, expected=expected)


@app.command(
    "inspect", help="How often each head keeps each input channel over a data set: PNG heat maps and a JSON summary."
)
@handles_errors
def inspect_command(
    file: SavedModelArgument,
    data: DataOption,
    out: Annotated[
        Path, typer.Option("--out", help="Directory for the heat maps (one PNG per layer) and summary.json.")
    ],
    root: RootOption = None,
    batch_size: BatchSizeOption = 64,
) -> None:
    from dgc_convert.cli.render import print_channel_usage
    from dgc_convert.measuring.gate_usage import channel_usage, write_heatmaps, write_summary

    with StepProgress() as progress:
        model, section, bundle = _model_and_held_out(file, data, root, progress)
        usage = channel_usage(model, bundle.val, batch_size=batch_size, progress=progress)
        progress.step(f"drawing {len(usage)} heat maps into {out}")
        images = write_heatmaps(usage, out)
        summary = write_summary(usage, out / "summary.json", model=str(file), data=section.dataset)
    console = output_console()
    print_channel_usage(usage, console)
    console.print(
        f"{len(images)} heat maps in {out}/ (heads x input channels, keep frequency over "
        f"{usage[0].samples if usage else 0} samples); summary: {summary}",
        highlight=False,
        markup=False,
    )
    for layer in usage:
        for head, reason in layer.collapsed:
            console.print(f"[yellow]collapsed[/yellow]: {layer.name} head {head}: {reason}", highlight=False)


@app.command(
    "export",
    help="Export a saved model to ONNX with its dynamic gating (TopK, ScatterElements) and check it with onnxruntime.",
)
@handles_errors
def export_command(
    file: SavedModelArgument,
    onnx: Path = typer.Option(..., "--onnx", help="Where to write the .onnx file."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (the installed exporter's supported range)."),
    tolerance: float = typer.Option(
        1e-4, "--tolerance", help="Largest max |onnxruntime - torch|, relative to the output scale."
    ),
    dynamic_size: bool = typer.Option(
        False,
        "--dynamic-size",
        help="Make height and width dynamic too (batch always is); the check then also runs at "
        "1.5x the saved input size, rounded up to a multiple of 32.",
    ),
) -> None:
    from dgc_convert.conversion.saved_models import load
    from dgc_convert.serving.export import ExportReport, check_export_options, export_onnx

    check_export_options(opset, tolerance)  # before loading anything: one line, exit 2
    with StepProgress() as progress:
        progress.step(f"loading {file}")
        model = load(file)  # its own errors name FILE, not the ONNX file
        try:
            report: ExportReport | None = export_onnx(
                model, onnx, opset=opset, tolerance=tolerance, dynamic_size=dynamic_size, progress=progress
            )
        except OSError as error:  # writing the file, e.g. a full disk: nothing was renamed into place
            report, failure = None, error
    if report is None:  # after the progress line is gone
        kept = "the existing file is kept" if onnx.exists() else "nothing was written"
        _fail(f"{onnx}: not written ({kept}): {failure.strerror or failure}", _os_error_exit(failure))
        return
    ops = ", ".join(f"{count} {op}" for op, count in sorted(report.gating_ops.items()))
    diffs = "; ".join(report.diffs_by_size())
    console = output_console()
    # The file is in place only when the parity check passed (report.written).
    what = f"wrote {report.path}" if report.written else f"exported (not written to {report.path})"
    console.print(
        f"{what} (opset {report.opset}; gating kept: {ops or 'no DGC layers'})", highlight=False, markup=False
    )
    # The graph's signature: named dims are dynamic, ints fixed.
    inputs, outputs = (", ".join(map(str, shape)) for shape in (report.input_shape, report.output_shape))
    console.print(
        f"input {report.input_name!r} ({inputs}) -> output {report.output_name!r} ({outputs})", highlight=False
    )
    console.print(
        f"onnxruntime vs PyTorch max |difference| (tolerance {report.tolerance:.1e}), by height x width:",
        highlight=False,
    )
    for line in report.diffs_by_size():
        console.print(f"  {line}", highlight=False)
    if not report.passed:
        kept = "the existing file is kept" if report.path.exists() else "nothing was written"
        _fail(
            f"{report.path}: not written ({kept}): onnxruntime output differs from PyTorch beyond tolerance ({diffs})",
            EXIT_RUN_FAILED,
        )


app.command("import-authors", help=IMPORT_AUTHORS_HELP)(handles_errors(import_authors_command))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
