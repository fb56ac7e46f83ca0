"""The micro pipeline end to end (CI's run of every stage), lineage skipping and strict configs."""
import json
from pathlib import Path

import pytest

from qwen3repro.config import ConfigError
from qwen3repro.lineage import read_lineage
from qwen3repro.models.checksums import read_checksums, verify_checksums
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.pipeline import build_plan, describe, expected_hash, run_pipeline


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    lines: list[str] = []
    plan = run_pipeline("micro", out_root=root, printer=lines.append, device="cpu")  # through the run's setting
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
    # The machine and the device are recorded: in REPORT.md, in pipeline.json and with every trained stage's
    # time (its timing.json); the device also in the stage.json a stage writes when it starts.
    summary = json.loads((plan.root / "pipeline.json").read_text())
    assert summary["machine"] == plan.machine and plan.machine["matmul_peak_gflops_fp32"] > 0
    assert summary["device"] == plan.device == "cpu" and "gpu" not in plan.machine
    assert plan.machine["torch_threads"] == plan.settings.threads
    assert f"Machine: {plan.machine['cpu']}" in report and "; device cpu " in report
    for key, stage in summary["stages"].items():
        assert stage["trained"] == {"seconds": stage["seconds"], "machine": plan.machine, "device": "cpu"}, key
        assert json.loads((plan.node(key).out_dir / "stage.json").read_text())["device"] == "cpu", key
    # every stage logged a progress line with an ETA and wrote metrics.jsonl
    assert any("eta" in line for line in lines)
    assert (plan.node("student/s1").out_dir / "metrics.jsonl").exists()


def test_second_run_skips_up_to_date_stages(micro_run):
    plan, _ = micro_run
    lines: list[str] = []
    again = run_pipeline("micro", out_root=plan.root.parent, printer=lines.append, claims=False)
    assert all(n.status.startswith("skipped") for n in again.nodes)
    # A skipped stage keeps the time and machine of the run that trained it.
    stages = json.loads((again.root / "pipeline.json").read_text())["stages"]
    assert all(s["seconds"] == 0 and s["trained"]["seconds"] > 0 for s in stages.values())


def test_changed_recipe_reruns_only_dependants(micro_run, tmp_path):
    plan, _ = micro_run
    changed = build_plan("micro", out_root=plan.root.parent, overrides=["stages.s3.train.lr=5e-4"])
    old = build_plan("micro", out_root=plan.root.parent)
    def depends_on_s3(node):
        while node is not None:
            if node.key.endswith("/s3"):
                return True
            node = node.parent
        return False

    for a, b in zip(old.nodes, changed.nodes):
        same = expected_hash(a) == expected_hash(b)
        assert same == (not depends_on_s3(a)), a.key
    assert not all(expected_hash(a) == expected_hash(b) for a, b in zip(old.nodes, changed.nodes)
                   if a.key == "flagship/reasoning-rl")  # post-training is downstream of S3


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


@pytest.mark.parametrize("seed_scale, pretraining_seeded", [
    ("tiny-seed1", True), ("tiny-seed2", True), ("tiny-post-seed1", False), ("tiny-post-seed2", False)])
def test_seed_scales_copy_what_they_share_with_tiny(seed_scale, pretraining_seeded):
    # `make seeds`: a seed scale reruns only the stages its seed changes and copies the rest from runs/tiny
    # (`reuse`), which works only while their lineages equal tiny's; the seeded stages must differ.
    tiny, seeded = build_plan("tiny"), build_plan(seed_scale)
    assert seeded.settings.reuse == "tiny"
    pretraining = {"tokenizer", "s1", "s2", "s3"}
    for node in seeded.nodes:
        stage = node.key.split("/")[-1]
        same = expected_hash(node) == expected_hash(tiny.node(node.key))
        if stage == "tokenizer" or (stage in pretraining) != pretraining_seeded:
            assert same, f"{seed_scale}: {node.key} would be retrained, not copied from tiny"
        else:
            assert not same and node.config.seed != 0, f"{seed_scale}: {node.key} is not reseeded"


def test_cut_stage_resumes_and_stale_output_is_moved_aside(micro_run):
    plan, _ = micro_run
    s2 = plan.node("student/s2").out_dir
    (s2 / "lineage.json").unlink()  # as if the run was cut before it completed
    lines: list[str] = []
    again = run_pipeline("micro", out_root=plan.root.parent, printer=lines.append, claims=False,
                         only={"student/s2"})
    assert any("continuing a cut run" in line for line in lines)
    assert any("resumed from" in line for line in lines)
    assert read_lineage(s2).hash == expected_hash(again.node("student/s2"))
    # a different config for the same directory: the old output is kept, renamed, not deleted
    lines.clear()
    run_pipeline("micro", out_root=plan.root.parent, printer=lines.append, claims=False, only={"student/s2"},
                 overrides=["stages.s2.train.min_lr_ratio=0.2"])
    assert any("moved aside" in line for line in lines)
    assert list(s2.parent.glob("s2.old-*"))


