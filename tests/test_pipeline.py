"""The micro pipeline end to end (CI's run of every stage), lineage skipping and strict configs."""
import json

import pytest

from qwen3repro.config import ConfigError
from qwen3repro.lineage import read_lineage
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.pipeline import build_plan, describe, expected_hash, run_pipeline


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    lines: list[str] = []
    plan = run_pipeline("micro", out_root=root, printer=lines.append)
    return plan, lines


def test_micro_pipeline_runs_every_stage_and_writes_the_report(micro_run):
    plan, lines = micro_run
    for node in plan.nodes:
        lineage = read_lineage(node.out_dir)
        assert lineage is not None and lineage.complete, node.key
        assert lineage.hash == expected_hash(node), node.key
    s3 = plan.node("flagship/s3").out_dir
    model = Qwen3.from_pretrained(s3)
    assert model.config.rope_theta == 1e6  # ABF applied in S3
    assert Qwen3.from_pretrained(plan.node("flagship/s2").out_dir).config.rope_theta == 1e4
    report = (plan.root / "REPORT.md").read_text()
    assert "| claim | report | measured here | reproduced |" in report
    assert (plan.root / "plots" / "loss_curves.png").exists()
    claims = json.loads((plan.root / "claims" / "claims.json").read_text())
    names = {c["name"] for c in claims}
    assert any(n.startswith("s2_reasoning") for n in names)
    assert any(n.startswith("yarn_dca") for n in names)
    # every stage logged a progress line with an ETA and wrote metrics.jsonl
    assert any("eta" in line for line in lines)
    assert (plan.node("student/s1").out_dir / "metrics.jsonl").exists()


def test_second_run_skips_up_to_date_stages(micro_run):
    plan, _ = micro_run
    lines: list[str] = []
    again = run_pipeline("micro", out_root=plan.root.parent, printer=lines.append, claims=False)
    assert all(n.status.startswith("skipped") for n in again.nodes)


def test_changed_recipe_reruns_only_dependants(micro_run, tmp_path):
    plan, _ = micro_run
    changed = build_plan("micro", out_root=plan.root.parent, overrides=["stages.s3.train.lr=5e-4"])
    old = build_plan("micro", out_root=plan.root.parent)
    for a, b in zip(old.nodes, changed.nodes):
        same = expected_hash(a) == expected_hash(b)
        assert same == (not a.key.endswith("/s3")), a.key


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="bogus"):
        build_plan("micro", overrides=["stages.s1.bogus=1"])
    with pytest.raises(ConfigError, match="lrr"):
        build_plan("micro", overrides=["stages.s1.train.lrr=1"])
    with pytest.raises(ConfigError, match="valid scales"):
        build_plan("nope")


def test_dry_run_describes_every_stage():
    text = describe(build_plan("tiny"))
    for key in ("tokenizer", "flagship/s1", "flagship/s2", "flagship/s3", "flagship/s1-control", "student/s3"):
        assert f"[{key}]" in text
    assert "rope_theta = 1000000.0" in text  # S3's ABF


def test_cut_stage_resumes_and_stale_output_is_moved_aside(micro_run):
    plan, _ = micro_run
    s2 = plan.node("student/s2").out_dir
    (s2 / "lineage.json").unlink()  # as if the run was cut before it completed
    lines: list[str] = []
    again = run_pipeline("micro", out_root=plan.root.parent, printer=lines.append, claims=False,
                         only={"student/s2"})
    assert any("resuming a cut run" in line for line in lines)
    assert any("resumed from" in line for line in lines)
    assert read_lineage(s2).hash == expected_hash(again.node("student/s2"))
    # a different config for the same directory: the old output is kept, renamed, not deleted
    lines.clear()
    run_pipeline("micro", out_root=plan.root.parent, printer=lines.append, claims=False, only={"student/s2"},
                 overrides=["stages.s2.train.lr=1e-3"])
    assert any("moved aside" in line for line in lines)
    assert list(s2.parent.glob("s2.old-*"))
