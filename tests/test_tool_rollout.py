"""Multi-turn tool rollouts: masks and log-probs over scripted trajectories (hypothesis), the
token-concatenated trajectory decodes to the chat template's rendering of the same conversation,
caps end a trajectory with the right reason, and a real micro model rolls out through the tools."""
from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from qwen3repro.chat import parse, render, render_pieces
from qwen3repro.generate import Generation, SamplingParams, generate
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.tokenizer import train_tokenizer
from qwen3repro.tools import (
    FINISH_REASONS,
    TOOL_OUTCOMES,
    TRUNCATION_MARKER,
    Tool,
    ToolEnvironment,
    ToolLimits,
    ToolResult,
    default_tools,
    tool_calls_in_order,
    tool_response_ids,
    tool_rollouts,
)

SAMPLING = SamplingParams(temperature=1.0)
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "lorem", "ipsum")


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = list(WORDS) + ["calculator", "expression", "name", "arguments", '{"', '": "', '"}}', "echo", "Error"]
    words += ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 5))) for _ in range(150)]
    return train_tokenizer([" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)], 450)


def _echo(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def _fail() -> str:
    raise RuntimeError("broken tool")


ECHO = Tool("echo", "n words", {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}, _echo)
FAIL = Tool("fail", "always fails", {"type": "object", "properties": {}}, _fail)


def make_env(**limits) -> ToolEnvironment:
    return ToolEnvironment(default_tools()[:1] + [ECHO, FAIL], ToolLimits(**limits))


def prompt_ids(tok, env, question: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tok.encode(render(messages, tools=env.schemas(), add_generation_prompt=True))


# ------------------------------------------------------------------------- a scripted model


class ScriptedTurns:
    """A `generate_fn` whose turns are texts written in advance: `turns[prompt][turn]`. It
    stops a row at its first stop token or at `max_new_tokens` (as the engine does), gives every
    token a distinct non-zero log-prob, and records the rows it was asked to complete."""

    def __init__(self, tok, prompts, turns, final: str = "<think>\nend\n</think>\n\ndone<|im_end|>"):
        self.tok, self.prompts, self.turns, self.final = tok, [list(p) for p in prompts], turns, final
        self.count: dict[int, int] = defaultdict(int)
        self.rows: list[tuple[int, list[int]]] = []
        self.returned: dict[int, list[Generation]] = defaultdict(list)

    def __call__(self, model, rows, sampling, *, max_new_tokens, return_logprobs, tokenizer, generator,
                 max_batch_size):
        assert return_logprobs and tokenizer is self.tok
        out = []
        for row in rows:
            index = next(i for i, p in enumerate(self.prompts) if row[: len(p)] == p)
            self.rows.append((index, list(row)))
            script = self.turns[index]
            text = script[self.count[index]] if self.count[index] < len(script) else self.final
            self.count[index] += 1
            ids = self.tok.encode(text)
            stops = [k for k, t in enumerate(ids) if t in (self.tok.eos_token_id, self.tok.endoftext_id)]
            if stops and stops[0] < max_new_tokens:
                ids, finish = ids[: stops[0] + 1], "stop"
            else:
                ids, finish = ids[:max_new_tokens], "length"
            logprobs = [-0.01 * (1 + (7 * k) % 97) for k in range(len(ids))]
            generation = Generation(ids, finish, logprobs)
            self.returned[index].append(generation)
            out.append(generation)
        return out


def runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal mask values: (value, start, end)."""
    out, start = [], 0
    for k in range(1, len(mask) + 1):
        if k == len(mask) or mask[k] != mask[start]:
            out.append((mask[start], start, k))
            start = k
    return out


# ------------------------------------------------------------- random multi-turn trajectories

BLOCKS = {
    "calc": ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>', "ok"),
    "unknown": ('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', "unknown_tool"),
    "bad_args": ('<tool_call>\n{"name": "calculator", "arguments": {"expr": "1"}}\n</tool_call>', "bad_arguments"),
    "not_object_args": ('<tool_call>\n{"name": "echo", "arguments": [3]}\n</tool_call>', "bad_arguments"),
    "raises": ('<tool_call>\n{"name": "fail", "arguments": {}}\n</tool_call>', "tool_error"),
    "attack": ('<tool_call>\n{"name": "calculator", "arguments": {"expression": "9**9**9"}}\n</tool_call>', "tool_error"),
    "bad_json": ('<tool_call>\n{"name": calculator, "arguments": \n</tool_call>', "invalid_call"),
    "not_object": ("<tool_call>\n[1, 2]\n</tool_call>", "invalid_call"),
    "no_arguments": ('<tool_call>\n{"name": "echo"}\n</tool_call>', "invalid_call"),
}


def echo_block(n: int) -> tuple[str, str]:
    return '<tool_call>\n{"name": "echo", "arguments": {"n": ' + str(n) + "}}\n</tool_call>", "ok"


call_kinds = st.one_of(st.sampled_from(sorted(BLOCKS)).map(BLOCKS.get), st.integers(0, 60).map(echo_block))
turn_plans = st.tuples(
    st.lists(call_kinds, max_size=3),
    st.sampled_from(["im_end"] * 6 + ["endoftext", "unclosed", "no_stop"]),
)


def turn_text(j: int, blocks: list[str], ending: str) -> str:
    text = f"<think>\nstep {j}\n</think>\n\n{WORDS[j % len(WORDS)]}" + "".join("\n" + b for b in blocks)
    if ending == "unclosed":
        return text + '\n<tool_call>\n{"name": "echo", "arguments": {"n": 2<|im_end|>'
    if ending == "no_stop":
        return text + " " + " ".join(WORDS) * 80
    return text + ("<|im_end|>" if ending == "im_end" else "<|endoftext|>")


@settings(max_examples=120)  # each example takes milliseconds; the caps need many to be reached
@given(
    plans=st.lists(st.lists(turn_plans, min_size=1, max_size=5), min_size=1, max_size=3),
    max_turns=st.integers(1, 4),
    max_calls=st.integers(1, 3),
    max_response_tokens=st.integers(1, 30),
    max_new_tokens=st.integers(60, 500),
    beyond_prompt=st.none() | st.integers(1, 600),
)
def test_masks_and_logprobs_over_random_trajectories(tok, plans, max_turns, max_calls, max_response_tokens,
                                                     max_new_tokens, beyond_prompt):
    env = make_env(max_turns=max_turns, max_calls=max_calls, max_response_tokens=max_response_tokens)
    prompts = [prompt_ids(tok, env, f"question {i} {WORDS[i]}") for i in range(len(plans))]
    max_completion_tokens = beyond_prompt
    scripts, expected_outcomes = [], []
    for plan in plans:
        texts, outcomes = [], []
        for j, (calls, ending) in enumerate(plan):
            texts.append(turn_text(j, [b for b, _ in calls], ending))
            outcomes.append([o for _, o in calls] + (["invalid_call"] if ending == "unclosed" else []))
        scripts.append(texts)
        expected_outcomes.append(outcomes)
    script = ScriptedTurns(tok, prompts, scripts)
    trajectories = tool_rollouts(None, tok, prompts, env, sampling=SAMPLING, max_new_tokens=max_new_tokens,
                                 max_completion_tokens=max_completion_tokens, generate_fn=script)

    for index, t in enumerate(trajectories):
        assert t.prompt == prompts[index]
        assert len(t.completion) == len(t.loss_mask) == len(t.logprobs)
        assert set(t.loss_mask) <= {0, 1}
        assert all((m == 0) == (lp == 0.0) for m, lp in zip(t.loss_mask, t.logprobs))
        assert t.finish_reason in FINISH_REASONS
        event(f"finish: {t.finish_reason}, turns: {t.n_turns}")
        assert 1 <= t.n_turns <= max_turns
        if max_completion_tokens is not None:
            assert len(t.completion) <= max_completion_tokens

        # Model runs are exactly the sampled turns with their log-probs; tool runs sit between them.
        pieces = runs(t.loss_mask)
        model_runs = [(s, e) for v, s, e in pieces if v == 1]
        tool_runs = [(s, e) for v, s, e in pieces if v == 0]
        assert [v for v, _, _ in pieces] == [1, 0] * (len(pieces) // 2) + [1] * (len(pieces) % 2)
        assert len(model_runs) == t.n_turns and len(tool_runs) == t.n_turns - 1 == len(t.responses)
        for turn, (s, e), generation in zip(t.turns, model_runs, script.returned[index]):
            assert t.completion[s:e] == generation.token_ids[: e - s]
            assert t.logprobs[s:e] == generation.logprobs[: e - s]
            assert tok.decode(t.completion[s:e]) == turn
        assert t.final_text == t.turns[-1]
        for (s, e), contents in zip(tool_runs, t.responses):
            span = tok.decode(t.completion[s:e])
            assert span.startswith("\n<|im_start|>user\n<tool_response>\n")
            assert span.endswith("\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
            assert span.count("<tool_response>\n") == len(contents) >= 1
            cap = max(max_response_tokens, len(tok.encode(TRUNCATION_MARKER)))
            assert all(len(tok.encode(c)) <= cap for c in contents)

        # Every round completed exactly prompt + completion so far.
        for row_index, row in script.rows:
            if row_index == index:
                assert row == (t.prompt + t.completion)[: len(row)]

        # The answered calls carry the outcomes their blocks deserve, in the order written, under the budget.
        expected = []
        spent = 0
        for outcomes in expected_outcomes[index][: len(t.responses)]:
            for outcome in outcomes:
                expected.append(outcome if spent < max_calls else "call_cap")
                spent += spent < max_calls
        assert [c["outcome"] for c in t.calls] == expected
        assert all(c["outcome"] in TOOL_OUTCOMES for c in t.calls)
        assert t.n_calls == len(expected) and t.malformed_calls == expected.count("invalid_call")
        assert t.n_ok_calls == expected.count("ok")
        assert sum(c["outcome"] != "call_cap" for c in t.calls) <= max_calls

        # The reason the trajectory ended is the one the rules give for its last turn.
        last = script.returned[index][t.n_turns - 1]
        plan = plans[index][t.n_turns - 1] if t.n_turns <= len(plans[index]) else ([], "im_end")
        has_calls = bool(plan[0]) or plan[1] == "unclosed"
        if t.finish_reason == "stop":
            assert last.finish_reason == "stop" and (not has_calls or plan[1] == "endoftext")
        elif t.finish_reason == "length":
            assert len(last.token_ids) == max_new_tokens and last.finish_reason == "length"
        elif t.finish_reason == "turn_cap":
            assert t.n_turns == max_turns and has_calls
        elif t.finish_reason == "call_cap":
            assert spent >= max_calls and has_calls and t.n_turns < max_turns
        else:
            assert max_completion_tokens is not None


# ---------------------------------------------------------------------------------- round trip


def canonical_turn(reasoning: str, content: str, calls: list[dict]) -> str:
    """An assistant turn written exactly as the template writes it (body through <|im_end|>)."""
    message = {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": calls}
    pieces = render_pieces([{"role": "user", "content": "q"}, message])
    return next(text for text, trained in pieces if trained)


text_strategy = st.lists(st.sampled_from(WORDS + ("é", "\"quoted\"", "{x}", "ünï")), max_size=6).map(" ".join)
nonempty_text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
valid_calls = st.one_of(
    st.builds(lambda e: {"name": "calculator", "arguments": {"expression": e}},
              st.sampled_from(["1+1", "2**10", "1/0", "abc", "3 * (4 - 1)"])),
    st.builds(lambda n: {"name": "echo", "arguments": {"n": n}}, st.integers(0, 40)),
    st.builds(lambda w: {"name": "nope", "arguments": {"word": w}}, text_strategy),
    st.just({"name": "echo", "arguments": {"n": "many"}}),
    st.just({"name": "fail", "arguments": {}}),
)
calling_turns = st.tuples(nonempty_text, text_strategy, st.lists(valid_calls, min_size=1, max_size=3))


@given(
    calling=st.lists(calling_turns, max_size=3),
    final=st.tuples(text_strategy, text_strategy),
    system=st.none() | st.just("You answer briefly."),
    max_response_tokens=st.integers(4, 40),
)
def test_the_trajectory_decodes_to_the_rendered_conversation(tok, calling, final, system, max_response_tokens):
    env = make_env(max_turns=len(calling) + 1, max_calls=10, max_response_tokens=max_response_tokens)
    prompt = prompt_ids(tok, env, "what is six times seven", system)
    texts = [canonical_turn(r, c, calls) for r, c, calls in calling] + [canonical_turn(final[0], final[1], [])]
    script = ScriptedTurns(tok, [prompt], [texts])
    (t,) = tool_rollouts(None, tok, [prompt], env, sampling=SAMPLING, max_new_tokens=400, generate_fn=script)
    assert t.finish_reason == "stop" and t.n_turns == len(texts)

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "what is six times seven"}]
    for i, turn in enumerate(t.turns):
        parsed = parse(turn)
        messages.append({"role": "assistant", "reasoning_content": parsed["reasoning_content"],
                         "content": parsed["content"], "tool_calls": parsed["tool_calls"]})
        messages += [{"role": "tool", "content": content} for content in (t.responses[i] if i < len(t.responses) else [])]
    assert tok.decode(t.prompt + t.completion) + "\n" == render(messages, tools=env.schemas())


def test_tool_response_ids_match_the_template(tok):
    results = [ToolResult("42", "ok"), ToolResult("Error: boom", "tool_error"), ToolResult(_echo(80), "ok")]
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": "plan", "content": "", "tool_calls": [
        {"name": "calculator", "arguments": {"expression": "6*7"}}]}]
    ids = tool_response_ids(tok, results, 12)
    text = tok.decode(ids)
    contents = text.split("<tool_response>\n")[1:]
    contents = [c.split("\n</tool_response>")[0] for c in contents]
    assert contents[:2] == ["42", "Error: boom"] and "...(truncated)..." in contents[2]
    before = render(base)
    after = render(base + [{"role": "tool", "content": c} for c in contents], add_generation_prompt=True)
    assert before.endswith("<|im_end|>\n") and after == before[:-1] + text
    # Without thinking the next header carries the empty think block, as the generation prompt does.
    no_think = tok.decode(tool_response_ids(tok, results[:1], 12, enable_thinking=False))
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_calls_are_answered_in_the_order_written():
    text = ("<think>\nplan <tool_call> inside thinking is not a call\n</think>\n\nok\n"
            + BLOCKS["calc"][0] + "\n" + BLOCKS["bad_json"][0] + "\n" + BLOCKS["unknown"][0] + "\n"
            + BLOCKS["not_object"][0] + "\n<tool_call>\n{\"name\": \"x\"<|im_end|>")
    ordered = tool_calls_in_order(text)
    assert [call["name"] if call else None for call, _ in ordered] == ["calculator", None, "nope", None, None]
    assert "invalid JSON" in ordered[1][1] and "never closed" in ordered[4][1]
    parsed = parse(text)
    assert [c for c, _ in ordered if c] == parsed["tool_calls"]
    assert [e for _, e in ordered if e] == [e["error"] for e in parsed["errors"]]
    assert tool_calls_in_order("<think>\n<tool_call>\n{}\n</tool_call>") == []
    assert tool_calls_in_order("plain answer<|im_end|>") == []


# ---------------------------------------------------------------------------------------- caps


def run_one(tok, env, turns, **kwargs):
    prompt = prompt_ids(tok, env, "q")
    script = ScriptedTurns(tok, [prompt], [turns])
    kwargs.setdefault("max_new_tokens", 200)
    (t,) = tool_rollouts(None, tok, [prompt], env, sampling=SAMPLING, generate_fn=script, **kwargs)
    return t


CALC_TURN = turn_text(0, [BLOCKS["calc"][0]], "im_end")


def test_turn_cap(tok):
    t = run_one(tok, make_env(max_turns=2), [CALC_TURN] * 5)
    assert (t.finish_reason, t.n_turns, t.n_calls, t.n_ok_calls) == ("turn_cap", 2, 1, 1)
    assert t.loss_mask[-1] == 1  # the capped turn is the model's, with no response after it


def test_call_cap(tok):
    three = turn_text(0, [BLOCKS["calc"][0]] * 3, "im_end")
    t = run_one(tok, make_env(max_turns=5, max_calls=2), [three, CALC_TURN, CALC_TURN])
    assert t.finish_reason == "call_cap" and t.n_turns == 2
    assert [c["outcome"] for c in t.calls] == ["ok", "ok", "call_cap"]
    assert "limit of 2 tool calls" in t.responses[0][2]


def test_token_caps(tok):
    env = make_env(max_turns=5)
    # The turn itself runs into the total budget.
    prompt = prompt_ids(tok, env, "q")
    t = run_one(tok, env, [CALC_TURN], max_completion_tokens=5)
    assert (t.finish_reason, len(t.completion)) == ("token_cap", 5)
    # The tool responses would leave no room for another turn.
    n = len(tok.encode(CALC_TURN))
    t = run_one(tok, env, [CALC_TURN], max_completion_tokens=n + 3)
    assert t.finish_reason == "token_cap" and t.completion == tok.encode(CALC_TURN) and t.n_calls == 0
    # A second turn gets what is left of the total budget.
    span = len(tool_response_ids(tok, [ToolResult("42", "ok")], 64))
    t = run_one(tok, env, [CALC_TURN, CALC_TURN], max_completion_tokens=n + span + 7)
    assert t.finish_reason == "token_cap" and t.n_turns == 2 and len(t.prompt) + len(t.completion) == len(prompt) + n + span + 7
    # The cap counts the completion alone, whatever the prompt's length.
    t = run_one(tok, env, [CALC_TURN], max_completion_tokens=1)
    assert t.finish_reason == "token_cap" and len(t.completion) == 1 and len(t.prompt) > 1


def test_length_and_stop(tok):
    env = make_env()
    t = run_one(tok, env, [turn_text(0, [], "no_stop")], max_new_tokens=30)
    assert (t.finish_reason, len(t.completion)) == ("length", 30)
    t = run_one(tok, env, [turn_text(0, [BLOCKS["calc"][0]], "endoftext")])
    assert (t.finish_reason, t.n_calls) == ("stop", 0)  # only <|im_end|> hands the turn to the tools
    t = run_one(tok, env, [CALC_TURN, turn_text(1, [], "im_end")])
    assert (t.finish_reason, t.n_turns, t.final_text) == ("stop", 2, turn_text(1, [], "im_end"))
    assert "<tool_response>" not in t.final_text


def test_bad_arguments_to_tool_rollouts(tok):
    env = make_env()
    with pytest.raises(ValueError, match="max_new_tokens"):
        tool_rollouts(None, tok, [[1]], env, sampling=SAMPLING, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_completion_tokens"):
        tool_rollouts(None, tok, [[1]], env, sampling=SAMPLING, max_new_tokens=4, max_completion_tokens=0)
    assert tool_rollouts(None, tok, [], env, sampling=SAMPLING, max_new_tokens=4) == []


# ----------------------------------------------------------------------------- a real model


def test_real_micro_model_rolls_out_through_the_tools(tok):
    torch.manual_seed(0)
    model = Qwen3(get_model_config("micro")).eval()
    env = ToolEnvironment(default_tools(), ToolLimits(max_turns=2))
    prompts = [prompt_ids(tok, env, f"what is {a} plus {b}") for a, b in ((2, 3), (10, 20))]
    calls = [canonical_turn("add", "", [{"name": "calculator", "arguments": {"expression": e}}]) for e in ("2+3", "10+20")]
    rounds = []

    def generate_fn(model, rows, sampling, **kwargs):
        rounds.append(len(rows))
        if len(rounds) > 1:
            return generate(model, rows, sampling, **kwargs)
        # The untrained model would not call a tool: its first turn is written for it, with the
        # model's own log-probs of those tokens.
        out = []
        for row, text in zip(rows, calls):
            ids = tok.encode(text)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([row + ids])).logits[0].float(), dim=-1)
            out.append(Generation(ids, "stop", logp[len(row) - 1: -1].gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()))
        return out

    trajectories = tool_rollouts(model, tok, prompts, env, sampling=SAMPLING, max_new_tokens=80,
                                 generator=torch.Generator().manual_seed(0), generate_fn=generate_fn)
    assert rounds == [2, 2]
    for t, expected in zip(trajectories, ("5", "30")):
        assert t.n_turns == 2 and t.calls[0]["outcome"] == "ok" and t.responses[0] == [expected]
        assert t.finish_reason in ("stop", "length", "turn_cap")
        assert f"<tool_response>\n{expected}\n</tool_response>" in tok.decode(t.completion)
        # Every model token's log-prob is the model's own, given the concatenated context (tool span included).
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([t.prompt + t.completion])).logits[0].float(), dim=-1)
        ref = logp[len(t.prompt) - 1: -1].gather(-1, torch.tensor(t.completion)[:, None])[:, 0]
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(t.logprobs)[mask], ref[mask], atol=1e-4, rtol=0)
        first = tok.encode(calls[0 if expected == "5" else 1])
        assert t.completion[: len(first)] == first and t.loss_mask[: len(first)] == [1] * len(first)


# ------------------------------------------------------------------------- chat CLI with tools


class _RowCache:
    def __init__(self, batch_size: int):
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]

    def reorder(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]


class ScriptedToolModel(torch.nn.Module):
    """A stand-in model (the `Qwen3` interface `generate` uses) that writes `turns[k]` token by token,
    k being the number of tool responses it has read so far: the chat CLI runs it unchanged."""

    def __init__(self, tok, turns: list[str]):
        super().__init__()
        self.turns = [tok.encode(t) for t in turns]
        self.close_id = tok.token_to_id("</tool_response>")
        self.header = tok.encode("<|im_start|>assistant\n")
        self.vocab = tok.vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def new_kv_cache(self, batch_size, max_len, **_):
        return _RowCache(batch_size)

    def _next(self, history: list[int]) -> int:
        turn = self.turns[min(history.count(self.close_id), len(self.turns) - 1)]
        start = max(i for i in range(len(history)) if history[i: i + len(self.header)] == self.header) + len(self.header)
        return turn[min(len(history) - start, len(turn) - 1)]

    def forward(self, input_ids, *, position_ids=None, attention_mask=None, kv_cache=None):
        b, s = input_ids.shape
        logits = torch.full((b, s, self.vocab), -30.0)
        for r in range(b):
            kv_cache.rows[r].extend(int(input_ids[r, j]) for j in range(s)
                                    if attention_mask is None or bool(attention_mask[r, j]))
            logits[r, -1, self._next(kv_cache.rows[r])] = 0.0
        return type("Output", (), {"logits": logits})()


CLI_TURNS = [canonical_turn("multiply", "", [{"name": "calculator", "arguments": {"expression": "6*7"}}]),
             canonical_turn("the tool says 42", "alpha 42", [])]


def test_chat_session_runs_the_model_calls_through_the_tools(tok):
    from qwen3repro.chat_cli import ChatSession

    env = ToolEnvironment(default_tools())
    session = ChatSession(ScriptedToolModel(tok, CLI_TURNS), tok, tools=env, temperature=0.0, max_new_tokens=300)
    parsed = session.reply("what is six times seven")
    assert (parsed["content"], parsed["finish_reason"]) == ("alpha 42", "stop")
    (step,) = parsed["steps"]
    assert step["calls"] == [({"name": "calculator", "arguments": {"expression": "6*7"}, "outcome": "ok"}, "42")]
    assert [m["role"] for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    # The remembered chat renders to what the model saw and wrote.
    rendered = render(session.messages, tools=env.schemas())
    assert rendered.endswith(CLI_TURNS[1] + "\n") and "<tool_response>\n42\n</tool_response>" in rendered
    with pytest.raises(ValueError, match="budget"):
        ChatSession(ScriptedToolModel(tok, CLI_TURNS), tok, tools=env, budget=4)


def test_chat_command_shows_calls_and_results(tok, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from qwen3repro import chat_cli

    monkeypatch.setattr(chat_cli, "load_checkpoint", lambda *args: (ScriptedToolModel(tok, CLI_TURNS), tok))
    runner = CliRunner()
    result = runner.invoke(chat_cli.chat_command, [str(tmp_path), "--tools", "--prompt", "what is six times seven",
                                                   "--temperature", "0", "--max-new-tokens", "300"])
    assert result.exit_code == 0, result.output
    assert '[tool call] calculator({"expression": "6*7"}) -> ok\n42\n' in result.output
    assert result.output.rstrip().endswith("alpha 42")
    # A model that keeps calling is stopped at the turn cap, and the user is told.
    calling = ScriptedToolModel(tok, CLI_TURNS[:1])
    monkeypatch.setattr(chat_cli, "load_checkpoint", lambda *args: (calling, tok))
    result = runner.invoke(chat_cli.chat_command, [str(tmp_path), "--tools", "--prompt", "go", "--temperature", "0",
                                                   "--max-new-tokens", "300"])
    assert result.exit_code == 0 and result.output.count("[tool call]") == 2
    assert "limit of assistant turns" in result.output
    bad = runner.invoke(chat_cli.chat_command, [str(tmp_path), "--tools", "--budget", "3", "--prompt", "x"])
    assert bad.exit_code == 2 and "--budget does not apply with --tools" in bad.output
