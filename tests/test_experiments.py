"""Experiments: the scaling-law fits and optimum finder, and a smoke run of the sweep on toy sizes
(the MoE load-balancing experiment is tested in test_moe_balance.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from qwen3repro.experiments import scaling_laws as sl
from qwen3repro.experiments.cli import scaling_laws_command


# ----------------------------------------------------------------------------- scaling-law fitting
@given(a=st.floats(1e-4, 1e3), b=st.floats(-1.5, 1.5),
       n=st.lists(st.floats(1e3, 1e9), min_size=2, max_size=8, unique=True))
def test_power_law_fit_recovers_coefficients(a, b, n):
    n = sorted(n)
    if n[-1] / n[0] < 1.5:  # need some spread in log N to pin the exponent
        n = [n[0], n[0] * 10]
    fit = sl.fit_power_law(n, [a * x ** b for x in n])
    assert fit["b"] == pytest.approx(b, abs=1e-6)
    assert fit["a"] == pytest.approx(a, rel=1e-5)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-9) or abs(b) < 1e-9
    assert sl.power_law(fit, n[0]) == pytest.approx(a * n[0] ** b, rel=1e-5)


def test_power_law_fit_with_noise_is_close():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e5, 1e8, 12)
    y = 0.5 * n ** -0.3 * np.exp(rng.normal(0, 0.02, n.size))
    fit = sl.fit_power_law(n, y)
    assert fit["b"] == pytest.approx(-0.3, abs=0.03)
    assert fit["r2"] > 0.95


@given(center=st.floats(-8.0, -4.0), curv=st.floats(0.05, 2.0), offset=st.floats(1.0, 6.0))
def test_optimum_finder_picks_parabola_minimum(center, curv, offset):
    lrs = [2.0 ** u for u in np.arange(-10, -1.5, 1.0)]  # grid wide enough to bracket the centre
    losses = [offset + curv * (math.log2(x) - center) ** 2 for x in lrs]
    opt = sl.optimum_log_parabola(lrs, losses)
    assert opt["method"] == "parabola"
    assert math.log2(opt["x"]) == pytest.approx(center, abs=1e-6)
    assert opt["loss"] == pytest.approx(offset, abs=1e-6)


def test_optimum_finder_falls_back_to_grid_at_the_edge_and_skips_divergence():
    lrs = [1e-3, 2e-3, 4e-3, 8e-3]
    opt = sl.optimum_log_parabola(lrs, [4.0, 3.0, 2.0, 1.0])  # monotone: the optimum is off the grid
    assert opt == {"x": 8e-3, "loss": 1.0, "method": "grid"}
    opt = sl.optimum_log_parabola(lrs, [3.0, 2.0, 2.5, float("inf")])  # diverged point dropped
    assert opt["method"] == "parabola" and 2e-3 < opt["x"] < 4e-3
    opt = sl.optimum_log_parabola(lrs, [3.0, 2.0, float("inf"), float("nan")])  # too few points left
    assert opt == {"x": 2e-3, "loss": 2.0, "method": "grid"}


def test_optima_per_size():
    rows = []
    for size, n, centre_lr, centre_b in (("a", 1e5, 8e-3, 8), ("b", 1e6, 2e-3, 16)):
        for b in (4, 8, 16, 32):
            for lr in (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2):
                loss = 3 + 0.1 * math.log2(lr / centre_lr) ** 2 + 0.05 * math.log2(b / centre_b) ** 2
                rows.append({"size": size, "n_params": n, "batch_size": b, "lr": lr, "eval_loss": loss})
    opt = sl.optima(rows, seq_len=128)
    assert opt["a"]["lr_opt"] == pytest.approx(8e-3, rel=1e-6)
    assert opt["b"]["lr_opt"] == pytest.approx(2e-3, rel=1e-6)
    assert opt["a"]["batch_opt_sequences"] == pytest.approx(8, rel=1e-6)
    assert opt["b"]["batch_opt_tokens"] == pytest.approx(16 * 128, rel=1e-6)
    assert not opt["a"]["lr_at_grid_edge"] and not opt["b"]["batch_at_grid_edge"]
    def concave(r):  # falls towards the smallest LR and batch: both optima on the grid's lower edge
        return -math.log2(r["lr"]) ** 2 - 0.1 * (math.log2(r["batch_size"]) - 10) ** 2

    edge = sl.optima([{**r, "eval_loss": concave(r)} for r in rows], seq_len=128)
    assert edge["a"]["lr_at_grid_edge"] and edge["a"]["batch_at_grid_edge"] and edge["a"]["lr_opt"] == 5e-4
    assert edge["a"]["batch_opt_sequences"] == 4


def test_sweep_sizes_are_ordered_and_tiny_student_is_the_largest():
    ns = [sl.non_embedding_params(c) for c in sl.SWEEP_SIZES.values()]
    assert ns == sorted(ns) and len(ns) >= 3
    assert sl.SWEEP_SIZES["sl-128x4"] == sl.get_model_config("tiny-student")


# ----------------------------------------------------------------------------- smoke runs
def test_scaling_laws_dry_run_and_tiny_sweep(tmp_path):
    runner = CliRunner()
    res = runner.invoke(scaling_laws_command, ["--dry-run", "--out", str(tmp_path / "dry")])
    assert res.exit_code == 0, res.output
    assert "60 runs" in res.output and "sl-128x4" in res.output
    assert not (tmp_path / "dry").exists()
    res = runner.invoke(scaling_laws_command, ["--dry-run", "--quick"])
    assert res.exit_code == 0 and "sl-32x1" in res.output

    # The --quick grid, cut further so the test stays fast: one batch size, three LRs.
    s = sl.SweepSettings.quick_settings()
    s = sl.SweepSettings(**{**s.__dict__, "lrs": (1e-3, 4e-3, 1.6e-2), "batch_sizes": (2,), "tokens": 256,
                            "tokenizer_docs": 300, "n_docs": 60})
    result = sl.run_sweep(tmp_path / "sweep", s, printer=lambda _m: None)
    assert len(result["runs"]) == 6
    assert set(result["predictions"]) == {"tiny-student", "tiny-flagship"}
    for key in ("lr_opt", "batch_opt_tokens"):
        assert {"a", "b", "r2"} <= set(result["fits"][key])
    assert json.loads((tmp_path / "sweep" / "scaling_laws.json").read_text())["settings"]["quick"] is True
    for name in result["files"]:
        assert (tmp_path / "sweep" / name).exists()
    again = sl.run_sweep(tmp_path / "sweep", s, printer=lambda _m: None)  # resumes: nothing retrained
    assert [r["eval_loss"] for r in again["runs"]] == [r["eval_loss"] for r in result["runs"]]
