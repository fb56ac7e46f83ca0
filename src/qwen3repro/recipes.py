"""Recipes and scales: where a stage's settings come from, and the stage graph.

A *recipe* (`recipes/<stage>.toml`) holds everything scale-free about one stage: what the Qwen3
report says about it (its place in the pipeline, its sequence-length policy, RoPE base, schedule
shape, length mix) and the settings of its mechanism. A *scale* (`tiny/<scale>.toml`, and `full/`
for the real models) sets the sizes: models, the base sequence length, token budgets, batch sizes,
LR. The resolved config of a stage is the recipe deep-merged with the scale's `[stages.<name>]`
table and then with command-line overrides (`key.sub=value`). Every level is checked strictly: a
key that the stage's config class does not know is an error naming it.

The stage graph is read from the recipes alone (`StageFacts`, the keys in `GRAPH_KEYS`): both the
tiny pipeline and the full-scale config generator walk it, so adding a stage is one recipe file
(plus, for a new kind of stage, one `run` function).

Files are TOML (readable, commented, no code execution). They are located relative to the
repository root (`QWEN3REPRO_ROOT`, else the directory above `src/`, else the working directory).
"""
from __future__ import annotations

import copy
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError
from .config_fields import show


def repo_root() -> Path:
    env = os.environ.get("QWEN3REPRO_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]  # src/qwen3repro/recipes.py -> repository root
    if (here / "recipes").is_dir():
        return here
    return Path.cwd()


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from e


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """`base` updated by `override`, recursively for tables. Overriding a table with a scalar (or the
    reverse) is an error: it is almost always a typo in a key path."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value, f"{where}{key}.")
        elif isinstance(out.get(key), Mapping) != isinstance(value, Mapping) and key in out:
            raise ConfigError(f"{where}{key}: cannot replace a table with a value (or a value with a table)")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as TOML (so 3e-4, true, "x", [1,2]).
    A key path with an empty part (`=3`, `a..b=1`, `a.=1`) is an error: it would set a table nobody reads."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    parts = [p.strip() for p in key.split(".")]
    if not key.strip():
        raise ConfigError(f"override {text!r}: the key is empty; expected key.path=value")
    if not all(parts):
        raise ConfigError(f"override {text!r}: the key path {key.strip()!r} has an empty part; "
                          "expected names joined by single dots")
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        parsed = {"v": raw}  # a bare word: treat as a string
    if set(parsed) != {"v"}:
        raise ConfigError(f"override {text!r}: the value must be one TOML value, got {raw!r}")
    node: dict[str, Any] = {}
    cur = node
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = parsed["v"]
    return node


def _load_named(folder: str, name: str, kind: str, root: Path | None) -> dict[str, Any]:
    """`<root>/<folder>/<name>.toml`; an unknown name lists the valid ones."""
    directory = (root or repo_root()) / folder
    path = directory / f"{name}.toml"
    if not path.exists():
        valid = sorted(p.stem for p in directory.glob("*.toml"))
        raise ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")
    return load_toml(path)


EXTENDS = "extends"


def _extends_chain(folder: str, name: str, kind: str, root: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(name, file contents) of `<folder>/<name>.toml` and every file it `extends`, base first."""
    chain = [(name, _load_named(folder, name, kind, root))]
    while EXTENDS in chain[-1][1]:
        base = chain[-1][1][EXTENDS]
        names = [n for n, _ in chain]
        if not isinstance(base, str):
            raise ConfigError(f"{folder}/{names[-1]}.toml: `{EXTENDS}` must be a {kind} name, got {base!r}")
        if base in names:
            raise ConfigError(f"{folder}: `{EXTENDS}` cycle {' -> '.join(names + [base])}")
        chain.append((base, _load_named(folder, base, kind, root)))
    return chain[::-1]


def _merge_chain(chain: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name, raw in chain:
        raw.pop(EXTENDS, None)
        merged = deep_merge(merged, raw, f"{name}.")
    return merged


def _recipe_chain(stage: str, root: Path | None) -> list[tuple[str, dict[str, Any]]]:
    return _extends_chain("recipes", stage, "recipe", root)


def recipe_lineage(stage: str, root: Path | None = None) -> list[str]:
    """The recipe names `stage` is built from, base first: a recipe with `extends = "other"` is
    `other` with its own keys merged on top (a control run that differs in one setting)."""
    return [name for name, _ in _recipe_chain(stage, root)]


def load_recipe(stage: str, root: Path | None = None) -> dict[str, Any]:
    """The recipe of `stage`, with any `extends` chain resolved (the key itself removed)."""
    return _merge_chain(_recipe_chain(stage, root))


def scale_lineage(scale: str, root: Path | None = None) -> list[str]:
    """The scale names `scale` is built from, base first (`extends = "tiny"` in `tiny/small.toml`)."""
    return [name for name, _ in _extends_chain("tiny", scale, "scale", root)]


def load_scale(scale: str, root: Path | None = None) -> dict[str, Any]:
    """The scale file `tiny/<scale>.toml`, with any `extends` chain resolved: a larger scale can be
    a smaller one with some sizes changed, and states only those."""
    return _merge_chain(_extends_chain("tiny", scale, "scale", root))


# ----------------------------------------------------------------------------- the stage graph
GRAPH_KEYS = ("kind", "parent", "roles", "seq_len_factor", "continues_parent_lr", "uses")


@dataclass(frozen=True)
class StageFacts:
    """What a recipe says about a stage's place in the pipeline; the same at every scale."""

    name: str
    kind: str
    """Which `run` function trains it (the tiny pipeline's `STAGE_KINDS`; the full scale maps kinds
    to what nanotron runs)."""
    parent: str | None
    """The stage whose output this one starts from; None for a root (the tokenizer)."""
    roles: tuple[str, ...]
    """The models the report trains through this stage: "flagship" (the largest dense and MoE models),
    "student" (the smaller ones, distilled from the flagships)."""
    seq_len_factor: int | None = None
    """Sequence length = this x the parent's (S3: 8x S1's, as 32,768 is 8x 4,096); None: a size the
    scale sets."""
    continues_parent_lr: bool = False
    """The stage continues its parent's peak LR and batch size (S2 decays from S1's stable LR)."""
    uses: tuple[str, ...] = ()
    """Other stages whose outputs this one reads besides its parent's; they run first and their lineage
    enters this stage's. A name is the same role's stage (general RL scores with the reward model's);
    "role/stage" is another role's (a student distilled from a flagship reads the flagship's model):
    `split_use`."""

    @property
    def is_root(self) -> bool:
        return self.parent is None


def split_use(use: str) -> tuple[str | None, str]:
    """A recipe's `uses` entry -> (role, stage): "reward-model" -> (None, "reward-model"), the same role's
    stage; "flagship/general-rl" -> ("flagship", "general-rl"), that role's."""
    role, sep, stage = use.partition("/")
    return (role, stage) if sep else (None, use)


def stage_facts(name: str, raw: Mapping[str, Any]) -> StageFacts:
    """The graph keys of one resolved recipe, checked; the error names the recipe and the key."""
    where = f"recipes/{name}.toml"
    kind, parent, roles = raw.get("kind"), raw.get("parent"), raw.get("roles")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{where}: `kind` (which run function trains the stage) is required")
    if parent is not None and not isinstance(parent, str):
        raise ConfigError(f"{where}: `parent` must be a stage name, got {parent!r}")
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise ConfigError(f"{where}: `roles` must be a non-empty list of role names, got {roles!r}")
    factor = raw.get("seq_len_factor")
    if factor is not None and (not isinstance(factor, int) or isinstance(factor, bool) or factor < 1):
        raise ConfigError(f"{where}: `seq_len_factor` must be an integer >= 1, got {factor!r}")
    continues = raw.get("continues_parent_lr", False)
    if not isinstance(continues, bool):
        raise ConfigError(f"{where}: `continues_parent_lr` must be true or false, got {continues!r}")
    if parent is None and (factor is not None or continues):
        raise ConfigError(f"{where}: a stage without a parent cannot take its length or LR from one")
    uses = raw.get("uses", [])
    if not isinstance(uses, list) or not all(isinstance(u, str) and u for u in uses):
        raise ConfigError(f"{where}: `uses` must be a list of stage names, got {uses!r}")
    for use in uses:
        role, stage = split_use(use)
        if not stage or role == "" or "/" in stage:
            raise ConfigError(f"{where}: `uses` entry {use!r} must be a stage name or role/stage")
    if name in uses or (parent is not None and parent in uses):
        raise ConfigError(f"{where}: `uses` names the stage itself or its parent")
    return StageFacts(name, kind, parent, tuple(roles), factor, continues, tuple(uses))


def split_recipe(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(graph keys, the stage's own settings) of a resolved recipe."""
    return ({k: v for k, v in raw.items() if k in GRAPH_KEYS}, {k: v for k, v in raw.items() if k not in GRAPH_KEYS})


class StageGraph:
    """Every recipe's `StageFacts`, with parents checked to exist and to form no cycle."""

    def __init__(self, facts: Mapping[str, StageFacts]) -> None:
        self.facts = dict(facts)
        for f in self.facts.values():
            if f.parent is not None and f.parent not in self.facts:
                raise ConfigError(f"recipes/{f.name}.toml: parent {f.parent!r} has no recipe; "
                                  f"stages: {', '.join(sorted(self.facts))}")
            for use in f.uses:
                role, used = split_use(use)
                if used not in self.facts:
                    raise ConfigError(f"recipes/{f.name}.toml: uses {use!r}, which has no recipe; "
                                      f"stages: {', '.join(sorted(self.facts))}")
                if role is None and f.name in self.ancestors(used):
                    raise ConfigError(f"recipes/{f.name}.toml: uses {use!r}, which descends from it")
                if role is not None and role not in self.facts[used].roles:
                    raise ConfigError(f"recipes/{f.name}.toml: uses {use!r}, but recipes/{used}.toml runs "
                                      f"{used} for {', '.join(self.facts[used].roles)}, not for {role}")
        for name in self.facts:
            self.ancestors(name)  # raises on a cycle

    def __getitem__(self, name: str) -> StageFacts:
        if name not in self.facts:
            raise ConfigError(f"unknown stage {name!r}; stages (recipes/): {', '.join(sorted(self.facts))}")
        return self.facts[name]

    def __contains__(self, name: str) -> bool:
        return name in self.facts

    def ancestors(self, name: str) -> list[str]:
        """`name`'s parent, grandparent, ... up to its root."""
        out, cur = [], self[name].parent
        while cur is not None:
            if cur in out or cur == name:
                raise ConfigError(f"recipes/: the parents form a cycle through {' -> '.join([name, *out, cur])}")
            out.append(cur)
            cur = self[cur].parent
        return out

    def depth(self, name: str) -> int:
        """How many stages must run before `name`: one more than the deepest of its parent and the stages it
        uses (0 for a root). Sorting by it puts every stage after its parent and the stages it uses."""
        facts = self[name]
        before = [facts.parent] if facts.parent is not None else []
        return 1 + max((self.depth(b) for b in before + [split_use(u)[1] for u in facts.uses]), default=-1)

    def nearest(self, name: str, candidates: set[str] | frozenset[str]) -> str | None:
        """The closest ancestor of `name` among `candidates` (a scale that skips a stage starts its
        child from the skipped stage's own parent)."""
        return next((a for a in self.ancestors(name) if a in candidates), None)

    def order(self, names: list[str] | tuple[str, ...]) -> list[str]:
        """`names` in their given order, checked: each stage's parent comes earlier (or is absent)."""
        seen: set[str] = set()
        for name in names:
            parent = self[name].parent
            if parent is not None and parent in names and parent not in seen:
                raise ConfigError(f"stage {name!r} is listed before its parent {parent!r}")
            for use in self[name].uses:
                if split_use(use)[1] not in seen:
                    raise ConfigError(f"stage {name!r} uses {use!r}, which must be listed before it")
            seen.add(name)
        return list(names)


def check_stage_tables(scale: Mapping[str, Any], graph: StageGraph) -> None:
    """Every `[stages.<name>]` and `[roles.<role>.stages.<name>]` table of a resolved scale (file and
    `--set` overrides) names a stage of `graph` that the role runs: a misspelt stage name would otherwise
    be a table that nothing reads. The error names the table's key path and lists the stages."""
    valid = ", ".join(sorted(graph.facts))
    _expect_table("stages", scale.get("stages", {}))
    for name, table in scale.get("stages", {}).items():
        if name not in graph:
            raise ConfigError(f"stages.{name}: no stage {name!r}; stages (recipes/): {valid}")
        _expect_table(f"stages.{name}", table)
    _expect_table("roles", scale.get("roles", {}))
    for role, role_table in scale.get("roles", {}).items():
        _expect_table(f"roles.{role}", role_table)
        _expect_table(f"roles.{role}.stages", role_table.get("stages", {}))
        for name, table in role_table.get("stages", {}).items():
            where = f"roles.{role}.stages.{name}"
            if name not in graph:
                raise ConfigError(f"{where}: no stage {name!r}; stages (recipes/): {valid}")
            if graph[name].is_root:
                raise ConfigError(f"{where}: every role shares the {name} stage; set it in [stages.{name}]")
            if role not in graph[name].roles:
                raise ConfigError(f"{where}: recipes/{name}.toml runs {name} for {', '.join(graph[name].roles)}, "
                                  f"not for {role}")
            _expect_table(where, table)


def _expect_table(where: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table, got {show(value)}")


def rope_base(stage: str, graph: StageGraph | None = None, root: Path | None = None) -> float:
    """The RoPE base `stage` trains with: `rope_theta` of the nearest recipe on its path from the root that
    states one (S1 states the pretraining base, S3 raises it: ABF, report §3.2)."""
    graph = graph or load_stage_graph(root)
    for name in (stage, *graph.ancestors(stage)):
        recipe = load_recipe(name, root)
        if "rope_theta" in recipe:
            return float(recipe["rope_theta"])
    raise ConfigError(f"{stage}: no recipe on its path from the root states rope_theta")


def load_stage_graph(root: Path | None = None) -> StageGraph:
    """The graph of every recipe under `<root>/recipes/`."""
    directory = (root or repo_root()) / "recipes"
    return StageGraph({p.stem: stage_facts(p.stem, load_recipe(p.stem, root)) for p in sorted(directory.glob("*.toml"))})
