"""The one progress line and the one plotting helper."""
from __future__ import annotations

import time

import pytest

from qwen3repro import plotting
from qwen3repro.progress import Progress, format_duration


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3723.4) == "1:02:03"
    assert format_duration(None) == "?"
    assert format_duration(float("nan")) == "?"


def test_eta_extrapolates_this_process_rate_only(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    # Resumed at step 40 of 100 after 1,000 s elapsed before the restart.
    p = Progress(100, done=40, elapsed_before=1000.0)
    assert p.eta() is None  # nothing done in this process yet
    clock[0] += 30.0
    p.update(50)            # 10 steps in 30 s here -> 3 s per step, 50 left
    assert p.eta() == pytest.approx(150.0)
    assert p.elapsed() == pytest.approx(1030.0)
    line = p.line("loss 1.0000")
    assert line == "step  50/100 ( 50.0%) | loss 1.0000 | elapsed 0:17:10 | eta 0:02:30"


def test_work_weighted_line_and_throttle(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    p = Progress(4.0, name="[longcontext]", count=False)
    p.advance(1.0)
    clock[0] = 2.0
    assert not p.due(5.0)
    clock[0] = 6.0
    assert p.due(5.0) and not p.due(5.0)
    assert p.line("S3 at 2048").startswith("[longcontext]  25.0% | S3 at 2048 | elapsed 0:00:06 | eta 0:00:18")


def test_figure_is_saved_whole_and_closed(tmp_path):
    plt = plotting.pyplot()
    before = len(plt.get_fignums())
    out = tmp_path / "sub" / "curve.png"
    with plotting.figure(out, ncols=2, title="t") as (fig, axes):
        assert axes.shape == (1, 2)
        axes[0, 0].plot([0, 1], [1, 0])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["curve.png"]  # no temporary left behind
    assert len(plt.get_fignums()) == before


def test_figure_not_saved_when_drawing_fails(tmp_path):
    out = tmp_path / "broken.png"
    with pytest.raises(ZeroDivisionError):
        with plotting.figure(out):
            1 / 0
    assert not out.exists()
