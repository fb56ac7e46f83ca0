"""General RL's task mixture (Qwen3 report §4.4: over 20 tasks, each with its own scoring) and its rule
rewards: the table covers every reward kind and tool use; sampling is deterministic, weighted and
keeps the held-out partition apart; every rule task's demonstration scores 1.0 with the task's own
reward; references survive JSON; the "format" and "answer_match" rewards; Query's tools field."""
from __future__ import annotations

import ast
import json
import operator
import random
import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen3repro.chat import EMPTY_THINK, parse, render, wants_thinking
from qwen3repro.data import tasks
from qwen3repro.data import general_tasks as gt
from qwen3repro.data.code_specs import CODE_SPECS, draw_spec, solve
from qwen3repro.data.english import talk_about
from qwen3repro.data.instruction_tasks import INSTRUCTION_IDS, describe
from qwen3repro.data.queries import Query
from qwen3repro.data.world import build_world
from qwen3repro.rewards import REWARDS, RewardResult, get_reward
from qwen3repro.rewards.answer_match import answer_match_reward
from qwen3repro.rewards.format import format_reward

WORLD = build_world()
RULE_TASKS = sorted(name for name, task in gt.GENERAL_TASKS.items() if task.kind == "rule")
# Tasks whose rewards are registered in this package (the reward model's is registered by its stage).
REGISTERED = {name: 1.0 for name, task in gt.GENERAL_TASKS.items() if task.reward in REWARDS}


_ASKED = re.compile(r"the (home city|job|pet|favourite color|age) of (\w+)")


def _asked(question: str) -> tuple[str, str]:
    """(attribute, person) a question asks about."""
    words, person = _ASKED.search(question).groups()
    return {"home city": "home", "favourite color": "color"}.get(words, words), person


def _draw(name: str, n: int, seed: int = 0) -> list[Query]:
    rng = random.Random(f"test|{name}|{seed}")
    return [gt.GENERAL_TASKS[name].generate(rng, WORLD) for _ in range(n)]


# ----------------------------------------------------------------------------- the table
def test_the_mixture_has_over_twenty_tasks_of_every_kind():
    table = gt.GENERAL_TASKS
    assert len(table) >= 20
    assert {task.kind for task in table.values()} == set(gt.REWARD_KINDS)
    assert {tool for task in table.values() for tool in task.tools} == set(gt.TOOL_NAMES)
    for name, task in table.items():
        assert task.name == name and task.domain and task.weight > 0
        assert task.reward in REWARDS or task.reward == "reward_model", name
        if task.kind != "rule":
            assert task.reward == task.kind
    # Every IFEval instruction the instruction tasks draw has a task of its own.
    singles = [name for name in table if name.startswith("if_") and name != "if_combined"]
    single = {q.reference["instruction_id_list"][0] for name in singles for q in _draw(name, 1)}
    assert single == set(INSTRUCTION_IDS)


@pytest.mark.parametrize("change, message", [
    ({"kind": "human"}, "kind 'human'"),
    ({"kind": "judge"}, "scored by the reward 'judge'"),
    ({"reward": "judge"}, "model-based reward 'judge'"),
    ({"weight": -1.0}, "weight must be"),
    ({"weight": float("nan")}, "weight must be"),
    ({"tools": ("browser",)}, "unknown tools ['browser']"),
])
def test_a_malformed_task_is_refused(change, message):
    fields = dict(name="t", domain="math", kind="rule", reward="task", weight=1.0, tools=(),
                  generate=gt.GENERAL_TASKS["add"].generate, demonstrate=None)
    with pytest.raises(ValueError, match=re.escape(message)):
        gt.GeneralTask(**{**fields, **change})


# ----------------------------------------------------------------------------- sampling
def test_queries_carry_the_task_domain_reward_and_tools():
    pairs = gt.sample_task_queries(REGISTERED, 300, seed=3, heldout=False)
    assert {name for name, _ in pairs} == set(REGISTERED)  # 300 draws reach every task
    for name, query in pairs:
        task = gt.GENERAL_TASKS[name]
        assert (query.domain, query.verifier, query.tools) == (task.domain, task.reward, task.tools)
        if task.kind == "judge":
            assert set(query.reference) == {"question", "reference"} and query.reference["question"] == query.question


