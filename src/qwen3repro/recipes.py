"""Recipes and scales: where a stage's settings come from.

A *recipe* (`recipes/<stage>.toml`) holds the scale-free settings of one stage: which corpus, the
LR schedule's shape, RoPE base changes, length ratios. A *scale* (`tiny/<scale>.toml`, and
`full/` for the real models) sets the sizes: models, lengths, token budgets, batch sizes, LR. The
resolved config of a stage is the recipe deep-merged with the scale's `[stages.<name>]` table and
then with command-line overrides (`key.sub=value`). Every level is checked strictly: a key that the
stage's config class does not know is an error naming it.

Files are TOML (readable, commented, no code execution). They are located relative to the
repository root (`QWEN3REPRO_ROOT`, else the directory above `src/`, else the working directory).
"""
from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from .config import ConfigError


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
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as TOML (so 3e-4, true, "x", [1,2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: treat as a string
    node: dict[str, Any] = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
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
