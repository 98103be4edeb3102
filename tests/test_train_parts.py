"""The trainer's parts on their own: the builder, one epoch, evaluation, and resuming from a checkpoint."""

import json

import pytest
import torch
from torch import nn

from dgc_convert import DGCConv2d
from dgc_convert.errors import DGCConvertError
from dgc_convert.training.checkpoint import RunState, read_checkpoint, save_checkpoint
from dgc_convert.training.distributed import Processes
from dgc_convert.training.events import EpochMetrics, TrainControl, TrainingDiverged
from dgc_convert.training.loop import apply_schedule, train_one_epoch, validate
from dgc_convert.training.recipe import recipe_from_dict
from dgc_convert.training.schedule import Schedule
from dgc_convert.training.setup import build_training, iterations_per_epoch
from dgc_convert.training.trainer import _gather_rng, _kept_metrics, _restore


def make_recipe(directory, **train):
    return recipe_from_dict(
        {
            "model": {"name": "resnet18"},
            "convert": {"heads": 4, "zeta": 0.5},
            "train": {"epochs": 2, "batch_size": 4, "lr": 0.02, **train},
            "data": {"dataset": "synthetic", "synthetic_size": 18, "image_size": 32},
            "output": {"directory": str(directory)},
        }
    )


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        DGCConv2d(16, 16, 3, padding=1, heads=2, zeta=0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def batches(count, size=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 8, 8, generator=generator), torch.randint(0, 4, (size,), generator=generator))
        for _ in range(count)
    ]


def one_epoch(model, loader, schedule, **options):
    optimizer = options.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layers = [m for m in model.modules() if isinstance(m, DGCConv2d)]
    return train_one_epoch(
        model,
        loader,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        criterion=nn.CrossEntropyLoss(),
        schedule=schedule,
        layers=layers,
        **{"epoch": 0, "start_iteration": 0, **options},
    )


@pytest.mark.parametrize(
    ("samples", "batch", "world", "expected"),
    [(18, 4, 1, 4), (64, 16, 2, 4), (65, 16, 2, 4), (10, 6, 3, 1), (4, 8, 1, 0)],
)
def test_iterations_per_epoch_counts_full_global_batches(samples, batch, world, expected):
    assert iterations_per_epoch(samples, batch, world) == expected


def test_the_builder_makes_one_consistent_run(tmp_path):
    recipe = make_recipe(tmp_path, optimizer="sgd", momentum=0.8, weight_decay=0.001)
    setup = build_training(recipe, Processes.single())
    # 18 samples, batch 4: four full batches; the sampler and the schedule agree.
    assert setup.schedule.iterations_per_epoch == 4 == len(setup.sampler) // setup.local_batch
    assert setup.schedule.total_iterations == 8 and setup.schedule.base_lr == 0.02
    assert setup.train_model is setup.model and setup.image_size == 32
    assert len(setup.dgc) == len(setup.report.converted) == 19
    assert setup.dense_macs > 0 and setup.data.num_classes == 10
    assert setup.model.fc.out_features == 10
    [group] = setup.optimizer.param_groups
    assert isinstance(setup.optimizer, torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.8, True, 0.001)
    trainable = [p for p in setup.model.parameters() if p.requires_grad]
    assert len(group["params"]) == len(trainable) and all(
        a is b for a, b in zip(group["params"], trainable, strict=True)
    )
    assert len(list(setup.train_loader(0, skip_batches=3))) == 1  # a resumed epoch's remainder


def test_the_builder_refuses_what_cannot_run(tmp_path):
    with pytest.raises(DGCConvertError, match=r"train\.batch_size=32 is larger than the 18 training samples"):
        build_training(make_recipe(tmp_path, batch_size=32), Processes.single())
    two = Processes(2, 0, 0, torch.device("cpu"), False)
    with pytest.raises(DGCConvertError, match="does not split evenly over 2 processes"):
        build_training(make_recipe(tmp_path, batch_size=5), two)
    with pytest.raises(DGCConvertError, match="sync_batchnorm=true needs GPUs"):
        build_training(make_recipe(tmp_path, sync_batchnorm=True), two)


def test_apply_schedule_sets_every_layers_ratio_and_the_learning_rate():
    model = tiny_model()
    layer = model[3]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = Schedule(1, 10, 0.1, warmup_fraction=0.2, finetune_fraction=0.2)
    assert apply_schedule(schedule, 0, [layer], optimizer) == optimizer.param_groups[0]["lr"] == 0.1
    assert layer.zeta_t_value == 0.0
    apply_schedule(schedule, 5, [layer], optimizer)
    assert layer.zeta_t_value == pytest.approx(0.5 * 0.5) and layer.zeta_t.item() == layer.zeta_t_value
    apply_schedule(schedule, 9, [layer], optimizer)
    assert layer.zeta_t_value == 0.5 and optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr(9))


