"""Careless settings are refused before anything runs, in one line that names the key.

A stage's settings are its recipe, the scale's tables and `--set key.path=value` overrides. Unchecked,
Python takes many wrong values below without complaint (a negative or infinite token budget gives one
training step, `true` a batch of 1, a table for a stage that does not exist is never read) and the
others fail deep inside a stage with a bare TypeError or ZeroDivisionError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Mapping

import pytest
from click.testing import CliRunner

from qwen3repro.cli import main
from qwen3repro.config import ConfigError
from qwen3repro.config_fields import AtLeast, NonNegative, Positive, TableOf, checked_fields
from qwen3repro.pipeline import build_plan
from qwen3repro.recipes import parse_override

# (override, the key the error must name, the value it must show)
BAD_SETTINGS = [
    ("stages.s1.tokens=-5", "stages.s1.tokens", "-5"),
    ("stages.s1.tokens=1e999", "stages.s1.tokens", "inf"),
    ("stages.s1.tokens=1.5", "stages.s1.tokens", "1.5"),
    ('stages.s1.tokens="many"', "stages.s1.tokens", '"many"'),
    ("stages.s1.batch_size=true", "stages.s1.batch_size", "true"),
    ("stages.s1.batch_size=0", "stages.s1.batch_size", "0"),
    ('stages.s1.seq_len="long"', "stages.s1.seq_len", '"long"'),
    ("stages.s1.seq_len=0", "stages.s1.seq_len", "0"),
    ("stages.s1.n_docs=0", "stages.s1.n_docs", "0"),
    ("stages.tokenizer.seq_len=0", "stages.tokenizer.seq_len", "0"),
    ("stages.s1.train.lr=nan", "stages.s1.train.lr", "nan"),
    ("stages.s1.train.warmup_steps=-1", "stages.s1.train.warmup_steps", "-1"),
    ("stages.s1.copy_warmup_span=[0, 4]", "stages.s1.copy_warmup_span", "[0, 4]"),
    ("stages.reasoning-rl.temperature=inf", "stages.reasoning-rl.temperature", "inf"),
    ("stages.reasoning-rl.families=\"add\"", "stages.reasoning-rl.families", '"add"'),
    ("stages.cold-start.sft.batch_size=false", "stages.cold-start.sft.batch_size", "false"),
    ("stages.cold-start.coldstart.thresholds.repetition_ngram=0",
     "stages.cold-start.coldstart.thresholds.repetition_ngram", "0"),
    ("stages.fusion.sft.train.log_every=2.5", "stages.fusion.sft.train.log_every", "2.5"),
    # A role's own table is named as such, not as the shared table it overrides.
    ("roles.student.stages.s1.tokens=-5", "roles.student.stages.s1.tokens", "-5"),
    ("roles.flagship.model=3", "roles.flagship.model", "3"),
    ("pipeline.threads=0", "pipeline.threads", "0"),
    ('pipeline.stages="s1"', "pipeline.stages", '"s1"'),
]

# (override, what the error must name)
BAD_KEYS = [
    ("=3", "'=3'"),
    (" =3", "' =3'"),
    ("a..b=1", "a..b"),
    ("stages.s1.=1", "stages.s1."),
    (".stages.s1.tokens=1", ".stages.s1.tokens"),
    ("stages.s9.seq_len=64", "stages.s9"),
    ("stages.s9=3", "stages.s9"),
    ("roles.student.stages.s9.tokens=1", "roles.student.stages.s9"),
    ("stages.s1.bogus=1", "stages.s1.bogus"),
    ("stages.s1.train.lrr=1", "stages.s1.train.lrr"),
    ("stages.cold-start.sft.train.bogus=1", "stages.cold-start.sft.train.bogus"),
    # A role's table for a stage the role never runs, or for the shared tokenizer, is read by nothing.
    ("roles.student.stages.cold-start.sft.steps=1", "roles.student.stages.cold-start"),
    ("roles.flagship.stages.tokenizer.n_docs=10", "roles.flagship.stages.tokenizer"),
    ("bogus.x=1", "bogus"),
    ("stages.s1.tokens=5\nx=3", "stages.s1.tokens"),
]


def _error(scale: str, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        build_plan(scale, overrides=overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("override, key, shown", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_a_wrong_value_is_an_error_naming_its_key_and_value(override, key, shown):
    message = _error("tiny", [override])
    assert message.startswith(f"{key}: expected "), message
    assert f"got {shown}" in message, message


@pytest.mark.parametrize("override, named", BAD_KEYS, ids=[repr(c[0]) for c in BAD_KEYS])
def test_a_wrong_key_path_is_an_error_naming_it(override, named):
    assert named in _error("tiny", [override])


def test_an_unknown_stage_lists_the_stages():
    message = _error("tiny", ["stages.s9.seq_len=64"])
    assert "s1" in message and "reasoning-rl" in message and "tokenizer" in message


def test_an_unknown_key_lists_the_valid_keys():
    message = _error("micro", ["stages.s1.bogus=1"])
    assert "valid keys" in message and "'tokens'" in message and "'seq_len'" in message


@pytest.mark.parametrize("overrides, key", [
    # Stages outside [pipeline] stages: resolved as the pipeline would run them (S3 from S2 from S1).
    (['pipeline.stages=["tokenizer", "s1"]', "stages.s3.tokens=-5"], "stages.s3.tokens"),
    (['pipeline.stages=["tokenizer", "s1"]', "stages.fusion.sft.seq_len=0"], "stages.fusion.sft.seq_len"),
    (['pipeline.stages=["tokenizer", "s1"]', "stages.s2.seq_len=128"], "stages.s2.seq_len"),
    # A stage no scale runs, with no table of its own in the scale file.
    (["stages.distill.seq_len=-1"], "stages.distill.seq_len"),
    # A role outside [pipeline] roles.
    (['pipeline.roles=["flagship"]', "roles.student.stages.s1.batch_size=true"], "roles.student.stages.s1.batch_size"),
])
def test_tables_of_stages_and_roles_that_do_not_run_are_checked_too(overrides, key):
    assert _error("micro", overrides).startswith(key)


def test_a_role_outside_the_run_is_checked_in_a_scale_that_inherits_it():
    """tiny/small.toml runs the flagship only; the student's tables it inherits from tiny are still read."""
    assert _error("small", ["roles.student.stages.s2.tokens=0"]).startswith("roles.student.stages.s2.tokens")


