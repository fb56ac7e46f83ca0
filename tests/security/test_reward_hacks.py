"""Solutions that try to pass their tests without solving the task: each script in `hacks/` is one.

Every hack defines `add` wrongly (or not at all) and cheats; the tests below would pass only for a real
`add`. Each must score 0 — and never None, which would withhold the reward instead of penalising.
"""
from __future__ import annotations

import pytest

from qwen3repro.rewards.code import code_reward, run_tests

from .conftest import HACKS

ADD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(10, -4) == 6\nassert add((1,), (2,)) == (1, 2)\n"


@pytest.mark.parametrize("hack", sorted(p.name for p in HACKS.glob("*.py")))
def test_hack_scores_zero(hack, as_identity, limits):
    result = as_identity(run_tests, (HACKS / hack).read_text(), TESTS, limits)
    assert result.score == 0.0, result.reason


def test_the_same_tests_pass_a_real_solution(as_identity, limits):
    """The control: the tests the hacks fail are passable."""
    assert as_identity(run_tests, ADD, TESTS, limits).score == 1.0
    wrapped = "<think>\nadd them\n</think>\n\n```python\n" + ADD + "```<|im_end|>"
    assert as_identity(code_reward, wrapped, TESTS, limits).score == 1.0


def test_a_faked_infrastructure_failure_is_a_zero_not_no_reward(as_identity, limits):
    result = as_identity(run_tests, (HACKS / "fake_infra_failure.py").read_text(), TESTS, limits)
    assert result.score == 0.0 and "sandbox failure" not in result.reason


def test_tests_see_plain_values_only(as_identity, limits):
    """A solution's exception reaches the tests as the built-in type; its objects never do."""
    solution = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return {'k': [x, (x,)], 's': {x}}\n"
    tests = ("try:\n    f(-1)\n    raise AssertionError('no error')\nexcept ValueError as e:\n    assert 'negative' in str(e)\n"
             "r = f(2)\nassert type(r) is dict and r == {'k': [2, (2,)], 's': {2}}\n")
    assert as_identity(run_tests, solution, tests, limits).score == 1.0