def test_training_and_heldout_partitions_are_disjoint():
    train = gt.sample_queries(REGISTERED, 400, seed=0, heldout=False)
    held = gt.sample_queries(REGISTERED, 150, seed=0, heldout=True)
    assert not any(tasks.is_heldout(q.uid) for q in train)
    assert all(tasks.is_heldout(q.uid) for q in held)
    assert not {q.question for q in train} & {q.question for q in held}


def test_a_query_keeps_the_partition_of_what_it_is_about():
    for query in _draw("add", 20):
        assert query.uid == tasks.TaskItem.from_dict(query.reference["item"]).uid
    for name in ("knowledge_recall", "tool_lookup", "rag_passages", "format_think"):
        for query in _draw(name, 20):
            attribute, person = _asked(query.question)
            assert query.uid[:8] == gt.fact_uid(person, attribute)[:8]
            assert query.uid != gt.fact_uid(person, attribute)  # uids stay distinct across tasks


def test_sampling_is_deterministic_in_its_seed():
    def dump(seed):
        return [q.to_dict() for q in gt.sample_queries(REGISTERED, 60, seed=seed, heldout=False)]

    assert dump(7) == dump(7)
    assert dump(7) != dump(8)


def test_tasks_are_drawn_by_weight():
    names = Counter(name for name, _ in gt.sample_task_queries({"add": 3.0, "translation": 1.0, "mul": 0.0}, 400,
                                                              seed=0, heldout=False))
    assert set(names) == {"add", "translation"}
    assert 0.65 < names["add"] / 400 < 0.85


@pytest.mark.parametrize("weights, error, message", [
    ({"no_such_task": 1.0}, KeyError, "no_such_task"),
    ({"add": -1.0}, ValueError, "weight of general task 'add'"),
    ({"add": 0.0}, ValueError, "no task a positive share"),
])
def test_bad_weights_are_refused(weights, error, message):
    with pytest.raises(error, match=message):
        gt.sample_queries(weights, 1, seed=0, heldout=False)


def test_a_task_whose_reward_is_not_registered_fails_at_sampling(monkeypatch):
    monkeypatch.delitem(REWARDS, "reward_model", raising=False)
    with pytest.raises(ValueError, match=r"^task write_person: no reward 'reward_model' registered$"):
        gt.sample_queries({"add": 1.0, "write_person": 1.0}, 1, seed=0, heldout=False)
    monkeypatch.setitem(REWARDS, "reward_model", lambda completion, question: RewardResult(0.5))
    (query,) = gt.sample_queries({"write_person": 1.0}, 1, seed=0, heldout=False)
    assert query.verifier == "reward_model" and query.reference == {"question": query.question}


# ----------------------------------------------------------------------------- demonstrations
def _final_turn(conversation: list[dict]) -> str:
    assert conversation[-1]["role"] == "assistant"
    return conversation[-1]["content"]


@pytest.mark.parametrize("name", [n for n in RULE_TASKS if n != "code_write"])
def test_every_rule_demonstration_scores_full_marks_with_its_own_reward(name):
    task = gt.GENERAL_TASKS[name]
    reward = get_reward(task.reward)
    for query in _draw(name, 80):
        stored = Query.from_dict(json.loads(json.dumps(query.to_dict())))  # the reference survives JSON
        conversation = task.demonstrate(stored, WORLD)
        assert conversation == task.demonstrate(query, WORLD)
        render(conversation)  # a well-formed chat
        result = reward(_final_turn(conversation), **stored.reference)
        assert result.score == 1.0, (query.question, _final_turn(conversation), result)
        asked_thinking = wants_thinking(conversation[:1])
        if task.domain == "format":
            assert asked_thinking == query.reference["thinking"]  # the flags ask for what the reward checks
        else:
            assert not asked_thinking and _final_turn(conversation).startswith(EMPTY_THINK)
        called = [call["name"] for turn in conversation for call in turn.get("tool_calls", [])]
        assert called == list(task.tools)


