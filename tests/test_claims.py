"""The claims registry: its settings file, the significance test, each claim's verdict on known
inputs, which roles each claim measures on the real scales, and the report's loss curves."""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qwen3repro.config import ConfigError
from qwen3repro.data import tasks
from qwen3repro.evals import thinking as th
from qwen3repro.evals.claims import CLAIMS, ClaimRow, run_claims
from qwen3repro.evals.claims.budget import claim_budget
from qwen3repro.evals.claims.filtering import filtering_verdict
from qwen3repro.evals.claims.fusion import claim_fusion
from qwen3repro.evals.claims.grpo import claim_grpo
from qwen3repro.evals.claims.settings import CLAIMS_FILE, claim_settings, load_claim_settings
from qwen3repro.evals.claims.significance import clearly_above
from qwen3repro.evals.report import loss_curves
from qwen3repro.lineage import make_lineage, write_lineage
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.pipeline import build_plan
from qwen3repro.tokenizer import train_tokenizer


# ----------------------------------------------------------------------------- settings
def test_the_settings_file_holds_the_report_figures_and_thresholds():
    s = claim_settings()
    assert (s.grpo.pass1_gain_min, s.grpo.entropy_floor) == (0.10, 0.5)
    assert (s.grpo.report_aime24_before, s.grpo.report_aime24_after, s.grpo.report_rl_steps) == (70.1, 85.1, 170)
    assert s.fusion.thinkfollow_min == 0.90 and s.copy_probe.copy_gain_min == 0.5
    assert (s.longcontext.at_trained_min, s.longcontext.extended_min, s.longcontext.far_worse_gap) == (0.9, 0.8, 0.4)
    assert s.significance.standard_errors == 2.0
    assert list(s.thinking_budget.report_budget_curve_aime24) == [1024, 2048, 4096, 8192, 16384, 32768]


