"""The pipeline: walk the stage DAG of a scale, skip what is up to date, resume what was cut.

    qwen3repro pipeline tiny            # = make tiny-pipeline
    qwen3repro pipeline micro --dry-run # print every resolved stage config and exit

The stage graph comes from the recipes (`recipes.StageGraph`: each recipe's `kind`, `parent` and
`roles`). A scale file (`tiny/<scale>.toml`) names its roles (the flagship and the students, each a
registry model), the stages it runs, and their sizes; a stage runs for every role its recipe names.
Every stage's config is its recipe (`recipes/<stage>.toml`) deep-merged with the scale's
`[stages.<stage>]` table, then the role's `[roles.<role>.stages.<stage>]` table, then `--set`
overrides; what the recipe derives from the parent (sequence length, a continued LR and batch size)
is filled in from the parent's resolved config.

Skipping and resuming. Each stage directory gets `stage.json` (its resolved config and lineage
hash) when it starts and `lineage.json` when it is complete. A complete directory whose lineage
hash matches is skipped; a directory started with the same hash resumes from its last checkpoint;
a directory made by a different config is moved aside (`<dir>.old-<hash>`), never deleted.

After the stages come the claims (`evals/` suites: S2 reasoning vs the control, long-context
retrieval, the MoE load-balancing experiment) and `REPORT.md`.

One writer per run directory: a run holds `<out>/<scale>/.lock` (`run_lock`) from its first write to
its last, and a second run on the same directory stops at once with an error naming the holder's pid.

One device per run (`--device`: cpu, cuda, cuda:N or auto; `devices.pipeline_device` checks it before
anything runs): every stage trains, generates and evaluates there, and so do the claims and the
experiments. It is bookkeeping, not identity: no stage config states it (a stage table that does is
refused) and no lineage hash contains it, so a stage trained on a GPU is skipped by a CPU run and the
other way round; each stage's `timing.json` and the run's `pipeline.json` record the device it ran on.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets
import torch

from .config import ConfigError, config_hash
from .config_fields import Positive, SettingError, checked_fields, dotted
from .devices import pipeline_device
from .evals.claims import run_claims
from .lineage import chain_hash, parent_with_uses, read_lineage
from .recipes import (StageFacts, StageGraph, check_stage_tables, deep_merge, load_recipe, load_scale, load_stage_graph,
                      parse_override, recipe_lineage, split_recipe, split_use)
from .files import RunFileError, read_json_object, write_json_atomic
from .perf import describe_machine, machine_info
from .progress import format_duration
from .run_lock import RunLock
from .stages import coldstart, distill, fusion, general_rl, grpo, onpolicy_distill, pretrain, sft, teacher_outputs
from .stages import reward_model as reward_model_stage
from .stages import tokenizer as tokenizer_stage
from .stages.common import StageContext
from .train.metrics import default_printer

STAGE_FILE = "stage.json"
TIMING_FILE = "timing.json"
"""In a stage's directory: the seconds the pipeline spent training it and the machine it ran on."""
SCALE_SECTIONS = ("pipeline", "roles", "stages", "evals", "experiments")


@dataclass(frozen=True)
class PipelineSettings:
    roles: tuple[str, ...]
    """The models this scale trains (each a `[roles.<role>]` table naming its registry model)."""
    stages: tuple[str, ...]
    """The stages this scale runs, each after its parent. A stage runs once for every role its recipe
    names (`roles`) among this scale's roles; a root stage (the tokenizer) runs once for all."""
    threads: Positive = 2
    reuse: str = ""
    """Another scale whose completed stages are copied here when their lineage hash is the one this
    scale wants (same config, same parents): a larger scale that only lengthens post-training
    starts from the smaller scale's pretraining instead of redoing it. Empty: train everything."""
    claims: tuple[str, ...] = ()
    """The claims to measure (names in the claims registry); empty: all of them."""