def test_a_stage_cut_after_its_final_checkpoint_writes_the_uncut_results(tmp_path):
    """Killed after the last checkpoint but before eval.json and lineage.json: the pipeline resumes the
    stage, which has no step left to train, and writes the final and held-out losses of the uncut run."""
    lines: list[str] = []
    plan = run_pipeline("micro", out_root=tmp_path, printer=lines.append, claims=False,
                        only={"tokenizer", "flagship/s1"})
    node = plan.node("flagship/s1")
    uncut = json.loads((node.out_dir / "eval.json").read_text())
    assert isinstance(uncut["final_loss"], float) and isinstance(uncut["heldout_loss"], float)
    (node.out_dir / "lineage.json").unlink()
    (node.out_dir / "eval.json").unlink()
    lines.clear()
    run_pipeline("micro", out_root=tmp_path, printer=lines.append, claims=False, only={node.key})
    assert any("resumed from" in line for line in lines)
    resumed = json.loads((node.out_dir / "eval.json").read_text())
    assert resumed["final_loss"] == uncut["final_loss"] and resumed["heldout_loss"] == uncut["heldout_loss"]
    assert read_lineage(node.out_dir).hash == expected_hash(node)


def test_every_stage_directory_and_tokenized_corpus_carries_checksums_that_hold(micro_run):
    plan, _ = micro_run
    models = [n.out_dir for n in plan.nodes if (n.out_dir / "model.safetensors").exists()]
    assert len(models) == len(plan.nodes) - 1  # all but the tokenizer
    for out in models:
        assert {"model.safetensors", "config.json", "state/trainer.json"} <= set(read_checksums(out)), out
        verify_checksums(out)
    corpora = [d for d in (plan.root / "data").iterdir() if list(d.glob("cache-*.arrow"))]
    assert corpora
    for d in corpora:
        manifest = json.loads((d / "manifest.json").read_text())
        assert {f.name for f in d.glob("cache-*.arrow")} <= set(manifest["derived_files"]), d


def test_post_training_stages_chain_and_hand_over_used_queries(micro_run):
    """Cold start -> reasoning RL in the pipeline: RL's parent is the filtered cold start, whose
    used queries it reads (criterion 1 of §4.2), and the unfiltered control starts from S3 too."""
    plan, _ = micro_run
    cold, rl = plan.node("flagship/cold-start"), plan.node("flagship/reasoning-rl")
    control = plan.node("flagship/cold-start-unfiltered")
    assert rl.parent is cold and cold.parent.key == "flagship/s3" and control.parent.key == "flagship/s3"
    used = json.loads((cold.out_dir / "used_queries.json").read_text())
    assert used and len(used) == len(set(used))
    filtered = [json.loads(line) for line in (cold.out_dir / "coldstart_filtered.jsonl").read_text().splitlines()]
    assert len(filtered) >= len(used)
    selection = json.loads((rl.out_dir / "selection.json").read_text())
    chosen = {q["uid"] for q in selection["selected"]}
    assert not chosen & set(used)
    claims = {c["name"] for c in json.loads((plan.root / "claims" / "claims.json").read_text())}
    assert {"filtering", "grpo", "thinkfollow", "thinking_vs_non_thinking", "thinking_budget"} <= claims
    rows = {c["name"]: c for c in json.loads((plan.root / "claims" / "claims.json").read_text())}
    probes = json.loads((plan.root / "claims" / "copy_probe.json").read_text())
    assert "flagship/cold-start" in probes  # the Filtering row failed at micro scale and was probed
    assert "does not copy prose from its context" in rows["filtering"]["diagnosis"]
    for name in ("filtering", "thinkfollow", "thinking_vs_non_thinking", "thinking_budget"):
        assert rows[name]["plots"] and all(Path(p).exists() for p in rows[name]["plots"]), name


def test_control_recipe_extends_and_takes_the_scale_sizes_of_what_it_controls():
    plan = build_plan("micro")
    cold, control = plan.node("flagship/cold-start").config, plan.node("flagship/cold-start-unfiltered").config
    assert control.responses == "unfiltered" and cold.responses == "filtered"
    differing = {k for k in cold.__dict__ if getattr(cold, k) != getattr(control, k)}
    assert differing == {"name", "responses", "description"}
    shorter = build_plan("micro", overrides=["stages.cold-start-unfiltered.sft.steps=1"])
    assert shorter.node("flagship/cold-start-unfiltered").config.sft["steps"] == 1
    assert shorter.node("flagship/cold-start").config.sft["steps"] == cold.sft["steps"]


