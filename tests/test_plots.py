"""Watching training: curves.png after every epoch, TensorBoard scalars across a resume,
`dgc-convert plot` over several runs, and `bench --plot`."""

import json

import pytest
from matplotlib.figure import Figure
from PIL import Image
from typer.testing import CliRunner

from dgc_convert.cli import app
from dgc_convert.files.names import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR
from dgc_convert.files.plots import CURVES_DPI, CURVES_SIZE, new_figure, read_metrics, read_runs, save_png, write_curves
from dgc_convert.training.recipe import recipe_from_dict
from dgc_convert.training.trainer import train
from dgc_convert.training.watch import CurvesWriter

runner = CliRunner()
CURVES_PIXELS = (int(CURVES_SIZE[0] * CURVES_DPI), int(CURVES_SIZE[1] * CURVES_DPI))
ITERATIONS_PER_EPOCH = 2  # 16 synthetic samples, batch 8


def tiny_recipe(directory, tensorboard=True):
    return recipe_from_dict(
        {
            "model": {"name": "resnet18"},
            "convert": {"heads": 4, "zeta": 0.5},
            "train": {"epochs": 2, "batch_size": 8, "lr": 0.02, "deterministic": True, "tensorboard": tensorboard},
            "data": {"dataset": "synthetic", "synthetic_size": 16, "image_size": 16},
            "output": {"directory": str(directory)},
        }
    )


class Crash(RuntimeError):
    pass


class WatchCurves:
    """Callback: keep curves.png's bytes after every epoch; crash (an exception, as a killed
    process would leave things) after a given epoch was recorded but before its checkpoint."""

    def __init__(self, directory, crash_after=None):
        self.path = directory / CURVES_FILE
        self.crash_after = crash_after
        self.pictures = []

    def on_epoch_end(self, control, metrics):
        self.pictures.append(self.path.read_bytes())
        if metrics.epoch == self.crash_after:
            raise Crash(f"crashed after epoch {metrics.epoch}")


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """A 2-epoch run with TensorBoard that crashes after epoch 2 was logged (its checkpoint
    unwritten), then resumed from epoch 1's checkpoint to the end."""
    directory = tmp_path_factory.mktemp("watched") / "run"
    first = WatchCurves(directory, crash_after=2)
    with pytest.raises(Crash):
        train(tiny_recipe(directory), callbacks=[first])
    second = WatchCurves(directory)
    result = train(tiny_recipe(directory), resume=True, callbacks=[second])
    assert result.status == "finished" and result.epochs_completed == 2
    return directory, first, second


def assert_png(path_or_bytes, size):
    import io

    image = Image.open(io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes)
    assert image.format == "PNG" and image.size == size
    low, high = image.convert("L").getextrema()
    assert high - low > 100  # drawn on, not a blank page
    return image


def test_curves_png_is_redrawn_after_every_epoch_and_covers_the_epochs_before_a_resume(crashed_and_resumed):
    directory, first, second = crashed_and_resumed
    assert len(first.pictures) == 2 and first.pictures[0] != first.pictures[1]
    for picture in first.pictures:
        assert_png(picture, CURVES_PIXELS)
    # The resumed session redrew epoch 2 over a picture holding epoch 1 from before the resume.
    assert len(second.pictures) == 1
    assert_png(directory / CURVES_FILE, CURVES_PIXELS)
    assert [row["epoch"] for row in read_metrics(directory / METRICS_FILE)] == [1, 2]
    assert not list(directory.glob(f".{CURVES_FILE}.*"))  # no temporary file left behind


def test_tensorboard_scalars_have_every_step_once_after_a_resume(crashed_and_resumed):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    directory, _, _ = crashed_and_resumed
    logs = directory / TENSORBOARD_DIR
    files = sorted(logs.glob("events.out.tfevents.*"))
    assert len(files) == 2  # one per session
    # The crashed session had written epoch 2 already; the resumed one wrote it again...
    raw = [
        event.step
        for file in files
        for event in EventFileLoader(str(file)).Load()
        if any(value.tag == "epoch/val_top1" for value in event.summary.value)
    ]
    assert raw == [2, 4, 4]
    # ... and TensorBoard shows it once: the second session's restart marker purges the first's.
    accumulator = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"iteration/loss", "iteration/lr", "iteration/zeta_t", "iteration/train_top1"} <= tags
    assert {"epoch/val_top1", "epoch/train_top1", "epoch/val_loss", "epoch/zeta_t", "epoch/macs"} <= tags
    assert {"epoch/wall_seconds", "epoch/lr", "epoch/dense_macs"} <= tags
    assert "epoch/epoch" not in tags and "iteration/iteration" not in tags  # counters are the steps
    for tag in tags:
        assert [s.step for s in accumulator.Scalars(tag)] == [ITERATIONS_PER_EPOCH, 2 * ITERATIONS_PER_EPOCH], tag
    rows = read_metrics(directory / METRICS_FILE)
    assert [s.value for s in accumulator.Scalars("epoch/macs")] == [row["macs"] for row in rows]
    assert accumulator.Scalars("epoch/zeta_t")[-1].value == pytest.approx(0.5)


def test_resuming_may_switch_tensorboard_off(crashed_and_resumed):
    directory, _, _ = crashed_and_resumed
    result = train(tiny_recipe(directory, tensorboard=False), resume=True)
    assert result.status == "finished"  # the recipes differ only in train.tensorboard