@dataclass
class StageNode:
    key: str                      # "tokenizer", "flagship/s1", ...
    kind: str                     # a STAGE_KINDS key
    config: Any
    out_dir: Path
    parent: "StageNode | None" = None
    uses: dict[str, "StageNode"] = field(default_factory=dict)
    """The other stage nodes whose outputs this one reads, by their recipe `uses` entry: a stage of the
    same role ("reward-model") or of another ("flagship/general-rl")."""
    status: str = "pending"
    seconds: float = 0.0


@dataclass
class Plan:
    scale: str
    root: Path
    settings: PipelineSettings
    nodes: list[StageNode]
    scale_config: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    """`perf.machine_info` of the machine this invocation runs on (filled by `run_stages`)."""
    device: str = "cpu"
    """Where every stage, evaluation, claim and experiment of this run computes (`devices.pipeline_device`)."""

    def node(self, key: str) -> StageNode:
        for n in self.nodes:
            if n.key == key:
                return n
        raise KeyError(key)

    # What evaluations ask of a plan: which roles ran a stage, where its output is, and the
    # scale's settings for an evaluation or experiment.
    def has(self, role: str, stage: str) -> bool:
        return any(n.key == f"{role}/{stage}" for n in self.nodes)

    def roles_with(self, stage: str) -> list[str]:
        """The roles whose chain includes `stage`, in the scale's role order."""
        return [role for role in self.settings.roles if self.has(role, stage)]

    def stage_dir(self, role: str, stage: str) -> Path:
        return self.node(f"{role}/{stage}").out_dir

    def eval_settings(self, name: str) -> dict[str, Any]:
        """The scale's `[evals.<name>]` table (empty when absent)."""
        return dict(self.scale_config.get("evals", {}).get(name, {}))

    def experiment_settings(self, name: str) -> dict[str, Any]:
        """The scale's `[experiments.<name>]` table (empty when absent)."""
        return dict(self.scale_config.get("experiments", {}).get(name, {}))


# ----------------------------------------------------------------------------- planning
# Each kind of stage (a recipe's `kind`): the module whose `run(cfg, parent_dir, ctx)` trains it, and its
# config class.
STAGE_KINDS = {
    "tokenizer": (tokenizer_stage, tokenizer_stage.TokenizerConfig),
    "pretrain": (pretrain, pretrain.PretrainConfig),
    "sft": (sft, sft.SFTConfig),
    "coldstart": (coldstart, coldstart.ColdStartStageConfig),
    "grpo": (grpo, grpo.GRPOConfig),
    "fusion": (fusion, fusion.FusionConfig),
    "reward-model": (reward_model_stage, reward_model_stage.RewardModelConfig),
    "general-rl": (general_rl, general_rl.GeneralRLConfig),
    "teacher-outputs": (teacher_outputs, teacher_outputs.TeacherOutputsConfig),
    "distill": (distill, distill.DistillConfig),
    "onpolicy-distill": (onpolicy_distill, onpolicy_distill.OnPolicyDistillConfig),
}


def stage_module(kind: str):
    if kind not in STAGE_KINDS:
        raise ConfigError(f"unknown stage kind {kind!r}; known: {sorted(STAGE_KINDS)}")
    return STAGE_KINDS[kind][0]


def config_class(kind: str) -> type:
    stage_module(kind)
    return STAGE_KINDS[kind][1]


def build_plan(scale: str, *, out_root: str | os.PathLike = "runs", overrides: list[str] = (),
               device: str = "cpu") -> Plan:
    """Resolve every stage config of `scale` (strictly) and the run's `device` without running anything.

    The tables of stages and roles the scale does not run are resolved too (and dropped): a wrong
    setting is an error whether or not its stage runs this time. A device this machine does not have
    is an error here, before any stage runs."""
    device = pipeline_device(device)
    raw = load_scale(scale)
    for text in overrides:
        raw = deep_merge(raw, parse_override(text))
    unknown = set(raw) - set(SCALE_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)} in tiny/{scale}.toml or --set; "
                          f"valid: {list(SCALE_SECTIONS)}")
    pipeline_table = checked_fields(PipelineSettings, raw.get("pipeline", {}), "pipeline")
    settings = PipelineSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in pipeline_table.items()})
    graph = load_stage_graph()
    check_stage_tables(raw, graph)
    graph.order(settings.stages)
    root = Path(out_root) / scale
    roles = raw.get("roles", {})
    for role in settings.roles:
        if role not in roles:
            raise ConfigError(f"tiny/{scale}.toml: role {role!r} has no [roles.{role}] table")
    nodes = _resolve_nodes(raw, graph, settings.roles, settings.stages, root)
    _check_unrun_tables(raw, graph, settings, root)
    return Plan(scale, root, settings, nodes, raw, device=device)


