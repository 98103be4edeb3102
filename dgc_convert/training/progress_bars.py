"""``TrainProgress``: a training run's progress as rich bars on a terminal, plain lines otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape  # names and paths are text: "runs/[best]" is no markup

from dgc_convert.display import format_macs, output_console
from dgc_convert.files.names import BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_FILE
from dgc_convert.training.events import TrainCallback

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from dgc_convert.training.events import EpochMetrics, IterationStats, RunInfo, TrainResult

__all__ = ["TrainProgress", "epoch_line", "stage_rows"]


def stage_rows(stages: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(stage, epochs, iterations, what zeta_t does) for each stage of a run's schedule, as rows to print."""
    descriptions = {"warmup": "zeta_t = 0 (dense)", "ramp": "zeta_t rises to the target", "finetune": "zeta_t = target"}
    rows = []
    for s in stages:
        empty = s["first_epoch"] > s["last_epoch"]
        if empty:
            rows.append((s["stage"], "-", "(empty)", descriptions[s["stage"]]))
            continue
        epochs = (
            f"{s['first_epoch']}" if s["first_epoch"] == s["last_epoch"] else f"{s['first_epoch']}-{s['last_epoch']}"
        )
        iterations = "?" if s["start_iteration"] is None else f"{s['start_iteration']}-{s['end_iteration'] - 1}"
        rows.append((s["stage"], epochs, iterations, descriptions[s["stage"]]))
    return rows


def epoch_line(m: EpochMetrics, total_epochs: int | None = None, expected: bool = False) -> str:
    """One finished epoch; ``expected``: a network-gated model, whose MACs are an expectation."""
    of = f"/{total_epochs}" if total_epochs else ""
    top5 = f" (top-5 {m.val_top5:.1f}%)" if m.val_top5 is not None else ""
    saving = f" (-{(1 - m.macs / m.dense_macs) * 100:.0f}%)" if m.dense_macs and m.macs < m.dense_macs else ""
    return (
        f"epoch {m.epoch}{of} {m.stage:<8} loss {m.train_loss:.4f}  train {m.train_top1:.1f}%  "
        f"val {m.val_top1:.2f}%{top5}  zeta_t {m.zeta_t:.3f}  lr {m.lr:.4g}  "
        f"{m.images_per_second:.0f} img/s  MACs {format_macs(m.macs)}{' expected' if expected else ''}{saving}  "
        f"{m.epoch_seconds:.1f} s"
    )


class TrainProgress(TrainCallback):
    """Training reporter: rich progress bars on a terminal, plain lines otherwise.

    Bars show epoch, loss, accuracy, zeta_t, lr and images/s; each finished
    epoch leaves one line above them. Without a terminal (CI, ``| tee``) only
    the lines are written, so logs stay readable.
    """

    def __init__(self, console: Console | None = None, *, bars: bool | None = None) -> None:
        self.console = console or output_console()
        self.bars = self.console.is_terminal if bars is None else bars
        self.progress: Progress | None = None
        self.run_task: TaskID | None = None
        self.epoch_task: TaskID | None = None
        self.epochs = 0
        self.macs_expected = False  # network-gated (DGC-G) run: MAC figures are expected costs

    def on_start(self, info: RunInfo) -> None:
        """Print what the run does; open the bars."""
        self.epochs = info.epochs
        self.macs_expected = info.macs_expected
        resumed = f", resuming after iteration {info.start_iteration}" if info.start_iteration else ""
        procs = f" on {info.world_size} processes" if info.world_size > 1 else ""
        self.console.print(
            f"training [bold]{escape(info.model)}[/bold] ({info.converted_layers} DGC layers) on {info.dataset} "
            f"({info.train_samples} train / {info.val_samples} held out, {info.image_size}x{info.image_size}, "
            f"{info.num_classes} classes) on {info.device}{procs}{resumed}"
        )
        self.console.print(
            f"{info.epochs} epoch{'s' if info.epochs != 1 else ''} x {info.iterations_per_epoch} iterations; MACs per sample: dense "
            f"{format_macs(info.dense_macs)}, {'expected ' if info.macs_expected else ''}at target "
            f"{format_macs(info.target_macs)}; writing to {escape(str(info.output_dir))}"
        )
        stages = ", ".join(f"{s} {e}" for s, e, _, _ in stage_rows(info.stages) if e != "-")
        self.console.print(f"stages by epoch: {stages}")
        if self.bars:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[figures]}"),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            total = info.epochs * info.iterations_per_epoch
            self.run_task = self.progress.add_task("run", total=total, completed=info.start_iteration, figures="")
            self.epoch_task = self.progress.add_task(
                f"epoch {info.start_epoch + 1}/{info.epochs}",
                total=info.iterations_per_epoch,
                completed=info.start_iteration - info.start_epoch * info.iterations_per_epoch,
                figures="",
            )

    def on_iteration(self, stats: IterationStats) -> None:
        """Advance the bars with the running loss, accuracy, zeta_t, lr and images/s."""
        if self.progress is None or self.run_task is None or self.epoch_task is None:
            return
        figures = (
            f"loss {stats.loss:.4f} acc {stats.train_top1:.1f}% zeta_t {stats.zeta_t:.3f} "
            f"lr {stats.lr:.4g} {stats.images_per_second:.0f} img/s"
        )
        self.progress.update(self.run_task, completed=stats.iteration)
        self.progress.update(
            self.epoch_task,
            description=f"epoch {stats.epoch}/{self.epochs}",
            completed=stats.epoch_iteration,
            figures=figures,
        )

    def on_epoch(self, metrics: EpochMetrics) -> None:
        """One line per finished epoch."""
        self.console.print(epoch_line(metrics, self.epochs, self.macs_expected), markup=False, highlight=False)
        if self.progress is not None and self.epoch_task is not None:
            self.progress.reset(self.epoch_task, description=f"epoch {metrics.epoch + 1}/{self.epochs}", figures="")

    def on_message(self, text: str) -> None:
        """A note from the trainer (resuming, stopping, ...)."""
        self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        """Stop the bars (idempotent): at the end of a run, also one that raised."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_finish(self, result: TrainResult) -> None:
        """Close the bars and sum up."""
        self.close()
        final = result.final
        if result.status == "finished":
            expected = " (expected)" if self.macs_expected else ""
            figures = (
                f": held-out top-1 {final.val_top1:.2f}% at {format_macs(final.macs)} MACs{expected}" if final else ""
            )
            best = f", best at target {result.best_top1:.2f}%" if result.best_top1 is not None else ""
            plural = "s" if result.epochs_completed != 1 else ""
            self.console.print(
                f"finished {result.epochs_completed} epoch{plural} in {result.wall_seconds:.0f} s{figures}{best}"
            )
            self.console.print(
                f"checkpoints: {result.output_dir / LAST_CHECKPOINT}, {result.output_dir / BEST_CHECKPOINT}; "
                f"metrics: {result.output_dir / METRICS_FILE}",
                markup=False,
            )