@pytest.mark.parametrize("override", ["stages.s1.tokens=-5", "=3", "stages.s9.seq_len=64", "stages.s1.seq_len=0"])
def test_dry_run_shows_the_same_one_line_error(override):
    expected = _error("micro", [override])
    result = CliRunner().invoke(main, ["pipeline", "micro", "--dry-run", "--set", override])
    assert result.exit_code == 2
    assert result.output == f"error: {expected}\n"


def test_a_whole_float_is_an_integer():
    """TOML spells large counts as floats (2e6): an integer field takes them as the integer."""
    node = build_plan("micro", overrides=["stages.s1.tokens=4e4"]).node("flagship/s1")
    assert node.config.tokens == 40_000 and type(node.config.tokens) is int


@pytest.mark.parametrize("scale", ["micro", "tiny", "small"])
def test_every_scale_resolves(scale):
    assert build_plan(scale).nodes


def test_parse_override_paths():
    assert parse_override("stages.s1.tokens=2e6") == {"stages": {"s1": {"tokens": 2e6}}}
    assert parse_override(" stages . s1.seq_len = 64") == {"stages": {"s1": {"seq_len": 64}}}
    assert parse_override("pipeline.reuse=tiny") == {"pipeline": {"reuse": "tiny"}}  # a bare word is a string


# ----------------------------------------------------------------------------- the rules, on their own
@dataclass(frozen=True)
class _Inner:
    steps: Positive
    rate: float = 0.5


@dataclass(frozen=True)
class _Outer:
    count: Positive
    name: str = "x"
    flag: bool = False
    offset: NonNegative = 0
    turns: Annotated[int, AtLeast(2)] = 2
    limit: Positive | None = None
    pair: tuple[float, float] = (0.1, 0.9)
    names: tuple[str, ...] = ()
    weights: Mapping[str, float] = field(default_factory=dict)
    inner: Annotated[Mapping[str, Any], TableOf(_Inner, supplied=("steps",))] = field(default_factory=dict)


@pytest.mark.parametrize("table, key", [
    ({"count": True}, "count"),
    ({"count": 1.5}, "count"),
    ({"count": math.inf}, "count"),
    ({"count": math.nan}, "count"),
    ({"count": 0}, "count"),
    ({"count": "3"}, "count"),
    ({"count": 1, "name": 3}, "name"),
    ({"count": 1, "flag": 1}, "flag"),
    ({"count": 1, "offset": -1}, "offset"),
    ({"count": 1, "turns": 1}, "turns"),
    ({"count": 1, "limit": 0}, "limit"),
    ({"count": 1, "pair": [0.1]}, "pair"),
    ({"count": 1, "pair": [0.1, "x"]}, "pair"),
    ({"count": 1, "names": "abc"}, "names"),
    ({"count": 1, "weights": {"a": math.inf}}, "weights"),
    ({"count": 1, "inner": {"rate": math.nan}}, "inner.rate"),
    ({"count": 1, "inner": {"steps": 0}}, "inner.steps"),
    ({"count": 1, "inner": {"bogus": 1}}, "inner.bogus"),
    ({"count": 1, "inner": 3}, "inner"),
    ({}, "count"),
])
def test_checked_fields_refuses(table, key):
    with pytest.raises(ConfigError, match=rf"^where\.{key}: "):
        checked_fields(_Outer, table, "where")


def test_checked_fields_accepts_and_normalises():
    got = checked_fields(_Outer, {"count": 3.0, "limit": 2, "pair": [0, 1], "names": ["a"], "inner": {"rate": 1}},
                         "where")
    assert got == {"count": 3, "limit": 2, "pair": [0, 1], "names": ["a"], "inner": {"rate": 1}}
    assert type(got["count"]) is int
    assert checked_fields(_Outer, {"offset": 4}, "where", complete=False) == {"offset": 4}  # count may come later