def _resolve_nodes(raw: Mapping[str, Any], graph: StageGraph, roles: tuple[str, ...] | list[str],
                   stages: tuple[str, ...] | list[str], root: Path, *,
                   may_lack_parent: frozenset[str] = frozenset()) -> list[StageNode]:
    """The nodes of `stages` (parents first) for `roles`. A stage in `may_lack_parent` whose parent is not
    among them has its settings type-checked only: what it derives from the parent is unknown."""
    tables = raw.get("stages", {})
    nodes: list[StageNode] = []
    shared: dict[str, StageNode] = {}
    for stage in stages:  # root stages (the tokenizer): one run shared by every role
        if graph[stage].is_root:
            config = _resolve(graph[stage], [(f"stages.{stage}", tables.get(stage, {}))])
            node = StageNode(stage, graph[stage].kind, config, root / stage)
            shared[stage] = node
            nodes.append(node)
    for role in roles:
        role_raw = dict(raw.get("roles", {})[role])
        role_stages = role_raw.pop("stages", {})
        checked_fields(_RoleFields, role_raw, f"roles.{role}")
        by_name: dict[str, StageNode] = dict(shared)
        for stage in stages:
            facts = graph[stage]
            if facts.is_root or role not in facts.roles:
                continue
            # A recipe that `extends` another also takes the scale's sizes of that stage first, so
            # a control run is the same size as what it controls unless the scale says otherwise.
            layers: list[tuple[str, Mapping[str, Any]]] = []
            if graph[facts.parent].is_root:  # the first stage after the tokenizer builds the role's model
                layers.append((f"roles.{role}", {"model": role_raw["model"]}))
            for name in recipe_lineage(stage):
                layers += [(f"stages.{name}", tables.get(name, {})),
                           (f"roles.{role}.stages.{name}", role_stages.get(name, {}))]
            parent = by_name.get(facts.parent)
            if parent is None:
                if stage not in may_lack_parent:
                    raise ConfigError(f"stage {stage!r} of role {role!r} needs its parent {facts.parent!r} "
                                      "in [pipeline] stages")
                _resolve(facts, layers, complete=False)
                continue
            layers.append((f"stages.{stage}", _derived_from_parent(facts, parent, layers)))
            node = StageNode(f"{role}/{stage}", facts.kind, _resolve(facts, layers), root / role / stage, parent,
                             {u: _used_node(u, role, stage, by_name, nodes, roles) for u in facts.uses})
            by_name[stage] = node
            nodes.append(node)
    return nodes


def _used_node(use: str, role: str, stage: str, by_name: Mapping[str, StageNode], earlier: list[StageNode],
               roles: Sequence[str]) -> StageNode:
    """The node `use` names for `role`'s `stage`: the same role's stage, or another role's ("role/stage"),
    which must already be planned (an earlier role of the scale, the stage listed in [pipeline] stages)."""
    used_role, used_stage = split_use(use)
    if used_role is None:
        if use not in by_name:
            raise ConfigError(f"stage {stage!r} of role {role!r} uses {use!r} (recipes/{stage}.toml); "
                              f"add it to [pipeline] stages before {stage!r}")
        return by_name[use]
    found = next((n for n in earlier if n.key == use), None)
    if found is None:
        raise ConfigError(f"stage {stage!r} of role {role!r} uses {use!r} (recipes/{stage}.toml), which this "
                          f"scale does not run before it: [pipeline] roles must list {used_role!r} before "
                          f"{role!r} (now {list(roles)}) and stages must include {used_stage!r}")
    return found