def metrics_row(epoch, epochs=3, **changes):
    row = {
        "epoch": epoch,
        "iteration": 10 * epoch,
        "progress": epoch / epochs,
        "stage": "ramp",
        "lr": 0.1 / epoch,
        "zeta_t": 0.5 * epoch / epochs,
        "train_loss": 2.0 / epoch,
        "train_top1": 30.0 * epoch,
        "sparsity": 70.0,
        "val_loss": 2.2 / epoch,
        "val_top1": 28.0 * epoch,
        "val_top5": 90.0,
        "macs": int(37e6 * (1 - 0.45 * epoch / epochs)),
        "dense_macs": 37_000_000,
        "images_per_second": 250.0,
        "epoch_seconds": 6.0,
        "wall_seconds": 6.0 * epoch,
    }
    return {**row, **changes}


def hand_written_run(directory, enabled, epochs=3):
    directory.mkdir(parents=True)
    (directory / METRICS_FILE).write_text(
        "".join(json.dumps(metrics_row(e, epochs)) + "\n" for e in range(1, epochs + 1))
    )
    (directory / "recipe.yaml").write_text(f"model: {{name: resnet18}}\nconvert: {{enabled: {str(enabled).lower()}}}\n")
    return directory


def test_plot_draws_several_runs_and_names_them(crashed_and_resumed, tmp_path):
    trained, _, _ = crashed_and_resumed
    dgc = hand_written_run(tmp_path / "digits-dgc", enabled=True)
    dense = hand_written_run(tmp_path / "digits-dense", enabled=False)
    out = tmp_path / "compare" / "both.png"
    result = runner.invoke(app, ["plot", str(dgc), str(dense), str(trained), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert "digits-dgc (DGC): 3 epochs, held-out top-1 84.00%, 18 s" in result.stdout
    assert "digits-dense (dense): 3 epochs" in result.stdout and "run (DGC): 2 epochs" in result.stdout
    assert_png(out, CURVES_PIXELS)


def test_plot_refuses_a_directory_without_metrics_and_a_runs_own_picture(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = hand_written_run(tmp_path / "run", enabled=True)
    missing = runner.invoke(app, ["plot", str(run), str(empty), "--out", str(tmp_path / "x.png")])
    assert missing.exit_code == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: {empty}: no metrics.jsonl (not a training run's output directory)"
    ]
    assert not (tmp_path / "x.png").exists()
    other = hand_written_run(tmp_path / "other", enabled=False)
    clobber = runner.invoke(app, ["plot", str(run), str(other), "--out", str(other / CURVES_FILE)])
    assert clobber.exit_code == 2 and "is the curves picture of the run in" in clobber.stderr
    assert not (other / CURVES_FILE).exists()
    # Redrawing one run into its own picture is what its trainer does: allowed.
    again = runner.invoke(app, ["plot", str(run), "--out", str(run / CURVES_FILE)])
    assert again.exit_code == 0, again.output
    wrong = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "x.jpg")])
    assert wrong.stderr.strip() == f"error: --out {tmp_path / 'x.jpg'}: must name a .png file"


def test_runs_of_the_same_name_are_told_apart_and_metrics_files_are_read_leniently(tmp_path):
    a = hand_written_run(tmp_path / "a" / "run", enabled=True)
    b = hand_written_run(tmp_path / "b" / "run", enabled=False)
    with open(b / METRICS_FILE, "a") as handle:  # epoch 3 recorded again, then a line being written
        handle.write(json.dumps(metrics_row(3, val_top1=99.0)) + '\n{"epoch": 4, "val_')
    runs = read_runs([a, b])
    assert [run.label for run in runs] == ["a/run (DGC)", "b/run (dense)"]
    assert [row["epoch"] for row in runs[1].rows] == [1, 2, 3] and runs[1].final_top1 == 99.0


def test_save_png_is_atomic(tmp_path):
    path = tmp_path / "picture.png"
    figure = new_figure((2.0, 1.0))
    figure.subplots().plot([0, 1], [1, 0])
    save_png(figure, path, dpi=50)
    before = path.read_bytes()
    assert Image.open(path).size == (100, 50)

    class Broken(Figure):
        def savefig(self, handle, **kwargs):
            handle.write(b"\x89PNG half a picture")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_png(Broken(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]


def test_a_picture_that_cannot_be_drawn_warns_once_and_training_goes_on(tmp_path):
    warnings = []
    writer = CurvesWriter(tmp_path / "no-run", warn=warnings.append)
    writer.on_epoch(None)
    writer.on_epoch(None)
    assert len(warnings) == 1 and "could not draw" in warnings[0] and "training goes on" in warnings[0]
    assert writer.writes == 0
    run = hand_written_run(tmp_path / "run", enabled=True)
    write_curves(read_runs([run]), run / CURVES_FILE)
    assert_png(run / CURVES_FILE, CURVES_PIXELS)


def test_bench_plot_times_every_layer_even_without_the_table(tmp_path):
    out = tmp_path / "layers.png"
    result = runner.invoke(
        app,
        [
            "bench",
            "resnet18",
            "--input-size",
            "32",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--layers",
            "0",
            "--engine",
            "eager",
            "--threads",
            "1",
            "--plot",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"per-layer times drawn to {out}" in result.stdout
    image = assert_png(out, Image.open(out).size)
    assert image.size[0] == 900 and image.size[1] > 600  # 9 inches wide, taller with 20 convolutions
