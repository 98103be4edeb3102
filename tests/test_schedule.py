"""The three-stage schedule: stage boundaries, zeta_t and lr at chosen iterations."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgc_convert.training.schedule import Schedule, cosine_lr, stage_at, zeta_fraction


def paper_schedule(epochs=12, per_epoch=100, ramp="linear"):
    return Schedule(epochs, per_epoch, base_lr=0.1, warmup_fraction=1 / 12, finetune_fraction=1 / 4, zeta_ramp=ramp)


def test_stage_boundaries_of_the_paper_schedule():
    s = paper_schedule()  # 1200 iterations: warm-up 0-99, ramp 100-899, fine-tune 900-1199
    assert s.total_iterations == 1200
    assert [s.stage(i) for i in (0, 99, 100, 899, 900, 1199)] == [
        "warmup",
        "warmup",
        "ramp",
        "ramp",
        "finetune",
        "finetune",
    ]
    warmup, ramp, finetune = s.stages()
    assert (warmup.start_iteration, warmup.end_iteration, warmup.first_epoch, warmup.last_epoch) == (0, 100, 1, 1)
    assert (ramp.start_iteration, ramp.end_iteration, ramp.first_epoch, ramp.last_epoch) == (100, 900, 2, 9)
    assert (finetune.start_iteration, finetune.end_iteration, finetune.first_epoch, finetune.last_epoch) == (
        900,
        1200,
        10,
        12,
    )


def test_zeta_values_at_chosen_iterations_linear():
    s = paper_schedule()
    assert s.zeta_fraction(0) == 0.0
    assert s.zeta_fraction(99) == 0.0
    assert s.zeta_fraction(100) == 0.0  # the ramp starts at zero
    assert s.zeta_fraction(500) == pytest.approx(0.5)  # halfway through 100..900
    assert s.zeta_fraction(300) == pytest.approx(0.25)
    assert s.zeta_fraction(899) == pytest.approx(799 / 800)
    assert s.zeta_fraction(900) == 1.0
    assert s.zeta_fraction(1200) == 1.0  # after the last iteration: the target


def test_zeta_values_cosine_ramp():
    s = paper_schedule(ramp="cosine")
    assert s.zeta_fraction(100) == pytest.approx(0.0)
    assert s.zeta_fraction(500) == pytest.approx(0.5)
    assert s.zeta_fraction(300) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert s.zeta_fraction(900) == 1.0


def test_cosine_learning_rate_at_chosen_iterations():
    s = paper_schedule()
    assert s.lr(0) == pytest.approx(0.1)
    assert s.lr(600) == pytest.approx(0.05)
    assert s.lr(300) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert s.lr(1200) == pytest.approx(0.0)
    assert cosine_lr(1.5, 0.1) == pytest.approx(0.0)  # clamped


def test_stages_on_an_uneven_run_match_stage_at():
    s = Schedule(epochs=5, iterations_per_epoch=7, base_lr=1.0)  # 35 iterations; 35/12 is not whole
    ranges = s.stages()
    for r in ranges:
        for i in range(r.start_iteration, r.end_iteration):
            assert s.stage(i) == r.stage
    assert sum(r.iterations for r in ranges) == 35
    assert ranges[0].end_iteration == 3  # first i with i/35 >= 1/12 is 3 (2.92 rounds up)


def test_empty_stages():
    s = Schedule(epochs=2, iterations_per_epoch=4, base_lr=0.1, warmup_fraction=0.0, finetune_fraction=0.0)
    warmup, ramp, finetune = s.stages()
    assert warmup.iterations == 0 and finetune.iterations == 0 and ramp.iterations == 8
    s = Schedule(epochs=2, iterations_per_epoch=4, base_lr=0.1, warmup_fraction=0.5, finetune_fraction=0.5)
    assert s.stages()[1].iterations == 0
    assert s.zeta_fraction(3) == 0.0 and s.zeta_fraction(4) == 1.0


def test_bad_schedule_lengths():
    with pytest.raises(ValueError, match="at least one epoch"):
        Schedule(epochs=0, iterations_per_epoch=3, base_lr=0.1)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0, 1),
    st.floats(0, 0.5),
    st.floats(0, 0.5),
    st.sampled_from(["linear", "cosine"]),
)
def test_zeta_fraction_is_monotonic_and_bounded(p, warmup, finetune, ramp):
    value = zeta_fraction(p, warmup, finetune, ramp)
    assert 0.0 <= value <= 1.0
    later = zeta_fraction(min(1.0, p + 0.01), warmup, finetune, ramp)
    assert later >= value - 1e-12
    assert (value == 0.0) if stage_at(p, warmup, finetune) == "warmup" else True
    assert (value == 1.0) if stage_at(p, warmup, finetune) == "finetune" else True
