"""Multi-turn tool rollouts built by concatenating token ids, with the masks RL needs.

A trajectory is the prompt followed by alternating spans: a turn the model sampled (ending with
`<|im_end|>`), then the tool responses to that turn's calls as the chat template renders them —
`\\n<|im_start|>user\\n<tool_response>\\n…\\n</tool_response><|im_end|>\\n` (consecutive tool
messages share one user turn) — and the next assistant header `<|im_start|>assistant\\n`.

The trajectory is never re-rendered: the Qwen3 template drops the reasoning of turns before the
last user query and the empty think blocks of intermediate turns, so re-rendering would change
tokens the model already sampled. The model's tokens are kept as sampled and only the tool spans
are encoded, which gives exactly the text `chat.render` gives for the same conversation whenever
the model's turns are written as the template writes them (the tests check this).

`loss_mask` is 1 on the model's tokens and 0 on every tool-span token (the user turn and both
headers around it); `logprobs` holds the sampler's log-probs for model tokens and 0.0 for tool
tokens, as verl's tool agent loop and TRL's tool mask do. A reward reads `final_text`, the last
turn the model wrote, never the tool output.

How a trajectory ends (`finish_reason`):

* "stop": a turn ended with a stop token and holds no tool call (or ended with `<|endoftext|>`);
* "length": a turn reached `max_new_tokens` without a stop token;
* "turn_cap": a turn with calls was the `max_turns`-th assistant turn;
* "call_cap": a turn with calls came after the trajectory's `max_calls` calls were spent (calls
  beyond the budget within a turn that still had budget are answered "call_cap" and not run);
* "token_cap": the completion (model turns and tool responses, after the prompt) reached
  `max_completion_tokens` (the turn is cut there, or the tool responses would leave no room for the
  next turn). The cap leaves out the prompt, whose length varies with the tools it lists.

Calls are answered in the order the model wrote them, malformed ones (`chat.parse`'s errors)
included, as "invalid_call". `calls` lists the answered calls; a turn that ends the trajectory
with calls in it (turn, call or token cap) is not run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..chat import EMPTY_THINK, END_OF_TURN_TOKENS, parse
from ..generate import SamplingParams, generate
from .environment import ToolEnvironment, ToolResult, call_cap_result, invalid_call_result

__all__ = [
    "FINISH_REASONS",
    "TRUNCATION_MARKER",
    "Trajectory",
    "tool_calls_in_order",
    "tool_response_ids",
    "tool_response_text",
    "tool_rollouts",
    "truncate_tool_response",
]

FINISH_REASONS = ("stop", "length", "turn_cap", "call_cap", "token_cap")
# The marker verl's tool agent loop puts where it cuts a long tool response out of the middle.
TRUNCATION_MARKER = "...(truncated)..."
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


# --------------------------------------------------------------------------------------------
# Tool-response spans
# --------------------------------------------------------------------------------------------


def truncate_tool_response(tokenizer, content: str, max_tokens: int) -> str:
    """`content` cut to at most `max_tokens` tokens (encoded alone), the middle replaced by
    `TRUNCATION_MARKER`; the start and the end are kept in equal parts. When not even the marker
    fits, the content becomes the marker alone: the model must see that something was cut."""
    ids = tokenizer.encode(content)
    if len(ids) <= max_tokens:
        return content
    keep = max_tokens - len(tokenizer.encode(TRUNCATION_MARKER))
    if keep <= 0:
        return TRUNCATION_MARKER
    head, tail = (keep + 1) // 2, keep // 2
    while True:
        # Decoded pieces can re-encode to more tokens than they came from (merges across the
        # marker's edges): shrink the longer side until the whole fits.
        text = tokenizer.decode(ids[:head]) + TRUNCATION_MARKER + (tokenizer.decode(ids[-tail:]) if tail else "")
        if head + tail == 0 or len(tokenizer.encode(text)) <= max_tokens:
            return text
        if head >= tail:
            head -= 1
        else:
            tail -= 1


def tool_response_text(contents: Sequence[str], enable_thinking: bool = True) -> str:
    """What follows a calling turn's `<|im_end|>`: the template's rendering of the tool messages
    `contents` (one user turn) and the next assistant header (with the empty think block when
    `enable_thinking` is False, as the template's generation prompt has it)."""
    blocks = "".join("\n<tool_response>\n" + content + "\n</tool_response>" for content in contents)
    header = "<|im_start|>assistant\n" + ("" if enable_thinking else EMPTY_THINK)
    return "\n<|im_start|>user" + blocks + "<|im_end|>\n" + header


def tool_response_ids(tokenizer, results: Sequence[ToolResult], max_response_tokens: int,
                      enable_thinking: bool = True) -> list[int]:
    """Token ids of `tool_response_text` for `results`, each cut to `max_response_tokens`."""
    contents = [truncate_tool_response(tokenizer, result.content, max_response_tokens) for result in results]
    return tokenizer.encode(tool_response_text(contents, enable_thinking))


def tool_calls_in_order(text: str) -> list[tuple[dict | None, str | None]]:
    """The `<tool_call>` blocks of an assistant turn in the order written: `(call, None)` for a
    valid call and `(None, error)` for a malformed one, exactly as `chat.parse` judges them."""
    parsed = parse(text)
    calls, errors = list(parsed["tool_calls"]), list(parsed["errors"])
    if not calls and not errors:
        return []
    # The region `parse` searches for calls: the turn up to its end token, after the last </think>.
    cuts = [text.find(token) for token in END_OF_TURN_TOKENS if token in text]
    region = text[: min(cuts)] if cuts else text
    if "</think>" in region:
        region = region.split("</think>")[-1]
    elif "<think>" in region:
        region = ""
    blocks, position = [], 0
    while (start := region.find(_OPEN, position)) >= 0:
        end = region.find(_CLOSE, start + len(_OPEN))
        if end < 0:
            blocks.append(region[start:])
            break
        position = end + len(_CLOSE)
        blocks.append(region[start:position])
    ordered: list[tuple[dict | None, str | None]] = []
    for block in blocks:
        # A malformed block's raw text is in `errors`; a valid block's text never is (parse is a function).
        if errors and block == errors[0]["text"]:
            ordered.append((None, errors.pop(0)["error"]))
        elif calls:
            ordered.append((calls.pop(0), None))
    if calls or errors or len(ordered) != len(blocks):  # never expected; keep every call, valid ones first
        return [(call, None) for call in parsed["tool_calls"]] + [(None, e["error"]) for e in parsed["errors"]]
    return ordered


# --------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """One multi-turn rollout (see the module docstring). `responses[i]` are the tool messages'
    contents (after truncation) that answer turn i; the last turn has none."""

    prompt: list[int]
    completion: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    responses: list[list[str]] = field(default_factory=list)
    finish_reason: str = ""

    @property
    def n_turns(self) -> int:
        return len(self.turns)

    @property
    def final_text(self) -> str:
        """The model's last turn: what a reward reads (never the tool responses)."""
        return self.turns[-1] if self.turns else ""

    @property
    def n_calls(self) -> int:
        return len(self.calls)

    @property
    def n_ok_calls(self) -> int:
        return sum(call["outcome"] == "ok" for call in self.calls)

    @property
    def malformed_calls(self) -> int:
        return sum(call["outcome"] == "invalid_call" for call in self.calls)

    def _append(self, ids: Sequence[int], logprobs: Sequence[float] | None, sampled: bool) -> None:
        self.completion.extend(ids)
        self.loss_mask.extend([int(sampled)] * len(ids))
        self.logprobs.extend(logprobs if sampled else [0.0] * len(ids))


def _answer(env: ToolEnvironment, written: list[tuple[dict | None, str | None]], spent: int) -> list[tuple[dict, ToolResult]]:
    """Run a turn's calls in order under the call budget; `spent` calls were run before this turn."""
    answered = []
    for call, error in written:
        name = call["name"] if call is not None else None
        if spent >= env.limits.max_calls:
            result = call_cap_result(env.limits.max_calls)
        elif call is None:
            result = invalid_call_result(error)
        else:
            result = env.execute(call)
        spent += result.outcome != "call_cap"
        arguments = call["arguments"] if call is not None else None
        answered.append(({"name": name, "arguments": arguments, "outcome": result.outcome}, result))
    return answered


def _advance(trajectory: Trajectory, generation: Any, budget: int, *, tokenizer, env: ToolEnvironment,
             max_new_tokens: int, max_completion_tokens: int | None, enable_thinking: bool) -> bool:
    """Add one sampled turn (and its tool responses); returns whether the trajectory goes on."""
    ids = [int(t) for t in generation.token_ids]
    if generation.logprobs is None:
        raise ValueError("generate_fn must return logprobs (it is called with return_logprobs=True)")
    logprobs = [float(lp) for lp in generation.logprobs]
    cut = len(ids) > budget  # the round generated for a longer budget than this row has left
    ids, logprobs = ids[:budget], logprobs[:budget]
    trajectory._append(ids, logprobs, sampled=True)
    text = tokenizer.decode(ids)
    trajectory.turns.append(text)

    stopped = not cut and generation.finish_reason == "stop"
    if not stopped:
        trajectory.finish_reason = "length" if len(ids) >= max_new_tokens else "token_cap"
        return False
    written = tool_calls_in_order(text) if ids and ids[-1] == tokenizer.eos_token_id else []
    if not written:
        trajectory.finish_reason = "stop"
        return False
    if trajectory.n_turns >= env.limits.max_turns:
        trajectory.finish_reason = "turn_cap"
        return False
    spent = sum(call["outcome"] != "call_cap" for call in trajectory.calls)
    if spent >= env.limits.max_calls:
        trajectory.finish_reason = "call_cap"
        return False
    answered = _answer(env, written, spent)
    contents = [truncate_tool_response(tokenizer, result.content, env.limits.max_response_tokens)
                for _, result in answered]
    span = tokenizer.encode(tool_response_text(contents, enable_thinking))
    if max_completion_tokens is not None and len(trajectory.completion) + len(span) >= max_completion_tokens:
        trajectory.finish_reason = "token_cap"
        return False
    trajectory._append(span, None, sampled=False)
    trajectory.calls.extend(record for record, _ in answered)
    trajectory.responses.append(contents)
    return True


def tool_rollouts(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    env: ToolEnvironment,
    *,
    sampling: SamplingParams,
    max_new_tokens: int,
    max_completion_tokens: int | None = None,
    generator=None,
    max_batch_size: int | None = None,
    generate_fn: Callable[..., list] = generate,
    enable_thinking: bool = True,
) -> list[Trajectory]:
    """Roll every prompt out turn by turn with tool calls answered by `env` (module docstring).

    Each round samples one turn for every unfinished trajectory in one `generate_fn` call
    (`generate`'s signature; tests pass a scripted one). A turn gets at most `max_new_tokens`
    tokens, and the completion at most `max_completion_tokens` (None: no cap). The prompts
    end with the assistant header (`chat.render(..., tools=env.schemas(),
    add_generation_prompt=True)`); `enable_thinking=False` puts the empty think block after each
    later assistant header, as the template does after the first.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_completion_tokens is not None and (not isinstance(max_completion_tokens, int) or max_completion_tokens < 1):
        raise ValueError(f"max_completion_tokens must be None or an int >= 1, got {max_completion_tokens!r}")
    trajectories = [Trajectory(prompt=[int(t) for t in p]) for p in prompts]
    active = list(range(len(trajectories)))
    while active:
        budgets = {}
        for index in active:
            trajectory = trajectories[index]
            left = max_new_tokens
            if max_completion_tokens is not None:
                left = min(left, max_completion_tokens - len(trajectory.completion))
            if left <= 0:  # no budget left for a turn (max_new_tokens 0)
                trajectory.finish_reason = "token_cap"
            else:
                budgets[index] = left
        active = list(budgets)
        if not active:
            break
        generations = generate_fn(
            model, [trajectories[i].prompt + trajectories[i].completion for i in active], sampling,
            max_new_tokens=max(budgets.values()), return_logprobs=True, tokenizer=tokenizer, generator=generator,
            max_batch_size=max_batch_size,
        )
        if len(generations) != len(active):
            raise ValueError(f"generate_fn returned {len(generations)} generations for {len(active)} prompts")
        active = [
            index for index, generation in zip(active, generations)
            if _advance(trajectories[index], generation, budgets[index], tokenizer=tokenizer, env=env,
                        max_new_tokens=max_new_tokens, max_completion_tokens=max_completion_tokens,
                        enable_thinking=enable_thinking)
        ]
    return trajectories
