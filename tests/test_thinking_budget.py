"""The thinking-budget controller (`ThinkingController.step`) against its definition.

The definition, per row (Qwen3 technical report §4.3; qwen3repro/generate/budget.py): `<think>` opens
the thinking part and `</think>` closes it; the budget B counts the *sampled* tokens inside it; when
the count reaches B while the thinking is open, the next tokens are forced: the stop-thinking
directive (ending the think block with `</think>`), or for B = 0 the empty think block; a row is
forced at most once and may not open another think block afterwards; a think block the model closes
before the budget is left alone.

`reference` below writes that definition as a plain loop over one row; hypothesis drives batches of
scripted rows through the controller and through the reference and compares every token.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.generate import ThinkingBudget, ThinkingController

START, END, THINK, ANSWER, FALLBACK = 1, 2, 3, 4, 5
VOCAB = 16
DIRECTIVE = (10, 11, END, 12)
EMPTY = (13, END, 14)


def _budget(b: int) -> ThinkingBudget:
    return ThinkingBudget(budget=b, think_start_id=START, think_end_id=END, directive_ids=DIRECTIVE, empty_ids=EMPTY)


def reference(budget: int, prompt: list[int], wanted: list[int]) -> tuple[list[int], list[bool], int, bool]:
    """One row under the definition: the model wants to emit `wanted[t]` at step t (when a spent budget
    forbids `<think>`, it emits FALLBACK instead). Returns tokens, forced flags, thinking tokens, hit."""
    forced_ids = EMPTY if budget == 0 else DIRECTIVE
    marks = [t for t in prompt if t in (START, END)]
    thinking = bool(marks) and marks[-1] == START  # the prompt ends inside an open think block
    count, spent, queue = 0, False, []
    tokens, forced = [], []
    for want in wanted:
        if not queue and thinking and not spent and count >= budget:
            spent, queue = True, list(forced_ids)
        if queue:
            token, was_forced = queue.pop(0), True
        else:
            token, was_forced = (FALLBACK if spent and want == START else want), False
            if thinking and token != END:
                count += 1
        if token == END:
            thinking = False
        elif token == START:
            thinking = True
        tokens.append(token)
        forced.append(was_forced)
    return tokens, forced, count, spent


def scripted_sampler(wanted: torch.Tensor):
    """A `sample` for the controller: the argmax of logits that put `wanted[r]` first and FALLBACK second,
    so a masked `<think>` falls back to FALLBACK."""

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scripted = torch.full_like(logits, -30.0)
        scripted[:, FALLBACK] = -10.0
        scripted[torch.arange(len(wanted)), wanted] = 0.0
        return (scripted + logits).argmax(dim=-1)

    return sample


def run_controller(budget: int, prompts: list[list[int]], wanted: list[list[int]]):
    steps = len(wanted[0])
    controller = ThinkingController(_budget(budget), prompts, steps)
    tokens, forced = [], []
    for t in range(steps):
        logits = torch.zeros(len(prompts), VOCAB)
        before = logits.clone()
        token, forcing = controller.step(logits, scripted_sampler(torch.tensor([w[t] for w in wanted])))
        assert torch.equal(logits, before), "step must leave the caller's logits unchanged"
        tokens.append(token.tolist())
        forced.append(forcing.tolist())
        assert torch.equal(controller.forced[:, t], forcing)
    return (
        [list(r) for r in zip(*tokens)], [list(r) for r in zip(*forced)],
        controller.thinking_tokens.tolist(), controller.budget_hit.tolist(),
    )


prompt_tail = st.sampled_from([[7], [7, START], [START, THINK, END], [END, START, THINK]])


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(0, 6), data=st.data())
def test_step_follows_the_definition(budget, data):
    n = data.draw(st.integers(1, 4))
    length = data.draw(st.integers(1, 30))
    prompts = [[9] + data.draw(prompt_tail) for _ in range(n)]
    wanted = [data.draw(st.lists(st.sampled_from([START, END, THINK, THINK, THINK, ANSWER]),
                                 min_size=length, max_size=length)) for _ in range(n)]
    tokens, forced, thinking, hit = run_controller(budget, prompts, wanted)
    for r in range(n):
        ref_tokens, ref_forced, ref_thinking, ref_hit = reference(budget, prompts[r], wanted[r])
        assert tokens[r] == ref_tokens
        assert forced[r] == ref_forced
        assert thinking[r] == ref_thinking
        assert hit[r] == ref_hit
        assert thinking[r] <= budget  # never more than B sampled thinking tokens in all


def test_at_the_budget_the_directive_and_think_end_are_forced():
    # Thinks forever: B sampled thinking tokens, then the directive (which closes the block), then answers.
    b = 3
    tokens, forced, thinking, hit = run_controller(b, [[9, START]], [[THINK] * 6 + [ANSWER] * 3])
    assert tokens[0] == [THINK] * b + list(DIRECTIVE) + [ANSWER] * 2
    assert forced[0] == [False] * b + [True] * len(DIRECTIVE) + [False] * 2
    assert END in DIRECTIVE and (thinking, hit) == ([b], [True])


def test_budget_zero_forces_the_empty_think_block():
    tokens, forced, thinking, hit = run_controller(0, [[9, START]], [[THINK] * 5])
    assert tokens[0] == list(EMPTY) + [THINK] * 2
    assert forced[0] == [True] * len(EMPTY) + [False] * 2
    assert (thinking, hit) == ([0], [True])


def test_a_think_block_closed_before_the_budget_is_left_alone():
    wanted = [START, THINK, THINK, END] + [ANSWER] * 8
    tokens, forced, thinking, hit = run_controller(5, [[9]], [wanted])
    assert tokens[0] == wanted and not any(forced[0])
    assert (thinking, hit) == ([2], [False])


def test_a_reopened_think_block_keeps_counting_and_stays_closed_after_the_directive():
    # 2 thinking tokens, closed; re-opened: the third token reaches B = 3, then the directive; a later
    # <think> is not allowed (it falls back to another token) and nothing more is counted.
    wanted = [START, THINK, THINK, END, START, THINK, THINK, THINK, THINK, THINK, START, THINK]
    tokens, forced, thinking, hit = run_controller(3, [[9]], [wanted])
    assert tokens[0] == [START, THINK, THINK, END, START, THINK] + list(DIRECTIVE) + [FALLBACK, THINK]
    assert forced[0] == [False] * 6 + [True] * len(DIRECTIVE) + [False] * 2
    assert (thinking, hit) == ([3], [True])


def test_dropped_rows_and_finished_rows():
    # Row 0 finishes at step 1 (`live` False from then on) and row 1 is dropped before step 2 (`keep`):
    # the kept rows go on as if alone, and a finished row's outputs keep their values at its end (row 0
    # is forced at step 2, after its end: its budget_hit stays False).
    prompts = [[9, START], [9, START], [9]]
    wanted = [[THINK] * 8, [THINK] * 8, [START] + [THINK] * 7]
    alone = [run_controller(2, [p], [w]) for p, w in zip(prompts, wanted)]
    controller = ThinkingController(_budget(2), prompts, 8)
    rows = [0, 1, 2]
    live = torch.ones(3, dtype=torch.bool)
    thinking_at_end = None
    for t in range(8):
        if t == 2:
            rows = [0, 2]
            controller.keep(torch.tensor([0, 2]))
            live = live[[0, 2]]
        token, _ = controller.step(torch.zeros(len(rows), VOCAB),
                                   scripted_sampler(torch.tensor([wanted[r][t] for r in rows])), live=live)
        for slot, r in enumerate(rows):
            assert token[slot].item() == alone[r][0][0][t]
        if t == 1:
            thinking_at_end = controller.thinking_tokens[0].item()
            live = torch.tensor([False, True, True])
    assert controller.thinking_tokens[0].item() == thinking_at_end == 2
    assert not controller.budget_hit[0].item() and alone[0][3] == [True]
    assert controller.thinking_tokens[2].item() == alone[2][2][0]
    assert controller.budget_hit[2].item() == alone[2][3][0]
    assert controller.forced[2].tolist() == alone[2][1][0]