def _check_unrun_tables(raw: Mapping[str, Any], graph: StageGraph, settings: PipelineSettings, root: Path) -> None:
    """Resolve, as the pipeline would, the stage tables of the scale that this run does not use: those
    of stages outside `[pipeline] stages` and of roles outside `[pipeline] roles`. A table whose stage no
    role of the scale runs is type-checked against its recipe."""
    roles = list(raw.get("roles", {}))
    tabled = set(raw.get("stages", {})) | {name for r in roles for name in raw.get("roles", {})[r].get("stages", {})}
    extra = tabled - set(settings.stages)
    if not extra and set(roles) == set(settings.roles):
        return
    stages = sorted(set(settings.stages) | extra, key=graph.depth)  # parents and used stages first
    nodes = _resolve_nodes(raw, graph, roles, stages, root, may_lack_parent=frozenset(extra))
    run_by_a_role = {n.key.split("/")[-1] for n in nodes}
    for stage in sorted(extra - run_by_a_role):
        if not graph[stage].is_root and not set(graph[stage].roles) & set(roles):
            _resolve(graph[stage], [(f"stages.{stage}", raw.get("stages", {}).get(stage, {}))], complete=False)


def stage_config(name: str, table: Mapping[str, Any], where: str):
    """Stage `name`'s config: its recipe with a scale's `table` for it (found at `where`, for error messages)
    merged on top, checked as the pipeline checks it. What a job outside the tiny pipeline (the full scale's
    teacher outputs) builds its stage config with."""
    return _resolve(load_stage_graph()[name], [(where, table)])


def _resolve(facts: StageFacts, layers: list[tuple[str, Mapping[str, Any]]], *, complete: bool = True):
    """The stage config: its recipe (without the graph keys) with `layers` (the key path each table sits
    at, the table) merged on top in order. A wrong setting is named at the key that set it.
    `complete=False`: check the settings present, build nothing."""
    _, recipe = split_recipe(load_recipe(facts.name))
    layers = [(f"recipes/{facts.name}.toml", recipe), *layers]
    merged: dict[str, Any] = {}
    for label, table in layers:
        merged = deep_merge(merged, table, f"{label}.")
    stated = next(_device_settings(merged), None)
    if stated is not None:
        raise ConfigError(f"{_origin(stated, layers, f'stages.{facts.name}')}: the device is set for the whole run "
                          "(qwen3repro pipeline --device, make ... DEVICE=), not in a stage's settings")
    if not facts.is_root:
        merged["name"] = facts.name
    cls, where = config_class(facts.kind), f"stages.{facts.name}"
    try:
        if not complete:
            return checked_fields(cls, merged, where, complete=False)
        return cls.from_dict(merged, where=where)
    except SettingError as e:
        if e.where != where:
            raise
        raise ConfigError(f"{_origin(e.path, layers, where)}: {e.problem}") from None


def _device_settings(table: Mapping[str, Any], path: tuple[str, ...] = ()):
    """The key paths of `table` (nested tables included) that set a `device`. A stage config's own `device`
    fields (the RL stages', the reward model's, a `train` table's) keep their default, "cpu", in every
    lineage hash; the run's device comes from `--device` alone, so two settings can never disagree."""
    for key, value in table.items():
        if key == "device":
            yield (*path, key)
        elif isinstance(value, Mapping):
            yield from _device_settings(value, (*path, key))


def _origin(path: tuple[str, ...], layers: list[tuple[str, Mapping[str, Any]]], fallback: str) -> str:
    """The key that set `path`: under the last of `layers` (merge order) that holds it; under `fallback`
    when none does (a required setting nobody set)."""
    return _stated_at(path, layers) or dotted(fallback, *path)


def _stated_at(path: tuple[str, ...], layers: list[tuple[str, Mapping[str, Any]]]) -> str | None:
    """Where the last of `layers` (label, table) that holds `path` states it; None when none does."""
    for label, table in reversed(layers):
        node: Any = table
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                break
            node = node[key]
        else:
            return f"{label}: {dotted(*path)}" if label.endswith(".toml") else dotted(label, *path)
    return None


