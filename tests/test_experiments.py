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


def _bowl(lr_centre: float, batch_centre: float):
    """A loss that is quadratic in (log2 LR, log2 batch) with its minimum at the given centre."""
    return lambda lr, b: 3 + 0.1 * math.log2(lr / lr_centre) ** 2 + 0.05 * math.log2(b / batch_centre) ** 2


def test_size_optimum_from_the_best_point_and_its_neighbours():
    loss = _bowl(8e-3 * 2 ** 0.3, 8 * 2 ** -0.2)  # off the lattice: the parabolas recover it exactly
    rows = [{"size": "a", "n_params": 1e5, "batch_size": b, "lr": lr, "eval_loss": loss(lr, b), "seed": 0}
            for b in (2, 4, 8, 16, 32) for lr in (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)]
    opt = sl.size_optimum(rows, seq_len=256)
    assert opt["lr_opt"] == pytest.approx(8e-3 * 2 ** 0.3, rel=1e-6)
    assert opt["batch_opt_sequences"] == pytest.approx(8 * 2 ** -0.2, rel=1e-6)
    assert opt["batch_opt_tokens"] == pytest.approx(256 * 8 * 2 ** -0.2, rel=1e-6)
    assert opt["best_point"]["lr"] == 8e-3 and opt["best_point"]["batch_sequences"] == 8
    assert not opt["lr_at_grid_edge"] and not opt["batch_at_grid_edge"]

    # The best point at the smallest batch run: the batch is a bound, the LR still a parabola.
    floor = [{**r, "eval_loss": _bowl(4e-3, 0.5)(r["lr"], r["batch_size"])} for r in rows]
    opt = sl.size_optimum(floor, seq_len=256)
    assert opt["batch_at_grid_edge"] and opt["batch_opt_sequences"] == 2
    assert not opt["lr_at_grid_edge"] and opt["lr_opt"] == pytest.approx(4e-3, rel=1e-6)

    # A diverged neighbour leaves two finite points: the best one is taken, not flagged as a bound.
    diverged = [{**r, "eval_loss": float("inf")} if r["lr"] == 3.2e-2 else r
                for r in (dict(r, eval_loss=_bowl(1.6e-2, 8)(r["lr"], r["batch_size"])) for r in rows)]
    opt = sl.size_optimum(diverged, seq_len=256)
    assert opt["lr_opt"] == 1.6e-2 and opt["lr"]["method"] == "grid" and not opt["lr_at_grid_edge"]


def test_size_optimum_averages_only_the_seeds_every_point_ran():
    loss = _bowl(4e-3, 4)
    rows = [{"size": "a", "n_params": 1e5, "batch_size": b, "lr": lr, "seed": seed,
             "eval_loss": loss(lr, b) + 0.01 * seed}
            for b in (2, 4, 8) for lr in (2e-3, 4e-3, 8e-3) for seed in (0, 1)]
    # An extra seed at the best point, far off: it must not move the point's mean against its neighbours.
    rows.append({"size": "a", "n_params": 1e5, "batch_size": 4, "lr": 4e-3, "seed": 2, "eval_loss": 9.0})
    opt = sl.size_optimum(rows, seq_len=256)
    assert opt["lr_opt"] == pytest.approx(4e-3, rel=1e-6) and opt["batch_opt_sequences"] == pytest.approx(4, rel=1e-6)
    assert opt["seed_loss_gap_max"] == pytest.approx(9.0 - loss(4e-3, 4), rel=1e-6)
    assert {k: v["lr_opt"] for k, v in opt["per_seed"].items()} == pytest.approx({"0": 4e-3, "1": 4e-3})


def test_optima_and_fit_leave_bounds_out():
    rows = []
    for size, n, lr_c, b_c in (("a", 1e4, 1.6e-2, 0.25), ("b", 1e5, 8e-3, 2), ("c", 1e6, 4e-3, 8)):
        for b in (1, 2, 4, 8, 16):
            for lr in (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2):
                rows.append({"size": size, "n_params": n, "batch_size": b, "lr": lr, "seed": 0,
                             "eval_loss": _bowl(lr_c, b_c)(lr, b)})
    opt = sl.optima(rows, seq_len=256)
    assert list(opt) == ["a", "b", "c"]
    assert opt["a"]["batch_at_grid_edge"] and not opt["b"]["batch_at_grid_edge"]
    fits = sl.fit_optima(opt)
    assert fits["batch_tokens"]["sizes"] == ["b", "c"]  # "a" wants less than one sequence: left out
    assert fits["batch_tokens"]["b"] == pytest.approx(math.log(4) / math.log(10), rel=1e-6)
    assert fits["lr"]["sizes"] == ["a", "b", "c"] and fits["lr"]["b"] == pytest.approx(-math.log10(2), rel=1e-6)
    assert fits["lr"]["r2"] == pytest.approx(1.0) and fits["lr"]["b_se"] == pytest.approx(0.0, abs=1e-9)