def test_recipe_extends_cycle_is_named(tmp_path):
    from qwen3repro.recipes import load_recipe

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.toml").write_text('extends = "b"\n')
    (tmp_path / "recipes" / "b.toml").write_text('extends = "a"\n')
    with pytest.raises(ConfigError, match="cycle a -> b -> a"):
        load_recipe("a", root=tmp_path)
    (tmp_path / "recipes" / "c.toml").write_text('extends = "nope"\n')
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        load_recipe("c", root=tmp_path)


def test_fusion_follows_reasoning_rl_and_writes_its_data(micro_run):
    plan, _ = micro_run
    fusion = plan.node("flagship/fusion")
    assert fusion.parent.key == "flagship/reasoning-rl"
    assert (fusion.out_dir / "fusion_data.jsonl").exists() and (fusion.out_dir / "fusion_report.json").exists()


def test_scale_extends_another_and_names_a_cycle(tmp_path):
    from qwen3repro.recipes import load_scale, scale_lineage

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "base.toml").write_text('[stages.s1]\nseq_len = 64\ntokens = 100\n')
    (tmp_path / "tiny" / "bigger.toml").write_text('extends = "base"\n[stages.s1]\ntokens = 400\n')
    assert load_scale("bigger", root=tmp_path) == {"stages": {"s1": {"seq_len": 64, "tokens": 400}}}
    assert scale_lineage("bigger", root=tmp_path) == ["base", "bigger"]
    (tmp_path / "tiny" / "loop.toml").write_text('extends = "loop"\n')
    with pytest.raises(ConfigError, match="cycle loop -> loop"):
        load_scale("loop", root=tmp_path)


def test_small_scale_is_tiny_with_longer_post_training():
    """`small` changes only post-training sizes (and the evaluations), so every pretraining stage
    has the lineage hash of tiny's and is copied from a finished tiny run instead of retrained."""
    tiny, small = build_plan("tiny"), build_plan("small")
    assert small.settings.reuse == "tiny"
    for node in small.nodes:
        if node.kind in ("tokenizer", "pretrain"):
            assert expected_hash(node) == expected_hash(tiny.node(node.key)), node.key
    assert small.node("flagship/cold-start").config.sft["steps"] > tiny.node("flagship/cold-start").config.sft["steps"]
    assert expected_hash(small.node("flagship/fusion")) != expected_hash(tiny.node("flagship/fusion"))


def test_reuse_copies_finished_stages_of_the_same_lineage(micro_run, tmp_path, monkeypatch):
    """A scale that `extends` micro with `reuse = "micro"` and a longer fusion SFT: the pretraining,
    cold start and RL directories are copied from the finished micro run (same lineage hashes, the
    model loads), fusion is retrained, and only the claims the scale lists are measured."""
    import shutil

    plan, _ = micro_run
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "tiny").mkdir()
    shutil.copy(repo / "tiny" / "micro.toml", tmp_path / "tiny" / "micro.toml")
    shutil.copytree(repo / "recipes", tmp_path / "recipes")
    (tmp_path / "tiny" / "micro-long.toml").write_text(
        'extends = "micro"\n[pipeline]\nreuse = "micro"\nclaims = ["grpo"]\n'
        '[stages.fusion.sft]\nsteps = 6\n')
    monkeypatch.setenv("QWEN3REPRO_ROOT", str(tmp_path))
    out_root = plan.root.parent
    lines: list[str] = []
    long = run_pipeline("micro-long", out_root=out_root, printer=lines.append)
    status = {n.key: n.status for n in long.nodes}
    assert status["flagship/s3"] == "copied from micro" and status["flagship/reasoning-rl"] == "copied from micro"
    assert status["flagship/fusion"].startswith("trained")
    recorded = json.loads((long.root / "pipeline.json").read_text())["stages"]
    assert recorded["flagship/s3"]["trained"] == json.loads((plan.node("flagship/s3").out_dir / "timing.json").read_text())
    for node in long.nodes:
        assert read_lineage(node.out_dir).hash == expected_hash(node), node.key
    assert Qwen3.from_pretrained(long.node("flagship/s3").out_dir).config.rope_theta == 1e6
    assert not list(long.root.glob("**/*.copying"))
    claims = json.loads((long.root / "claims" / "claims.json").read_text())
    assert {c["name"] for c in claims} == {"grpo"}
    report = (long.root / "REPORT.md").read_text()
    assert "copied from its run, not retrained: `tokenizer`, `flagship/s1`" in report
    assert "`flagship/fusion`" not in report.split("retrained:")[1].split("\n")[0]
    assert "| flagship/fusion | 6 |" in report and "| flagship/reasoning-rl | 2 |" in report  # post-training rows
    # A second run finds everything up to date (copies are ordinary finished stages).
    again = run_pipeline("micro-long", out_root=out_root, printer=lines.append, claims=False)
    assert all(n.status.startswith("skipped") for n in again.nodes)