@pytest.mark.parametrize("name", [n for n in RULE_TASKS if n != "code_write" and gt.GENERAL_TASKS[n].domain != "format"])
def test_thinking_demonstrations_reason_then_answer_as_the_plain_ones(name):
    """The thinking form of a demonstration asks for thinking once flagged (or unflagged), has a non-empty
    think block in every assistant turn, ends in the same answer and tool calls, and scores 1.0."""
    task = gt.GENERAL_TASKS[name]
    reward = get_reward(task.reward)
    for query in _draw(name, 30):
        plain = task.demonstrate(query, WORLD)
        thinking = gt.thinking_demonstration(query, plain)
        render(thinking)
        assert thinking[0]["content"] == query.question and wants_thinking(thinking[:1])
        assert [m["role"] for m in thinking] == [m["role"] for m in plain]
        for before, after in zip(plain, thinking):
            if after["role"] == "user":
                assert before["content"] == after["content"] + " /no_think"
            if after["role"] != "assistant":
                assert after["role"] == "user" or after == before
                continue
            parsed, parsed_plain = parse(after["content"]), parse(before["content"])
            assert parsed["reasoning_content"].strip() and not parsed_plain["reasoning_content"].strip()
            assert parsed["content"] == parsed_plain["content"]
            assert after.get("tool_calls") == before.get("tool_calls")
        result = reward(_final_turn(thinking), **query.reference)
        assert result.score == 1.0, (query.question, _final_turn(thinking), result)
        if "item" in query.reference:  # a task item reasons with its reference trace
            assert tasks.render_trace(tasks.TaskItem.from_dict(query.reference["item"])) in _final_turn(thinking)


def test_a_task_whose_mode_is_the_task_has_no_thinking_form():
    query = _draw("format_no_think", 1)[0]
    with pytest.raises(ValueError, match="mode is part of the task"):
        gt.thinking_demonstration(query, gt.GENERAL_TASKS["format_no_think"].demonstrate(query, WORLD))


def test_demonstrations_need_no_reward_and_come_from_training_queries(monkeypatch):
    monkeypatch.delitem(REWARDS, "reward_model", raising=False)
    shown = gt.demonstrations(gt.default_weights(), 60, seed=0)
    assert len(shown) == 60 and {"write_person", "write_city"} & {name for name, _, _ in shown}
    for name, query, conversation in shown:
        assert not tasks.is_heldout(query.uid)
        assert conversation[0]["role"] == "user" and conversation[0]["content"].startswith(query.question)
        assert conversation == gt.GENERAL_TASKS[name].demonstrate(query, WORLD)


def test_code_writing_demonstrations_pass_their_tests_in_the_sandbox():
    task = gt.GENERAL_TASKS["code_write"]
    for query in _draw("code_write", 3):
        result = get_reward("code")(_final_turn(task.demonstrate(query, WORLD)), **query.reference)
        if result.score is None:
            pytest.skip(f"sandbox unavailable: {result.reason}")
        assert result.score == 1.0, result


def test_code_specs_solutions_pass_and_a_wrong_one_fails():
    rng = random.Random(0)
    kinds = set()
    for _ in range(200):
        request, tests_source = draw_spec(rng)
        kinds.add(request.split("`")[1].split("(")[0])
        exec(solve(request) + tests_source, {})  # the asserts hold for the reference solution
        wrong = solve(request).replace("return ", "return 1 + ", 1)
        with pytest.raises(AssertionError):
            exec(wrong + tests_source, {})
    assert kinds == {spec.name for spec in CODE_SPECS}
    with pytest.raises(ValueError, match="not a code request"):
        solve("Write a poem.")


def test_judged_and_preferred_tasks_demonstrate_true_answers():
    for query in _draw("judge_compare_ages", 20):
        a, b = re.search(r"Who is older, (\w+) or (\w+),", query.question).groups()
        ages = {n: int(WORLD.entity(n).attr("age")) for n in (a, b)}
        old = max(ages, key=ages.get)
        assert query.reference["reference"].startswith(f"{old} is older")
        assert f"{abs(ages[a] - ages[b])} years older" in query.reference["reference"]
    for name in ("judge_profile", "write_person", "write_city"):
        for query in _draw(name, 5):
            answer = parse(_final_turn(gt.GENERAL_TASKS[name].demonstrate(query, WORLD)))["content"]
            assert answer and answer.endswith(".")


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _arithmetic(node: ast.AST) -> int:
    if isinstance(node, ast.Expression):
        return _arithmetic(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_arithmetic(node.left), _arithmetic(node.right))
    raise ValueError(ast.dump(node))