def _derived_from_parent(facts: StageFacts, parent: StageNode, layers: list[tuple[str, Mapping[str, Any]]]
                         ) -> dict[str, Any]:
    """What the recipe derives from the parent: its sequence length x `seq_len_factor`, and its peak LR
    and batch size when the stage continues them. No table of the scale may state them too."""
    derived: dict[str, Any] = {}
    values: list[tuple[tuple[str, ...], Any]] = []
    if facts.seq_len_factor is not None:
        values.append((("seq_len",), parent.config.seq_len * facts.seq_len_factor))
    if facts.continues_parent_lr:
        if "lr" not in parent.config.train:
            raise ConfigError(f"stages.{facts.parent}.train.lr: not set, and {facts.name} continues its parent's "
                              f"peak LR (recipes/{facts.name}.toml)")
        values += [(("batch_size",), parent.config.batch_size), (("train", "lr"), parent.config.train["lr"])]
    for path, value in values:
        stated = _stated_at(path, layers)
        if stated is not None:
            raise ConfigError(f"{stated} comes from the parent stage (recipes/{facts.name}.toml); "
                              "remove it from the scale")
        table = derived
        for key in path[:-1]:
            table = table.setdefault(key, {})
        table[path[-1]] = value
    return derived


@dataclass(frozen=True)
class _RoleFields:
    model: str


def expected_hash(node: StageNode) -> str:
    """The lineage hash the node's output will have: its config chained with its parents' (and with those
    of the stages it uses: `lineage.parent_with_uses`)."""
    parent_hash = expected_hash(node.parent) if node.parent is not None else None
    uses = {name: expected_hash(used) for name, used in node.uses.items()}
    return chain_hash(config_hash(node.config), parent_with_uses(parent_hash, uses))


def describe(plan: Plan) -> str:
    lines = [f"pipeline {plan.scale}: {len(plan.nodes)} stages under {plan.root}",
             f"device: {plan.device} (every stage, evaluation, claim and experiment; not in the lineage hashes)"]
    for node in plan.nodes:
        d = node.config.__dict__ if hasattr(node.config, "__dict__") else node.config
        uses = "".join(f", uses: {used.key}" for used in node.uses.values())
        lines.append(f"\n[{node.key}] -> {node.out_dir} (parent: {node.parent.key if node.parent else '-'}{uses}, "
                     f"lineage {expected_hash(node)})")
        if node.kind == "pretrain":
            lines.append(f"  steps = {node.config.steps}")
        for k, v in d.items():
            lines.append(f"  {k} = {json.dumps(v, default=str)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running
def _move_aside(node: StageNode, lineage, say: Callable[[str], None]) -> None:
    """Rename a stage directory that another config made (never delete it): `<name>.old-<hash>-<time>`."""
    out = node.out_dir
    aside = out.with_name(f"{out.name}.old-{(lineage.hash if lineage else 'partial')}-{int(time.time())}")
    say(f"{node.key}: {out} was made by another config; moved aside to {aside.name}")
    os.rename(out, aside)


def _prepare_dir(node: StageNode, say: Callable[[str], None], device: str) -> str:
    """'skip' when complete and matching; otherwise make the directory ready to (re)start or resume."""
    out = node.out_dir
    want = expected_hash(node)
    lineage = read_lineage(out) if out.exists() else None
    if lineage is not None and lineage.complete and lineage.hash == want:
        return "skip"
    started = out / STAGE_FILE
    if out.exists():
        same_run = started.exists() and read_json_object(started).get("lineage_hash") == want and lineage is None
        if not same_run:
            _move_aside(node, lineage, say)
        else:
            say(f"{node.key}: continuing a cut run from its newest checkpoint, if it wrote one")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / STAGE_FILE, {"key": node.key, "lineage_hash": want, "device": device,
                                         "config": node.config.__dict__})
    return "run"