def test_train_one_epoch_steps_through_the_schedule_and_reports():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    schedule = Schedule(1, 3, 0.1, warmup_fraction=0.0, finetune_fraction=0.0)
    seen, reports = [], []

    class Callback:
        def on_iteration_end(self, control, iteration):
            seen.append((iteration, model[3].zeta_t_value))

    class Reporter:
        def on_iteration(self, stats):
            reports.append(stats)

    figures = one_epoch(
        model, batches(3), schedule, sparsity_lambda=0.01, callbacks=[Callback()], reporter=Reporter(), check_every=2
    )
    assert figures.completed and (figures.iteration, figures.epoch_iteration, figures.steps) == (3, 3, 3)
    assert figures.samples == 12 and 0 <= figures.top1 <= 100 and figures.loss > 0 and figures.sparsity > 0
    assert figures.lr == schedule.lr(2) and figures.images_per_second > 0
    # Each iteration ran at its own ratio: 0, 1/3 and 2/3 of the target 0.5.
    assert [i for i, _ in seen] == [1, 2, 3]
    assert [z for _, z in seen] == pytest.approx([0.0, 0.5 / 3, 1.0 / 3])
    assert [r.epoch_iteration for r in reports] == [2, 3] and reports[-1].iteration == 3  # every 2nd and the last
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert model.training


def test_train_one_epoch_resumes_mid_epoch_and_stops_when_asked():
    schedule = Schedule(2, 6, 0.1)
    control = TrainControl()

    class StopAtFirst:
        def on_iteration_end(self, control, iteration):
            control.request_stop()

    figures = one_epoch(
        tiny_model(),
        batches(4),
        schedule,
        epoch=1,
        start_iteration=8,
        start_epoch_iteration=2,
        control=control,
        callbacks=[StopAtFirst()],
        check_every=2,
    )
    # A stop asked at iteration 9 is acted on at the next check: in-epoch step 4 of 6.
    assert not figures.completed and (figures.iteration, figures.epoch_iteration, figures.steps) == (10, 4, 2)


def test_a_non_finite_loss_raises_at_the_next_check():
    model = tiny_model()

    class Poison:
        def on_iteration_end(self, control, iteration):
            if iteration == 1:
                with torch.no_grad():
                    model[0].weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss became non-finite at epoch 1, iteration 3 \(lr"):
        one_epoch(model, batches(4), Schedule(1, 4, 0.1), callbacks=[Poison()], check_every=3)


def test_validate_scores_in_eval_mode_and_restores_the_mode():
    model = tiny_model().train()
    model[1].momentum = 1.0  # a forward in train mode would change the statistics
    running = model[1].running_mean.clone()
    data = batches(2, size=5)
    loss, top1, top5 = validate(model, data, num_classes=4)
    assert model.training and torch.equal(model[1].running_mean, running)
    assert loss > 0 and top1 in {100.0 * k / 10 for k in range(11)} and top5 is None  # 4 classes: no top-5
    with torch.no_grad():
        model.eval()
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in data)
    assert top1 == pytest.approx(100.0 * hits / 10)