def test_compass_search_walks_to_the_lattice_optimum():
    s = sl.SweepSettings(sizes=("sl-32x2",), seeds_per_size=(2,), best_point_seeds=(3,), max_moves=8)
    loss = _bowl(s.lr(3) * 2 ** 0.2, 2 ** 2.1)  # lattice optimum: batch 4 (j=2), LR index 3
    calls = []

    def run(j, k, seed):
        calls.append((j, k, seed))
        return {"size": "sl-32x2", "n_params": 1, "batch_size": 2 ** j, "lr": s.lr(k), "seed": seed,
                "eval_loss": loss(s.lr(k), 2 ** j)}

    rows, moves = sl.search_size(s, "sl-32x2", (0, 0), run, printer=lambda _m: None)
    assert len(calls) == len(set(calls))  # no point trained twice
    opt = sl.size_optimum(rows, seq_len=256)
    assert opt["best_point"]["batch_sequences"] == 4 and opt["best_point"]["lr"] == s.lr(3)
    assert moves == 5 and not opt["lr_at_grid_edge"] and not opt["batch_at_grid_edge"]
    assert {r["seed"] for r in rows if (r["batch_size"], r["lr"]) == (4, s.lr(3))} == {0, 1, 2}
    assert opt["batch_opt_sequences"] == pytest.approx(2 ** 2.1, rel=1e-6)

    # A search cut short leaves a best point without all its neighbours: a bound.
    s_cut = sl.SweepSettings(sizes=("sl-32x2",), seeds_per_size=(1,), best_point_seeds=(1,), max_moves=1)
    rows, moves = sl.search_size(s_cut, "sl-32x2", (0, 0), run, printer=lambda _m: None)
    opt = sl.size_optimum(rows, seq_len=256)
    assert moves == 1 and (opt["lr_at_grid_edge"] or opt["batch_at_grid_edge"])


def test_sweep_sizes_span_a_decade_up_to_tiny_student():
    ns = [sl.non_embedding_params(c) for c in sl.SWEEP_SIZES.values()]
    assert ns == sorted(ns) and len(ns) >= 3 and ns[-1] / ns[0] > 10
    assert sl.SWEEP_SIZES["sl-128x4"] == sl.get_model_config("tiny-student")
    s = sl.SweepSettings()
    assert s.seq_len == 256 and s.tokens("sl-128x4") == round(s.tokens_per_param * ns[-1])


# ----------------------------------------------------------------------------- smoke runs
def test_scaling_laws_dry_run_and_tiny_sweep(tmp_path):
    runner = CliRunner()
    res = runner.invoke(scaling_laws_command, ["--dry-run", "--out", str(tmp_path / "dry")])
    assert res.exit_code == 0, res.output
    assert "compass search" in res.output and "sl-128x4" in res.output
    assert not (tmp_path / "dry").exists()
    res = runner.invoke(scaling_laws_command, ["--dry-run", "--quick"])
    assert res.exit_code == 0 and "sl-32x1" in res.output

    # The --quick settings, cut further so the test stays fast.
    s = sl.SweepSettings.quick_settings()
    s = sl.SweepSettings(**{**s.__dict__, "max_moves": 0, "tokens_per_param": 0.02, "tokenizer_docs": 300,
                            "n_docs": 60})
    result = sl.run_sweep(tmp_path / "sweep", s, printer=lambda _m: None)
    # Each size: its start and the start's lattice neighbours (4 or 5 points), then the extra seed.
    for size, extra in zip(s.sizes, s.best_point_seeds):
        assert len([r for r in result["runs"] if r["size"] == size]) in (4 + extra - 1, 5 + extra - 1)
    assert set(result["predictions"]) == {"tiny-student", "tiny-flagship"}
    for key in ("lr_opt", "batch_opt_tokens"):
        assert {"a", "b", "r2", "sizes"} <= set(result["fits"][key])
    assert json.loads((tmp_path / "sweep" / "scaling_laws.json").read_text())["settings"]["quick"] is True
    for name in result["files"]:
        assert (tmp_path / "sweep" / name).exists()
    again = sl.run_sweep(tmp_path / "sweep", s, printer=lambda _m: None)  # resumes: nothing retrained
    assert [r["eval_loss"] for r in again["runs"]] == [r["eval_loss"] for r in result["runs"]]


# ----------------------------------------------------------------------------- the recipes follow the fit
def test_tiny_recipes_take_s1_lr_and_batch_from_the_committed_fit():
    """tiny/tiny.toml's S1 (and S2, s1-control, which continue it) use the committed sweep's
    predictions, rounded as its comment says: LR to 2 significant digits, the batch to the nearest
    whole number of 256-token sequences."""
    from pathlib import Path

    from qwen3repro.pipeline import build_plan

    fit = json.loads((Path(__file__).resolve().parents[1] / "tiny" / "scaling_laws.json").read_text())
    plan = build_plan("tiny")
    checked = 0
    for role, model in (("flagship", "tiny-flagship"), ("student", "tiny-student")):
        pred = fit["predictions"][model]
        lr, batch = float(f"{pred['lr']:.2g}"), max(1, round(pred["batch_tokens"] / 256))
        for stage in ("s1", "s2", "s1-control"):
            key = f"{role}/{stage}"
            if key not in {n.key for n in plan.nodes}:
                continue
            cfg = plan.node(key).config
            assert (cfg.seq_len, cfg.batch_size, cfg.train["lr"]) == (256, batch, lr), key
            checked += 1
    assert checked == 5  # S1 and S2 of both roles, and the flagship's S1 control