def _reuse(plan: Plan, node: StageNode, say: Callable[[str], None]) -> bool:
    """Copy `node`'s directory from the `reuse` scale when that one is complete with the lineage hash
    `node` wants and this scale's is not. The copy goes to a temporary name first and is renamed into
    place, so a cut copy is never taken for a finished stage; a directory already here that another
    config made is moved aside (`_move_aside`)."""
    if not plan.settings.reuse:
        return False
    want = expected_hash(node)
    here = read_lineage(node.out_dir) if node.out_dir.exists() else None
    if here is not None and here.complete and here.hash == want:
        return False  # up to date: the normal skip
    source = plan.root.parent / plan.settings.reuse / node.out_dir.relative_to(plan.root)
    there = read_lineage(source) if source.exists() else None
    if there is None or not there.complete or there.hash != want:
        return False
    out = node.out_dir
    if out.exists():
        _move_aside(node, here, say)
    partial = out.with_name(f"{out.name}.copying")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    os.rename(partial, out)
    say(f"{node.key}: same lineage as {source}; copied (not retrained)")
    return True


def run_stages(plan: Plan, *, only: set[str] | None = None, printer: Callable[[str], None] | None = None) -> Plan:
    say = printer or default_printer()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(plan.settings.threads)
    datasets.disable_progress_bars()  # the stages print their own progress lines
    try:
        plan.machine = machine_info(device=plan.device)  # at the run's thread count
        say(f"machine: {describe_machine(plan.machine)}; device {plan.device}")
        _run_nodes(plan, only, say)
    finally:
        torch.set_num_threads(previous_threads)
    return plan


def _run_nodes(plan: Plan, only: set[str] | None, say: Callable[[str], None]) -> None:
    cache_dir = plan.root / "data"
    for node in plan.nodes:
        if only and node.key not in only and node.key.split("/")[-1] not in only:
            node.status = "not selected"
            continue
        t0 = time.perf_counter()
        if _reuse(plan, node, say):
            node.status = f"copied from {plan.settings.reuse}"
            continue
        action = _prepare_dir(node, say, plan.device)
        if action == "skip":
            node.status = "skipped (up to date)"
            say(f"{node.key}: up to date, skipped")
            continue
        ctx = StageContext(out_dir=node.out_dir, cache_dir=cache_dir, printer=say, device=plan.device,
                           inputs={name: used.out_dir for name, used in node.uses.items()})
        say(f"=== {node.key}")
        stage_module(node.kind).run(node.config, node.parent.out_dir if node.parent else None, ctx)
        node.seconds = time.perf_counter() - t0
        node.status = f"trained in {format_duration(node.seconds)}"
        write_json_atomic(node.out_dir / TIMING_FILE, {"seconds": node.seconds, "machine": plan.machine,
                                                       "device": plan.device})


def stage_timing(node: StageNode) -> dict[str, Any]:
    """What `TIMING_FILE` in the stage's directory records (the run that trained it: seconds, machine, device),
    or {}."""
    path = node.out_dir / TIMING_FILE
    try:
        return read_json_object(path) if path.exists() else {}
    except RunFileError:  # a damaged record of a time is no reason to stop a run
        return {}


def run_pipeline(scale: str, *, out_root: str | os.PathLike = "runs", overrides: list[str] = (),
                 only: set[str] | None = None, claims: bool = True, printer=None, device: str = "cpu") -> Plan:
    say = printer or default_printer()
    t0 = time.perf_counter()
    plan = build_plan(scale, out_root=out_root, overrides=list(overrides), device=device)
    with RunLock.acquire(plan.root, say):  # one writer per run directory (run_lock)
        run_stages(plan, only=only, printer=say)
        if claims:
            run_claims(plan, printer=say, only=set(plan.settings.claims) or None)
        total = time.perf_counter() - t0
        write_json_atomic(plan.root / "pipeline.json", {
            "scale": scale, "device": plan.device, "total_seconds": total, "machine": plan.machine,
            # seconds: this invocation's; trained: the run that trained the stage (a skipped or copied
            # stage keeps the time and machine of the run that made it).
            "stages": {n.key: {"status": n.status, "seconds": n.seconds, "trained": stage_timing(n)}
                       for n in plan.nodes},
        })
    say(f"pipeline {scale}: done in {format_duration(total)}")
    return plan
