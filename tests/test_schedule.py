"""Warmup-stable-decay schedule: shape properties, continuity, accelerated decay."""
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from qwen3repro.config import ConfigError
from qwen3repro.train.schedule import DECAY_SHAPES, WSDSchedule, decay_curve, wsd_lr


@st.composite
def schedules(draw, **fixed):
    total = draw(st.integers(1, 400))
    warmup = draw(st.integers(0, total))
    decay_end = draw(st.one_of(st.none(), st.integers(0, total)))
    end = total if decay_end is None else decay_end
    decay_start = draw(st.one_of(st.none(), st.integers(0, end)))
    return WSDSchedule(
        base_lr=draw(st.floats(1e-5, 1.0)),
        total_steps=total,
        warmup_steps=warmup,
        decay_fraction=draw(st.floats(0.0, 1.0)),
        decay_start=decay_start,
        decay_end=decay_end,
        min_lr_ratio=draw(st.floats(0.0, 1.0)),
        decay_shape=fixed.get("shape") or draw(st.sampled_from(DECAY_SHAPES)),
    )


EPS = 1e-12


@given(schedules())
def test_range_and_phases(s):
    start, end = s.decay_window
    mults = [s.multiplier(k) for k in range(s.total_steps)]
    assert all(0.0 <= m <= 1.0 + EPS for m in mults)
    for k, m in enumerate(mults):
        t = k + 1
        if s.warmup_steps and t < s.warmup_steps and t <= start:
            assert m == pytest.approx(t / s.warmup_steps)  # warmup: linear in t
        if t >= s.warmup_steps and t <= start:
            assert m == 1.0  # stable phase: exactly constant
        if t >= end and t >= s.warmup_steps and end > start:
            assert m == pytest.approx(s.min_lr_ratio)  # held at the minimum after the decay
    assert s.lr(0) == pytest.approx(s.base_lr * mults[0])


@given(schedules())
def test_warmup_increases_then_decay_decreases(s):
    mults = [s.multiplier(k) for k in range(s.total_steps)]
    peak = max(range(len(mults)), key=lambda k: (mults[k], -k))
    assert all(mults[k] <= mults[k + 1] + EPS for k in range(peak))  # non-decreasing up to the peak
    assert all(mults[k] + EPS >= mults[k + 1] for k in range(peak, len(mults) - 1))  # non-increasing after


@given(schedules())
def test_final_step_is_at_min_when_warmup_is_over(s):
    start, end = s.decay_window
    assume(start < end)
    assert s.multiplier(s.total_steps - 1) == pytest.approx(
        min(s.min_lr_ratio, s.total_steps / s.warmup_steps if s.warmup_steps else 1.0)
    )


@given(schedules(), st.floats(0, 1))
def test_continuous_at_phase_boundaries(s, frac):
    start, end = s.decay_window
    assume(start < end)  # a zero-length decay window is an explicit step down
    for b in {s.warmup_steps, start, end}:
        h = 1e-7
        assert s.multiplier_at(b - h) == pytest.approx(s.multiplier_at(b + h), abs=1e-3)


@given(st.sampled_from(DECAY_SHAPES), st.floats(0, 1), st.floats(0, 1))
def test_decay_curve_monotone(shape, p, q):
    lo, hi = min(p, q), max(p, q)
    assert decay_curve(0.0, shape) == 1.0 and decay_curve(1.0, shape) == pytest.approx(0.0, abs=1e-12)
    assert decay_curve(lo, shape) >= decay_curve(hi, shape) - EPS


@given(
    total=st.integers(10, 400),
    warm_frac=st.floats(0, 0.3),
    start_frac=st.floats(0.3, 0.9),
    accel=st.floats(0.1, 1.0),
    shape=st.sampled_from(DECAY_SHAPES),
    min_ratio=st.floats(0, 0.5),
)
def test_accelerated_decay_reaches_min_earlier_and_never_exceeds_baseline(total, warm_frac, start_frac, accel, shape, min_ratio):
    """S2's accelerated decay: start earlier and/or end earlier -> LR pointwise <= the baseline's."""
    warmup = int(warm_frac * total)
    base_start = max(warmup, int(start_frac * total))
    base = WSDSchedule(1.0, total, warmup, decay_start=base_start, min_lr_ratio=min_ratio, decay_shape=shape)
    fast_start = warmup + int((base_start - warmup) * accel)
    fast_end = fast_start + int((total - fast_start) * accel)
    fast = WSDSchedule(1.0, total, warmup, decay_start=fast_start, decay_end=fast_end, min_lr_ratio=min_ratio, decay_shape=shape)
    for k in range(total):
        assert fast.multiplier(k) <= base.multiplier(k) + EPS

    def first_at_min(s):
        return next(k for k in range(total) if math.isclose(s.multiplier(k), min_ratio, abs_tol=1e-12))

    assert first_at_min(fast) <= first_at_min(base)


def test_decay_fraction_default_window():
    s = WSDSchedule(1.0, 100, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert s.decay_window == (80, 100)
    assert s.multiplier(9) == 1.0 and s.multiplier(79) == 1.0
    assert s.multiplier(89) == pytest.approx(0.5)
    assert s.multiplier(99) == 0.0
    assert wsd_lr(89, base_lr=2.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.0) == pytest.approx(1.0)


def test_shapes_at_midpoint():
    for shape, mid in (("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))):
        s = WSDSchedule(1.0, 10, decay_start=0, min_lr_ratio=0.0, decay_shape=shape)
        assert s.multiplier_at(5) == pytest.approx(mid)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(total_steps=0), "total_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(decay_shape="exp"), "decay_shape"),
        (dict(decay_start=50, decay_end=40), "decay_start"),
        (dict(decay_fraction=2.0), "decay_fraction"),
    ],
)
def test_bad_settings_are_named(kwargs, field):
    args = dict(base_lr=1.0, total_steps=100)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        WSDSchedule(**args)


def test_zero_decay_fraction_means_constant_after_warmup():
    s = WSDSchedule(1.0, 50, warmup_steps=5, decay_fraction=0.0, min_lr_ratio=0.0)
    assert [s.multiplier(k) for k in range(4, 50)] == [1.0] * 46