def test_a_checkpoint_restores_weights_optimizer_and_random_streams_exactly(tmp_path):
    """Resume logic without a whole run: one epoch, a checkpoint, a fresh set-up restored from it."""
    recipe = make_recipe(tmp_path)
    processes = Processes.single()

    def fresh():
        torch.manual_seed(0)
        return build_training(recipe, processes)

    def epoch(setup, index, start_iteration):
        return train_one_epoch(
            setup.train_model,
            setup.train_loader(index),
            optimizer=setup.optimizer,
            scaler=setup.scaler,
            criterion=setup.criterion,
            schedule=setup.schedule,
            layers=setup.dgc,
            epoch=index,
            start_iteration=start_iteration,
            sparsity_lambda=recipe.train.sparsity_lambda,
        )

    setup = fresh()
    epoch(setup, 0, 0)
    state = RunState(
        status="running",
        recipe=recipe.model_dump(mode="json"),
        epochs_completed=1,
        iteration=4,
        epoch_iteration=0,
        iterations_per_epoch=4,
        total_iterations=8,
        progress=0.5,
        zeta_fraction=setup.schedule.zeta_fraction(4),
        zeta_t={},
        image_size=32,
        num_classes=10,
        world_size=1,
        best_top1=None,
        metrics=None,
        wall_seconds=7.5,
    )
    save_checkpoint(
        tmp_path / "last",
        model=setup.model,
        state=state,
        training_state={
            "optimizer": setup.optimizer.state_dict(),
            "scaler": setup.scaler.state_dict(),
            "rng": _gather_rng(processes),
        },
    )
    # metrics.jsonl holds a line of an epoch the checkpoint does not cover: it goes.
    row = {name: 0 for name in EpochMetrics.__dataclass_fields__}
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({**row, "epoch": 1}) + "\n" + json.dumps({**row, "epoch": 2}) + "\n"
    )
    epoch(setup, 1, 4)  # the uninterrupted second epoch

    resumed = fresh()
    checkpoint = read_checkpoint(tmp_path / "last")
    progress = _restore(resumed, checkpoint, checkpoint.run_state(), tmp_path, None, started=0.0)
    assert (progress.epochs_completed, progress.iteration, progress.epoch_iteration) == (1, 4, 0)
    assert progress.wall_before == 7.5 and [m.epoch for m in progress.metrics] == [1]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert set(resumed.optimizer.state_dict()["state"]) == set(setup.optimizer.state_dict()["state"])
    epoch(resumed, 1, 4)
    for (name, a), b in zip(setup.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_kept_metrics_skips_damaged_lines_and_leaves_the_file_alone_when_asked(tmp_path):
    row = {name: 0 for name in EpochMetrics.__dataclass_fields__}
    path = tmp_path / "metrics.jsonl"
    text = json.dumps({**row, "epoch": 1}) + "\n{not json\n" + json.dumps({**row, "epoch": 3}) + "\n"
    path.write_text(text)
    assert [m.epoch for m in _kept_metrics(path, 2, rewrite=False)] == [1]
    assert path.read_text() == text
    assert _kept_metrics(tmp_path / "missing.jsonl", 2, rewrite=True) == []


def test_resuming_a_checkpoint_from_before_blocked_heads_keeps_its_interleaved_layers(tmp_path):
    """A checkpoint written before blocked head ownership: its weights are read in the layout they were trained in."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    recipe = make_recipe(tmp_path)
    processes = Processes.single()
    torch.manual_seed(0)
    setup = build_training(recipe, processes)
    state = RunState(
        status="running", recipe=recipe.model_dump(mode="json"), epochs_completed=0, iteration=0, epoch_iteration=0,
        iterations_per_epoch=4, total_iterations=8, progress=0.0, zeta_fraction=0.0, zeta_t={}, image_size=32,
        num_classes=10, world_size=1, best_top1=None, metrics=None, wall_seconds=0.0,
    )  # fmt: skip
    training = {
        "optimizer": setup.optimizer.state_dict(),
        "scaler": setup.scaler.state_dict(),
        "rng": _gather_rng(processes),
    }
    directory = save_checkpoint(tmp_path / "last", model=setup.model, state=state, training_state=training)
    # Rewrite the weights file as the old trainer wrote it: no layout in the per-layer entries.
    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iterator
    entries = json.loads(metadata["conversion"])
    assert entries and all(entry.pop("layout") == "blocked" for entry in entries)
    save_file(tensors, str(path), metadata={**metadata, "conversion": json.dumps(entries)})

    torch.manual_seed(0)
    resumed = build_training(recipe, processes)
    assert not any(layer.interleaved for layer in resumed.dgc)
    checkpoint = read_checkpoint(directory)
    _restore(resumed, checkpoint, checkpoint.run_state(), tmp_path, None, started=0.0)
    assert resumed.dgc and all(layer.interleaved for layer in resumed.dgc)


def test_the_memory_refusal_halves_under_autocast_and_counts_every_process_on_the_host(monkeypatch):
    import dgc_convert.training.setup as train_setup
    from dgc_convert.training.recipe import TrainSection

    monkeypatch.setattr(train_setup, "available_memory", lambda device: 3 << 30)
    per_sample = 1 << 30  # 4 GiB at batch 4
    alone = Processes.single()
    with pytest.raises(DGCConvertError, match=r"would keep at least 4\.0 GiB of activations and 3\.0 GiB is available"):
        train_setup._refuse_what_cannot_fit(per_sample, 64, TrainSection(batch_size=4), alone)
    train_setup._refuse_what_cannot_fit(per_sample, 64, TrainSection(batch_size=4, amp="bf16"), alone)  # 2 GiB
    two_on_this_host = Processes(1, 0, 0, torch.device("cpu"), False, local_world_size=2)
    with pytest.raises(DGCConvertError, match=r"at least 4\.0 GiB"):
        train_setup._refuse_what_cannot_fit(per_sample, 64, TrainSection(batch_size=4, amp="bf16"), two_on_this_host)
