"""The stage graph is the recipes': kind, parent, roles and what a stage takes from its parent.

Both scales walk it: the tiny pipeline (`pipeline.build_plan`) and the full-scale generator
(`nanotron.config_gen`, tested in test_nanotron_config.py). Adding a stage is one recipe file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qwen3repro.config import ConfigError
from qwen3repro.lineage import make_lineage, write_lineage
from qwen3repro.pipeline import STAGE_KINDS, build_plan, expected_hash
from qwen3repro.recipes import StageGraph, load_recipe, load_stage_graph, repo_root, stage_facts

SCALES = ("micro", "tiny", "small")


def test_every_recipe_states_its_place_in_the_graph():
    graph = load_stage_graph()
    roots = [name for name, facts in graph.facts.items() if facts.is_root]
    assert roots == ["tokenizer"]
    for name, facts in graph.facts.items():
        assert facts.kind in STAGE_KINDS, name
        assert graph.ancestors(name)[-1:] in ([], ["tokenizer"])  # every chain ends at the tokenizer


@pytest.mark.parametrize("scale", SCALES)
def test_every_stage_runs_after_the_stages_it_uses(scale):
    plan = build_plan(scale)
    position = {node.key: i for i, node in enumerate(plan.nodes)}
    used = [(node, dep) for node in plan.nodes for dep in node.uses.values()]
    assert used or scale not in ("micro", "tiny", "small")
    for node, dep in used:
        assert position[dep.key] < position[node.key]


@pytest.mark.parametrize("scale", SCALES)
def test_plan_parents_and_kinds_are_the_recipes(scale):
    graph = load_stage_graph()
    plan = build_plan(scale)
    for node in plan.nodes:
        stage = node.key.split("/")[-1]
        assert node.kind == graph[stage].kind
        assert (node.parent.key.split("/")[-1] if node.parent else None) == graph[stage].parent
        if node.parent is not None and node.parent.parent is not None:
            assert node.key.split("/")[0] in graph[stage].roles


@pytest.mark.parametrize("scale", SCALES)
def test_lengths_and_continued_lr_derive_from_the_parent(scale):
    """S3 is 8x S1's length at every scale; S2 and the S1 control continue S1's length, LR and batch size."""
    plan = build_plan(scale)
    for role in plan.roles_with("s3"):
        s1, s2, s3 = (plan.node(f"{role}/{s}").config for s in ("s1", "s2", "s3"))
        assert s3.seq_len == load_recipe("s3")["seq_len_factor"] * s1.seq_len == 8 * s1.seq_len
        assert (s2.seq_len, s2.batch_size, s2.train["lr"]) == (s1.seq_len, s1.batch_size, s1.train["lr"])
    for role in plan.roles_with("s1-control"):
        s1, control = plan.node(f"{role}/s1").config, plan.node(f"{role}/s1-control").config
        assert (control.seq_len, control.batch_size, control.train["lr"]) == (s1.seq_len, s1.batch_size,
                                                                             s1.train["lr"])


def test_scale_stating_a_derived_size_is_an_error():
    with pytest.raises(ConfigError, match="seq_len comes from the parent stage"):
        build_plan("micro", overrides=["stages.s3.seq_len=1024"])
    with pytest.raises(ConfigError, match="train.lr comes from the parent stage"):
        build_plan("micro", overrides=["stages.s2.train.lr=1e-3"])


def test_graph_errors_name_the_problem():
    with pytest.raises(ConfigError, match="`kind`"):
        stage_facts("x", {"parent": "s1", "roles": ["flagship"]})
    with pytest.raises(ConfigError, match="roles"):
        stage_facts("x", {"kind": "pretrain", "parent": "s1"})
    a = stage_facts("a", {"kind": "pretrain", "parent": "b", "roles": ["flagship"]})
    b = stage_facts("b", {"kind": "pretrain", "parent": "a", "roles": ["flagship"]})
    with pytest.raises(ConfigError, match="cycle"):
        StageGraph({"a": a, "b": b})
    with pytest.raises(ConfigError, match="parent 'nowhere' has no recipe"):
        StageGraph({"a": stage_facts("a", {"kind": "pretrain", "parent": "nowhere", "roles": ["flagship"]})})
    with pytest.raises(ConfigError, match="listed before its parent"):
        build_plan("micro", overrides=['pipeline.stages=["tokenizer", "s2", "s1"]'])


def test_adding_a_stage_is_one_recipe_file(tmp_path, monkeypatch):
    """A new pretraining stage after S2 (say a second reasoning stage) needs its recipe and nothing else:
    the pipeline finds its kind and parent, derives its length and LR from S2, and gives it its sizes."""
    root = tmp_path / "repo"
    for folder in ("recipes", "tiny"):
        shutil.copytree(repo_root() / folder, root / folder)
    (root / "recipes" / "s2b.toml").write_text(
        'extends = "s2"\n'
        'parent = "s2"\n'
        'roles = ["flagship"]\n'
        'description = "a second reasoning stage"\n')
    monkeypatch.setenv("QWEN3REPRO_ROOT", str(root))
    plan = build_plan("micro", overrides=[
        'pipeline.stages=["tokenizer", "s1", "s2", "s2b", "s3"]', "stages.s2b.tokens=4000", "stages.s2b.n_docs=100"])
    node = plan.node("flagship/s2b")
    assert node.parent is plan.node("flagship/s2") and node.kind == "pretrain"
    assert node.config.seq_len == plan.node("flagship/s1").config.seq_len
    assert node.config.tokens == 4000 and not plan.has("student", "s2b")
    assert Path(node.out_dir).name == "s2b"


def test_uses_must_name_stages_that_run_first():
    a = stage_facts("a", {"kind": "pretrain", "parent": None, "roles": ["flagship"]})
    b = stage_facts("b", {"kind": "pretrain", "parent": "a", "roles": ["flagship"]})
    with pytest.raises(ConfigError, match="uses 'nowhere', which has no recipe"):
        StageGraph({"a": a, "b": b, "c": stage_facts("c", {"kind": "pretrain", "parent": "a", "uses": ["nowhere"],
                                                                "roles": ["flagship"]})})
    with pytest.raises(ConfigError, match="descends from it"):
        StageGraph({"a": a, "c": stage_facts("c", {"kind": "pretrain", "parent": "a", "uses": ["d"],
                                                   "roles": ["flagship"]}),
                    "d": stage_facts("d", {"kind": "pretrain", "parent": "c", "roles": ["flagship"]})})
    with pytest.raises(ConfigError, match="`uses` must be a list"):
        stage_facts("c", {"kind": "pretrain", "parent": "a", "uses": "b", "roles": ["flagship"]})
    with pytest.raises(ConfigError, match="names the stage itself or its parent"):
        stage_facts("c", {"kind": "pretrain", "parent": "a", "uses": ["a"], "roles": ["flagship"]})
    graph = StageGraph({"a": a, "b": b, "c": stage_facts("c", {"kind": "pretrain", "parent": "a", "uses": ["b"],
                                                                "roles": ["flagship"]})})
    with pytest.raises(ConfigError, match="uses 'b', which must be listed before it"):
        graph.order(["a", "c", "b"])
    assert graph.order(["a", "b", "c"]) == ["a", "b", "c"]
    assert (graph.depth("a"), graph.depth("b"), graph.depth("c")) == (0, 1, 2)  # c runs after the stage it uses


def test_a_used_stage_enters_the_lineage_hash(tmp_path, monkeypatch):
    """A stage that `uses` another is planned after it, gets its directory, and its expected lineage hash
    changes when the used stage's config does (and equals what `make_lineage` writes for it)."""
    root = tmp_path / "repo"
    for folder in ("recipes", "tiny"):
        shutil.copytree(repo_root() / folder, root / folder)
    (root / "recipes" / "s2b.toml").write_text('extends = "s2"\nparent = "s1"\nuses = ["s2"]\nroles = ["flagship"]\n')
    monkeypatch.setenv("QWEN3REPRO_ROOT", str(root))
    stages = 'pipeline.stages=["tokenizer", "s1", "s2", "s2b"]'
    sizes = ["stages.s2b.tokens=4000", "stages.s2b.n_docs=100"]
    plan = build_plan("micro", out_root=tmp_path / "runs", overrides=[stages, *sizes])
    node = plan.node("flagship/s2b")
    assert node.uses == {"s2": plan.node("flagship/s2")}
    changed = build_plan("micro", out_root=tmp_path / "runs", overrides=[stages, *sizes, "stages.s2.tokens=9000"])
    assert expected_hash(changed.node("flagship/s2b")) != expected_hash(node)
    assert expected_hash(changed.node("flagship/s1")) == expected_hash(plan.node("flagship/s1"))
    # What the stage writes when it finishes is what the pipeline expects.
    for key in ("tokenizer", "flagship/s1", "flagship/s2"):
        n = plan.node(key)
        n.out_dir.mkdir(parents=True)
        write_lineage(n.out_dir, make_lineage(n.key, n.config, n.parent.out_dir if n.parent else None))
    written = make_lineage("s2b", node.config, node.parent.out_dir, uses={"s2": plan.node("flagship/s2").out_dir})
    assert written.hash == expected_hash(node)
    with pytest.raises(ConfigError, match="uses 's2'"):
        build_plan("micro", out_root=tmp_path / "runs", overrides=['pipeline.stages=["tokenizer", "s1", "s2b"]', *sizes])


