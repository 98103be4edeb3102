"""Reporters and callbacks: ``TrainCallback`` subclasses are called directly, duck-typed objects are
adapted once when the run starts, and an object that could never hear anything is refused in one line."""

import pytest

from dgc_convert import TrainCallback, TrainProgress
from dgc_convert.training.adapters import Callbacks, DuckReporter, as_reporter, message_sink
from dgc_convert.training.events import TrainControl
from dgc_convert.training.recipe import recipe_from_dict
from dgc_convert.training.trainer import train
from dgc_convert.training.watch import Reporters


def tiny_recipe(directory, epochs=1):
    return recipe_from_dict(
        {
            "model": {"name": "resnet18"},
            "convert": {"heads": 4, "zeta": 0.5},
            "train": {"epochs": epochs, "batch_size": 8, "lr": 0.02},
            "data": {"dataset": "synthetic", "synthetic_size": 16, "image_size": 32},
            "output": {"directory": str(directory)},
        }
    )


class ReadmeReporter:
    """The README's duck-typed reporter: no base class, only some of the methods."""

    def __init__(self):
        self.events = []

    def on_start(self, info):
        self.events.append(("start", info.epochs))

    def on_epoch(self, metrics):
        self.events.append(("epoch", metrics.epoch))

    def on_finish(self, result):
        self.events.append(("finish", result.status))


def test_a_duck_typed_reporter_still_receives_the_events_it_has_methods_for(tmp_path):
    duck = ReadmeReporter()
    result = train(tiny_recipe(tmp_path / "run", epochs=2), reporter=duck)
    assert result.status == "finished"
    assert duck.events == [("start", 2), ("epoch", 1), ("epoch", 2), ("finish", "finished")]


def test_a_train_callback_subclass_gets_the_events_it_overrides(tmp_path):
    class Iterations(TrainCallback):
        def __init__(self):
            self.iterations, self.epochs = [], []

        def on_iteration(self, stats):
            self.iterations.append(stats.iteration)

        def on_epoch(self, metrics):
            self.epochs.append(metrics.epoch)

    reporter = Iterations()
    assert as_reporter(reporter) is reporter  # used as it is, not wrapped
    train(tiny_recipe(tmp_path / "run"), reporter=reporter)
    assert reporter.epochs == [1] and reporter.iterations[-1] == 2  # 16 samples, batch 8: 2 iterations


@pytest.mark.parametrize("reporter", [object(), TrainControl(), "progress"])
def test_an_object_with_no_reporter_method_is_refused_in_one_line_before_anything_runs(tmp_path, reporter):
    with pytest.raises(TypeError) as refused:
        train(tiny_recipe(tmp_path / "run"), reporter=reporter)
    message = str(refused.value)
    assert "\n" not in message
    assert type(reporter).__name__ in message and "on_start" in message and "TrainCallback" in message
    assert not (tmp_path / "run").exists()  # refused before the output directory was made


def test_a_callback_with_neither_hook_is_refused_and_a_reporter_there_is_pointed_to_reporter(tmp_path):
    with pytest.raises(TypeError, match=r"^callbacks\[0\] \(TrainProgress\) has neither .*reporter=$"):
        train(tiny_recipe(tmp_path / "run"), callbacks=[TrainProgress(bars=False)])
    with pytest.raises(TypeError, match=r"^callbacks\[1\] \(object\) has neither on_iteration_end nor on_epoch_end$"):
        Callbacks.of([type("Stop", (), {"on_epoch_end": print})(), object()])
    assert not (tmp_path / "run").exists()


def test_a_duck_reporter_is_looked_up_once_not_at_every_event():
    looked_up = []

    class Counting:
        def __getattribute__(self, name):
            looked_up.append(name)
            return object.__getattribute__(self, name)

        def on_message(self, text):
            received.append(text)

    received = []
    adapted = as_reporter(Counting())
    assert isinstance(adapted, DuckReporter)
    at_adaptation = len(looked_up)
    for _ in range(3):
        adapted.on_message("note")
        adapted.on_epoch(None)  # no method: nothing happens, nothing is looked up
    assert received == ["note"] * 3
    assert len(looked_up) == at_adaptation  # every event a plain call, no attribute lookup by name


def test_callbacks_are_bound_once_and_called_in_order():
    calls = []

    class Both:
        def on_iteration_end(self, control, iteration):
            calls.append(("iteration", iteration))

        def on_epoch_end(self, control, metrics):
            calls.append(("epoch", metrics))

    class EpochOnly:
        def on_epoch_end(self, control, metrics):
            calls.append(("epoch only", metrics))

    hooks = Callbacks.of([Both(), EpochOnly()])
    assert Callbacks.of(hooks) is hooks
    hooks.iteration_ended(TrainControl(), 7)
    hooks.epoch_ended(TrainControl(), "m")
    assert calls == [("iteration", 7), ("epoch", "m"), ("epoch only", "m")]


def test_messages_go_to_a_reporter_that_takes_them_and_elsewhere_otherwise():
    class Talks(TrainCallback):
        def on_message(self, text):
            pass

    class Silent(TrainCallback):
        pass

    class DuckWithout:
        def on_epoch(self, metrics):
            pass

    talks = Talks()
    assert message_sink(talks) == talks.on_message
    assert message_sink(Silent()) is None
    assert message_sink(as_reporter(None)) is None
    assert message_sink(as_reporter(DuckWithout())) is None


def test_the_fan_out_sends_every_event_to_each_and_closes_only_the_watchers():
    class Recording(TrainCallback):
        def __init__(self, name, log):
            self.name, self.log = name, log

        def on_message(self, text):
            self.log.append((self.name, text))

        def close(self):
            self.log.append((self.name, "closed"))

    log = []
    fan = Reporters(Recording("caller", log), [Recording("curves", log), Recording("tensorboard", log)])
    fan.on_message("hello")
    fan.close()
    assert log == [
        ("caller", "hello"),
        ("curves", "hello"),
        ("tensorboard", "hello"),
        ("curves", "closed"),
        ("tensorboard", "closed"),
    ]