def test_the_settings_file_is_read_strictly(tmp_path):
    text = CLAIMS_FILE.read_text()

    def load(edited):
        path = tmp_path / "claims.toml"
        path.write_text(edited)
        return load_claim_settings(path)

    with pytest.raises(ConfigError, match=r"\[grpo\]: unknown key\(s\) \['pass1_gain_minimum'\]"):
        load(text.replace("pass1_gain_min =", "pass1_gain_minimum ="))
    with pytest.raises(ConfigError, match=r"\[fusion\]: missing key\(s\) \['thinkfollow_min'\]"):
        load(text.replace("thinkfollow_min = 0.90", ""))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['extra'\]"):
        load(text + "\n[extra]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"\[grpo\] report_rl_steps must be an integer"):
        load(text.replace("report_rl_steps = 170", "report_rl_steps = 170.5"))
    with pytest.raises(ConfigError, match=r"entropy_floor must be a number"):
        load(text.replace("entropy_floor = 0.5", 'entropy_floor = "half"'))
    with pytest.raises(ConfigError, match=r"budget 'lots' is not an integer"):
        load(text.replace("{ 1024 = 42.0", "{ lots = 42.0"))


# ----------------------------------------------------------------------------- verdicts
def test_clearly_above_needs_more_than_noise():
    assert clearly_above(0.6, 100, 0.3, 100)
    assert not clearly_above(0.037, 27, 0.0, 27)      # one right answer in 27 is not a win
    assert not clearly_above(0.3, 100, 0.6, 100)
    assert not clearly_above(0.5, 0, 0.1, 10)
    assert clearly_above(1.0, 10, 0.0, 10) and not clearly_above(0.0, 10, 0.0, 10)
    # 0.6 vs 0.45 on 100 items each is 2.14 pooled standard errors: above 2, not above 3.
    assert clearly_above(0.6, 100, 0.45, 100) and not clearly_above(0.6, 100, 0.45, 100, z=3.0)


def test_filtering_verdict_needs_both_differences_beyond_noise():
    def model(acc, defect, n):
        return {"accuracy": acc, "any_defect_rate": defect, "n": n}

    ok, parts = filtering_verdict(model(0.20, 0.80, 250), model(0.08, 0.92, 250))
    assert ok and parts == []
    # One right answer in 84 against none: higher, but within noise.
    ok, parts = filtering_verdict(model(1 / 84, 83 / 84, 84), model(0.0, 1.0, 84))
    assert not ok and len(parts) == 2 and "2 standard errors" in parts[0]
    # More accurate but not less defective (e.g. more repetition) fails on the second half alone.
    ok, parts = filtering_verdict(model(0.20, 0.95, 250), model(0.08, 0.95, 250))
    assert not ok and parts == ["its outputs are not less defective by more than 2 standard errors"]


def _rl_dir(root, *, gain, ratio, entropy_drop=0.03, skipped=None):
    """A reasoning-RL stage directory as the stage leaves it: eval.json, metrics.jsonl, lineage.json."""
    d = root / "flagship" / "reasoning-rl"
    d.mkdir(parents=True, exist_ok=True)
    write_lineage(d, make_lineage("reasoning-rl", {"test": 1}))
    records = [{"step": 0, "eval/pass@1": 0.2, "eval/pass@8": 0.5}]
    records += [{"step": s, "reward": 0.3, "entropy": 1.0 - entropy_drop * s, "response_length": 40,
                 "clip_fraction": 0.0, "kl": 0.0, "zero_variance_share": 0.2, "entropy_coef": 0.0, "groups_kept": 4}
                for s in range(1, 11)]
    records[-1].update({"eval/pass@1": 0.2 + gain, "eval/pass@8": 0.6})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ev = {"steps": 10, "pass@1_before": 0.2, "pass@1_after": 0.2 + gain, "pass@8_before": 0.5, "pass@8_after": 0.6,
          "pass@1_gain": gain, "entropy_window": 5, "entropy_min_ratio": ratio}
    if skipped:
        ev.update(skipped=skipped, selection={"dropped": {"too easy": 3}})
    (d / "eval.json").write_text(json.dumps(ev))
    return d


def test_grpo_claim_reads_the_stage_records(tmp_path, make_plan):
    cfg = SimpleNamespace(name="reasoning-rl", entropy_control="proportional")
    plan = make_plan(tmp_path, {"flagship/cold-start": None, "flagship/reasoning-rl": cfg})
    _rl_dir(tmp_path, gain=0.15, ratio=0.7)
    (row,) = claim_grpo(plan, print)
    assert row.reproduced is True and row.diagnosis == "" and row.role == "flagship"
    assert row.claim == ("GRPO raises held-out pass@1 by >= 10 points over the cold start, entropy never below 50% "
                         "of its start")
    assert row.report_figure == "AIME'24 70.1 -> 85.1 in 170 steps (§4.2)"
    assert row.measured == ("pass@1 20.0% -> 35.0% (+15.0 points) in 10 steps; pass@8 50.0% -> 60.0%; "
                            "entropy min/start 0.70 (5-step means)")
    # The curves are drawn from metrics.jsonl by the claim, not by the stage.
    assert row.plots == [str(tmp_path / "claims" / "grpo_curves_flagship.png")]
    assert Path(row.plots[0]).stat().st_size > 1000
    _rl_dir(tmp_path, gain=0.05, ratio=0.4)
    (row,) = claim_grpo(plan, print)
    assert row.reproduced is False
    assert row.diagnosis == "pass@1 gain +5.0% < 10%; entropy fell to 0.40 of its start"
    _rl_dir(tmp_path, gain=0.0, ratio=None)
    (row,) = claim_grpo(plan, print)
    assert row.reproduced is False and "made no update" in row.diagnosis and "40 groups" in row.measured
    _rl_dir(tmp_path, gain=0.0, ratio=None, skipped="nothing learnable")
    (row,) = claim_grpo(plan, print)
    assert row.reproduced is False and row.measured.startswith("not trained")
    # Roles without reasoning RL are not measured at all; one whose stage has not run is "not measured".
    assert claim_grpo(make_plan(tmp_path, {"flagship/s3": None}), print) == []
    (row,) = claim_grpo(make_plan(tmp_path / "empty", {"flagship/reasoning-rl": cfg}), print)
    assert row.reproduced is None and row.measured == "not measured"


# ----------------------------------------------------------------------------- thinking claims, micro model
@pytest.fixture(scope="module")
def fused_plan(tmp_path_factory, make_plan):
    rng = random.Random(0)
    tok = train_tokenizer([tasks.render_trace(it) + " " + it.question for it in
                           (tasks.sample_item(rng, heldout=False) for _ in range(100))], 400)
    root = tmp_path_factory.mktemp("run")
    out = root / "flagship" / "fusion"
    out.mkdir(parents=True)
    tok.save(out)
    torch.manual_seed(0)
    Qwen3(get_model_config("micro").replace(eos_token_id=tok.endoftext_id, bos_token_id=None)).save_pretrained(out)
    write_lineage(out, make_lineage("fusion", {"test": 1}))
    evals = {"fusion": {"follow_n": 8, "n_per_cell": 1, "families": ["add", "order"], "max_new_tokens": 24},
             "thinking_budget": {"n_per_cell": 1, "families": ["add"], "budgets": [0, 8, 16]}}
    return make_plan(root, {"student/s3": None, "flagship/fusion": None}, evals=evals)


def test_thinking_claims_run_on_a_micro_model_and_pin_their_settings(fused_plan):
    plan = fused_plan
    rows = claim_fusion(plan, print)
    assert [r.name for r in rows] == ["thinkfollow", "thinking_vs_non_thinking"]
    assert all(r.role == "flagship" for r in rows)  # the first role that ran fusion
    res = json.loads((Path(plan.root) / "claims" / "fusion.json").read_text())
    assert res["settings"]["thinking_sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                                                    "presence_penalty": 0.0}
    assert res["settings"]["non_thinking_sampling"]["temperature"] == 0.7
    assert res["settings"]["config"]["role"] == "flagship"
    assert res["report"] == {"thinkfollow_stage3": 88.7, "thinkfollow_stage4": 98.9, "claim_threshold": 0.9}
    tf = res["thinkfollow"]
    assert tf["n"] == 8 and rows[0].reproduced is (tf["thinkfollow"] >= 0.9)
    assert rows[0].report_figure == ("ThinkFollow 88.7 after Stage 3, 98.9 after Stage 4 (Table 22, Qwen3-32B); "
                                     "claim: >= 90%")
    assert res["accuracy_by_mode"]["thinking"]["n"] == len(th.eval_items(th.ThinkingEvalConfig(
        n_per_cell=1, families=("add", "order"))))

    rows = claim_budget(plan, print)
    res = json.loads((Path(plan.root) / "claims" / "thinking_budget.json").read_text())
    assert [r["budget"] for r in res["runs"]] == [0, 8, 16]
    # The controller enforces every budget, so s1's Control is 1 and no sample thinks past its budget.
    assert res["s1"]["control"] == 1.0
    assert all(r["max_thinking_tokens"] <= r["budget"] for r in res["runs"])
    assert res["settings"]["forced_text"] == th.TEMPLATE_DIRECTIVE
    assert res["report"]["fig2_aime24"]["32768"] == 86.5
    assert rows[0].report_figure == ("AIME'24 ~42 -> 86.5 for budgets 1K -> 32K; non-thinking 40.1 "
                                     "(Fig. 2, Qwen3-235B-A22B)")
    assert Path(rows[0].plots[0]).exists() and Path(rows[0].plots[0]).stat().st_size > 1000


def test_thinking_claims_without_a_fused_checkpoint(tmp_path, make_plan):
    plan = make_plan(tmp_path, {"flagship/fusion": None})
    rows = claim_fusion(plan, print) + claim_budget(plan, print)
    assert len(rows) == 3 and all(r.reproduced is None and r.measured == "not measured" for r in rows)
    assert claim_fusion(make_plan(tmp_path, {"flagship/s3": None}), print) == []  # no role ran fusion


# ----------------------------------------------------------------------------- the registry on the scales
def test_each_scale_measures_its_claims_for_the_roles_that_ran_their_stages():
    for scale in ("tiny", "micro"):
        plan = build_plan(scale)
        assert plan.roles_with("s1-control") == ["flagship"]             # S2 vs its control
        assert plan.roles_with("cold-start-unfiltered") == ["flagship"]  # Filtering
        assert plan.roles_with("reasoning-rl") == plan.roles_with("fusion") == ["flagship"]
        assert plan.roles_with("reward-model") == plan.roles_with("general-rl") == ["flagship"]
        assert plan.eval_settings("longcontext")["role"] == "flagship"
        assert plan.experiment_settings("moe")
    assert build_plan("micro").roles_with("s3") == ["flagship", "student"]
    tiny = build_plan("tiny")
    assert tiny.roles_with("s3") == ["flagship", "student", "moe-student"]
    # Strong-to-weak distillation: the flagship teaches; both students distill off-policy; Table 21's arms
    # (RL, on-policy, compute-matched SFT) run from the dense student's off-policy checkpoint.
    assert tiny.roles_with("teacher-outputs") == ["flagship"]
    assert tiny.roles_with("distill") == ["student", "moe-student"]
    assert tiny.roles_with("onpolicy-distill") == tiny.roles_with("distill-grpo") == tiny.roles_with(
        "distill-more") == ["student"]
    assert {u.key for u in tiny.node("moe-student/distill").uses.values()} == {"flagship/teacher-outputs"}
    assert {u.key for u in tiny.node("student/onpolicy-distill").uses.values()} == {"flagship/general-rl"}
    assert tiny.node("student/distill-grpo").parent.key == "student/distill"
    assert tiny.node("student/distill-grpo").config.loss_type == "dapo"  # reasoning RL's recipe, extended
    small = build_plan("small")
    assert set(small.settings.claims) == {"filtering", "grpo", "fusion", "budget", "reward_model",
                                          "general_rl", "distillation", "distilled_modes"} <= set(CLAIMS)
    assert small.roles_with("reasoning-rl") == small.roles_with("cold-start-unfiltered") == ["flagship"]


def test_an_unknown_claim_is_named(tmp_path, make_plan):
    with pytest.raises(ConfigError, match=r"unknown claim\(s\) \['grpoo'\]"):
        run_claims(make_plan(tmp_path, {}), printer=print, only={"grpoo"})


def test_claim_rows_round_trip_through_claims_json(tmp_path, make_plan):
    from qwen3repro.evals.claims import load_rows

    plan = make_plan(tmp_path, {"flagship/reasoning-rl": None})
    rows = run_claims(plan, printer=lambda line: None, only={"grpo"})
    assert rows == [ClaimRow("grpo", "GRPO raises pass@1", "-", "not measured", None,
                             "no reasoning-RL checkpoint for flagship", details={"seconds": rows[0].details["seconds"]},
                             role="flagship")]
    assert load_rows(tmp_path / "claims" / "claims.json") == rows
    assert "| GRPO raises pass@1 | - | not measured | not measured |" in (tmp_path / "REPORT.md").read_text()


# ----------------------------------------------------------------------------- the report
def test_loss_curves_start_where_the_parent_stage_ended(tmp_path, make_plan):
    plan = make_plan(tmp_path, {"flagship/s1": None, "flagship/s2": None, "flagship/s3": None})
    plan.nodes.append(type(plan.nodes[0])("flagship/s1-control", "stage", None, tmp_path / "flagship" / "s1-control",
                                          plan.node("flagship/s1")))
    for key, tokens in (("s1", (100, 200)), ("s2", (50, 80)), ("s3", (10, 30)), ("s1-control", (40, 90))):
        d = tmp_path / "flagship" / key
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"tokens_seen": t, "loss": 1.0}) + "\n" for t in tokens))
    curves = {stage: xs for stage, xs, _ in loss_curves(plan.nodes)["flagship"]}
    assert curves == {"s1": [100, 200], "s2": [250, 280], "s3": [290, 310], "s1-control": [240, 290]}