def test_reference_answers_are_right():
    for query in _draw("tool_calculator", 30):
        expression = re.search(r"compute (.+)\. Answer", query.question).group(1)
        assert query.reference["answer"] == str(_arithmetic(ast.parse(expression, mode="eval")))
    for query in _draw("word_problem", 60):
        n = [int(x) for x in re.findall(r"\d+", query.question)]
        q = query.question
        expected = (n[0] + n[1] if "buys" in q and "gives" not in q else n[0] + n[1] - n[2] if "buys" in q
                    else n[0] - n[1] if "gives" in q else n[0] * n[1] if "in each box" in q else n[0] // n[1])
        assert query.reference["answer"] == str(expected), q
    for query in _draw("tool_search", 20):
        home, job, pet = re.search(r"lives in (\w+), works as a (\w+) and has a (\w+)\?", query.question).groups()
        matches = [p.name for p in WORLD.people if (p.attr("home"), p.attr("job"), p.attr("pet")) == (home, job, pet)]
        assert matches == [query.reference["answer"]]
    for query in _draw("rag_passages", 20):
        attribute, person = _asked(query.question.split("Using the passages")[1])
        assert query.reference["answer"] == WORLD.entity(person).attr(attribute)
        assert query.question.count("\n[") == 3 and f"] {person} lives in" in query.question
    for query in _draw("fact_in_language", 20):
        lang, attribute, person = re.match(r"In (\w+), state the (\w+) of (\w+)\.", query.question).groups()
        assert query.reference["answer"] == WORLD.render_fact(lang, WORLD.entity(person), attribute)


def test_instruction_questions_state_each_instruction_and_the_plain_answer_breaks_it():
    text_changing = {"change_case:english_lowercase", "change_case:english_capital", "punctuation:no_comma",
                     "startend:end_checker", "startend:quotation", "keywords:existence", "detectable_format:title"}
    reward = get_reward("ifeval")
    for name in [n for n in gt.GENERAL_TASKS if n.startswith("if_")]:
        for query in _draw(name, 10):
            ids, kwargs = query.reference["instruction_id_list"], query.reference["kwargs"]
            for iid, k in zip(ids, kwargs):
                assert describe(iid, k) in query.question
            attribute, person = _asked(query.question)
            plain = EMPTY_THINK + talk_about(WORLD.entity(person), attribute)
            if text_changing & set(ids):
                assert reward(plain, **query.reference).score < 1.0


# ----------------------------------------------------------------------------- the "format" reward
THOUGHT = "<think>\nLet me see. 2 and 2 make 4.\n</think>\n\n"


@pytest.mark.parametrize("completion, thinking, score, reason", [
    (THOUGHT + "4", True, 1.0, "thinks"),
    (EMPTY_THINK + "4", False, 1.0, "does not think"),
    (THOUGHT + "4<|im_end|>trailing", True, 1.0, "thinks"),
    # the mode
    (EMPTY_THINK + "4", True, 0.0, "non-empty think block"),
    (THOUGHT + "4", False, 0.0, "empty think block"),
    # malformed tags
    ("4", False, 0.0, "no single <think>"),
    ("<think>\nLet me see.", True, 0.0, "no single <think>"),
    ("Sure. " + THOUGHT + "4", True, 0.0, "no single <think>"),
    (THOUGHT + "4 <think>again</think> 4", True, 0.0, "no single <think>"),
    ("<think><think>\nx\n</think>\n\n4", True, 0.0, "no single <think>"),
    # two answers
    (THOUGHT + "4\n</think>\n\n4", True, 0.0, "a second </think>"),
    (EMPTY_THINK + "Answer: 4\nLet me check.\nFinal answer: 4", False, 0.0, "answer label appears twice"),
    (THOUGHT + "\\boxed{4} or \\boxed{5}", True, 0.0, "two \\boxed{}"),
    # one answer, labelled once, is fine
    (EMPTY_THINK + "Answer: 4", False, 1.0, "does not think"),
    # empty or broken answers
    (THOUGHT, True, 0.0, "empty answer"),
    (EMPTY_THINK + "   \n", False, 0.0, "empty answer"),
    (EMPTY_THINK + '<tool_call>\n{"name": "calculator"\n</tool_call>', False, 0.0, "malformed tool call"),
])
def test_format_reward_cases(completion, thinking, score, reason):
    result = format_reward(completion, thinking=thinking)
    assert result.score == score and reason in result.reason, result


def test_format_reward_reads_a_prefilled_think_and_refuses_a_bad_reference():
    assert format_reward("\nLet me see.\n</think>\n\n4", thinking=True, prefilled_think=True).score == 1.0
    assert format_reward("\n</think>\n\n4", thinking=True, prefilled_think=True).score == 0.0
    assert format_reward(EMPTY_THINK + "4", thinking="no").score is None
    assert format_reward(None, thinking=True).score == 0.0
    assert get_reward("format") is format_reward


_PLAIN = st.text(alphabet="abcxyz0123456789 .,!?", min_size=1, max_size=30).filter(
    lambda s: any(c.isalnum() for c in s))


@given(reasoning=st.one_of(st.just(""), _PLAIN), answer=_PLAIN, thinking=st.booleans())
def test_format_reward_follows_the_mode_and_counts_answers(reasoning, answer, thinking):
    completion = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    thinks = bool(reasoning.strip())
    assert format_reward(completion, thinking=thinking).score == float(thinks == thinking)
    assert format_reward(completion + "\n</think>\n\n" + answer, thinking=thinking).score == 0.0
    assert format_reward(f"<think>\n{reasoning}\n</think>\n\n", thinking=thinking).score == 0.0


# ----------------------------------------------------------------------------- the "answer_match" reward
@pytest.mark.parametrize("completion, reference, match, score", [
    (EMPTY_THINK + "Farmer.", "farmer", "exact", 1.0),
    (EMPTY_THINK + "1,528,257", "1528257", "exact", 1.0),
    (EMPTY_THINK + "Belka  wiihii.", "Belka wiihii.", "exact", 1.0),
    (EMPTY_THINK + "a farmer", "farmer", "exact", 0.0),
    (EMPTY_THINK + "Tamor works as a Farmer.", "farmer", "contains", 1.0),
    (EMPTY_THINK + "It is 123.", "12", "contains", 0.0),
    (EMPTY_THINK + "farmers everywhere", "farmer", "contains", 0.0),
    (EMPTY_THINK, "farmer", "exact", 0.0),
])
def test_answer_match_cases(completion, reference, match, score):
    assert answer_match_reward(completion, answer=reference, match=match).score == score


def test_answer_match_reads_only_the_final_answer():
    # The reference in the reasoning, or inside a tool call's arguments, is not an answer.
    assert answer_match_reward("<think>\nIt is farmer.\n</think>\n\nbaker", answer="farmer").score == 0.0
    call = '<tool_call>\n{"name": "lookup", "arguments": {"name": "farmer", "attribute": "job"}}\n</tool_call>'
    assert answer_match_reward(EMPTY_THINK + call, answer="farmer", match="contains").score == 0.0
    assert answer_match_reward("<think>\nfarmer", answer="farmer").score == 0.0  # never closed: no answer


def test_answer_match_refuses_a_bad_reference():
    assert answer_match_reward(EMPTY_THINK + "x", answer="").score is None
    assert answer_match_reward(EMPTY_THINK + "x", answer="x", match="fuzzy").score is None
    assert get_reward("answer_match") is answer_match_reward


# ----------------------------------------------------------------------------- Query.tools
def test_query_dict_carries_tools_only_when_there_are_some():
    plain = Query("u1", "2+2=", "add", 1, "task", {"item": "4"})
    assert list(plain.to_dict()) == ["uid", "question", "domain", "difficulty", "verifier", "reference"]
    assert Query.from_dict(plain.to_dict()) == plain
    tooled = Query("u2", "Use the calculator.", "tool_use", None, "answer_match", {"answer": "4"},
                   tools=("calculator", "search"))
    stored = json.loads(json.dumps(tooled.to_dict()))
    assert stored["tools"] == ["calculator", "search"]
    assert Query.from_dict(stored) == tooled
    with pytest.raises(ValueError, match="'tools' must be a list of tool names"):
        Query.from_dict({**stored, "tools": "calculator"})