def test_a_stage_may_use_another_roles_stage(tmp_path, monkeypatch):
    """A student stage that reads a flagship's output (distillation's teacher) names it "role/stage": it is
    planned after it, its input is the flagship's directory, and its hash follows the flagship's stage.
    A role listed after the student, an unknown role or a stage the scale does not run is an error."""
    root = tmp_path / "repo"
    for folder in ("recipes", "tiny"):
        shutil.copytree(repo_root() / folder, root / folder)
    (root / "recipes" / "s2t.toml").write_text(
        'extends = "s2"\nparent = "s1"\nuses = ["flagship/s2"]\nroles = ["student"]\n')
    monkeypatch.setenv("QWEN3REPRO_ROOT", str(root))
    stages = 'pipeline.stages=["tokenizer", "s1", "s2", "s2t"]'
    sizes = ["stages.s2t.tokens=4000", "stages.s2t.n_docs=100"]
    plan = build_plan("micro", out_root=tmp_path / "runs", overrides=[stages, *sizes])
    node, teacher = plan.node("student/s2t"), plan.node("flagship/s2")
    assert node.uses == {"flagship/s2": teacher} and node.parent is plan.node("student/s1")
    keys = [n.key for n in plan.nodes]
    assert keys.index("flagship/s2") < keys.index("student/s2t")
    assert load_stage_graph(root).depth("s2t") > load_stage_graph(root).depth("s2")
    changed = build_plan("micro", out_root=tmp_path / "runs",
                         overrides=[stages, *sizes, "roles.flagship.stages.s2.tokens=9000"])
    assert expected_hash(changed.node("student/s2t")) != expected_hash(node)
    assert expected_hash(changed.node("student/s1")) == expected_hash(plan.node("student/s1"))
    # What the stage writes when it finishes is what the pipeline expects.
    for n in plan.nodes:
        if n.key != "student/s2t":
            n.out_dir.mkdir(parents=True)
            write_lineage(n.out_dir, make_lineage(n.key, n.config, n.parent.out_dir if n.parent else None))
    written = make_lineage("s2t", node.config, node.parent.out_dir, uses={"flagship/s2": teacher.out_dir})
    assert written.hash == expected_hash(node)
    with pytest.raises(ConfigError, match=r"roles must list 'flagship' before 'student'"):
        build_plan("micro", out_root=tmp_path / "runs",
                   overrides=[stages, *sizes, 'pipeline.roles=["student", "flagship"]'])
    with pytest.raises(ConfigError, match="which must be listed before it"):
        build_plan("micro", out_root=tmp_path / "runs", overrides=['pipeline.stages=["tokenizer", "s1", "s2t"]', *sizes])
    (root / "recipes" / "s2t.toml").write_text(
        'extends = "s2"\nparent = "s1"\nuses = ["teacher/s2"]\nroles = ["student"]\n')
    with pytest.raises(ConfigError, match="runs s2 for flagship, student, moe-student, not for teacher"):
        load_stage_graph(root)
    with pytest.raises(ConfigError, match="must be a stage name or role/stage"):
        stage_facts("x", {"kind": "pretrain", "parent": "s1", "uses": ["/s2"], "roles": ["student"]})
