"""Settings tables checked against a config dataclass, from the annotations of its fields.

A stage's settings come from TOML (its recipe, the scale, `--set` on the command line), where a wrong
value is as easy to write as a wrong key: `batch_size = true`, `tokens = -5`, `seq_len = "long"`,
`tokens = 1e999`. Python would take the first as 1 (a bool is an int) and the second as one training
step; the others fail deep inside a stage. `checked_fields` refuses each before the dataclass sees it,
with one line naming the key path, the value and what the field expects. The rules follow the
annotation:

* `int` refuses bools and fractional or non-finite numbers; a whole float (`2e6`, how TOML spells a
  large count) is taken as that integer;
* `float` takes any finite number; `str` and `bool` take only their own type;
* `tuple[...]` and `list[...]` take a TOML list, `Mapping[str, V]` a TOML table;
* `X | None`: None is a default only (TOML has no null), a value must be an `X`;
* `Annotated[..., AtLeast(n)]`: a lower bound (`Positive` for counts, sizes and lengths, `NonNegative`
  where 0 means "none" or "off");
* `Annotated[Mapping[str, Any], TableOf(Config)]`: a nested table (a stage's `train` table) checked
  against the fields of `Config`, except those the enclosing config fills in itself.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Mapping, Union

from .config import ConfigError


class SettingError(ConfigError):
    """One setting is wrong. `where` names the checked table (a dotted key path such as `stages.s1`, or
    the config class), `path` the setting's keys inside it and `problem` what is wrong, so that a caller
    who knows where the table's values came from can name that place instead."""

    def __init__(self, where: str, path: tuple[str, ...], problem: str) -> None:
        self.where, self.path, self.problem = where, tuple(path), problem
        super().__init__(f"{dotted(where, *self.path)}: {problem}")


def dotted(*parts: str) -> str:
    """`a.b.c` from its non-empty parts."""
    return ".".join(p for p in parts if p)


@dataclass(frozen=True)
class AtLeast:
    """The smallest value a number field takes."""

    bound: int | float


@dataclass(frozen=True)
class TableOf:
    """A nested table of `config`'s fields. `supplied`: required fields of `config` that the enclosing
    config fills in (a stage's `train` table has no `steps`: the stage derives them)."""

    config: type
    supplied: tuple[str, ...] = ()


Positive = Annotated[int, AtLeast(1)]
NonNegative = Annotated[int, AtLeast(0)]


class _Mismatch(Exception):
    """A value does not fit its annotation; `_check_value` turns it into a SettingError for the whole field."""


def checked_fields(cls: type, table: Mapping[str, Any], where: str, *, complete: bool = True) -> dict[str, Any]:
    """`table` as keyword arguments of the dataclass `cls`, every value checked against its field's
    annotation (whole floats of integer fields become integers). An unknown key, a missing required
    field (with `complete`) or a wrong value is a `SettingError` naming its key path under `where`.
    `complete=False` checks only what is present: a table that other tables complete later."""
    return _check_table(cls, table, where, (), required=_required(cls) if complete else ())


def _check_table(cls: type, table: Mapping[str, Any], where: str, path: tuple[str, ...],
                 required: tuple[str, ...]) -> dict[str, Any]:
    hints = _field_hints(cls)
    unknown = sorted(set(table) - set(hints))
    if unknown:
        also = f" (and {unknown[1:]})" if len(unknown) > 1 else ""
        raise SettingError(where, (*path, str(unknown[0])),
                           f"unknown key{also}; valid keys: {sorted(hints)}")
    checked = {key: _check_value(value, hints[key], where, (*path, key)) for key, value in table.items()}
    for name in required:  # after the values: a wrong value is the likelier slip than a missing one
        if name not in table:
            raise SettingError(where, (*path, name), f"required ({describe(hints[name])}), not set")
    return checked


def _check_value(value: Any, hint: Any, where: str, path: tuple[str, ...]) -> Any:
    try:
        return _convert(value, hint, where, path)
    except _Mismatch:
        raise SettingError(where, path, f"expected {describe(hint)}, got {show(value)}") from None


def _convert(value: Any, hint: Any, where: str, path: tuple[str, ...]) -> Any:
    """`value` if it fits `hint` (whole floats of `int` as ints), else `_Mismatch`; a nested table's
    wrong setting raises its own SettingError."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, *marks = args
        table = next((m for m in marks if isinstance(m, TableOf)), None)
        if table is not None:
            if not isinstance(value, Mapping):
                raise _Mismatch
            required = tuple(n for n in _required(table.config) if n not in table.supplied)
            return _check_table(table.config, value, where, path, required)
        value = _convert(value, base, where, path)
        if any(isinstance(m, AtLeast) and value < m.bound for m in marks):
            raise _Mismatch
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(value, arm, where, path)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [_convert(v, args[0], where, path) for v in value]
        elif len(value) != len(args):
            raise _Mismatch
        else:
            items = [_convert(v, a, where, path) for v, a in zip(value, args)]
        return type(value)(items)
    if origin in (collections.abc.Mapping, dict):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        item = args[1] if args else Any
        return {k: _convert(v, item, where, path) for k, v in value.items()}
    raise TypeError(f"checked_fields: no rule for the annotation {hint!r}")


def describe(hint: Any) -> str:
    """What a value of `hint` is, in words ("an integer >= 1", "a list of 2 values, each a finite number")."""
    if hint is Any:
        return "any value"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, *marks = args
        table = next((m for m in marks if isinstance(m, TableOf)), None)
        if table is not None:
            return f"a table of {table.config.__name__} settings"
        bounds = [f" >= {m.bound}" for m in marks if isinstance(m, AtLeast)]
        return describe(base) + "".join(bounds)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    words = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if hint in words:
        return words[hint]
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"a list, each {describe(args[0])}"
    if origin is tuple:
        kinds = {describe(a) for a in args}
        each = f"each {kinds.pop()}" if len(kinds) == 1 else "[" + ", ".join(describe(a) for a in args) + "]"
        return f"a list of {len(args)} values, {each}"
    if origin in (collections.abc.Mapping, dict):
        return "a table" + ("" if not args or args[1] is Any else f" of {describe(args[1])}")
    return getattr(hint, "__name__", str(hint))


def show(value: Any, limit: int = 60) -> str:
    """A value as TOML would spell it, on one line and at most about `limit` characters."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (with `Annotated` marks) of the dataclass `cls`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _required(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


__all__ = ["AtLeast", "NonNegative", "Positive", "SettingError", "TableOf", "checked_fields", "describe", "dotted",
           "show"]
