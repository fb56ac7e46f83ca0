"""The thinking budget (Qwen3 technical report §4.3, "Thinking budget"): a cap on how many tokens a
row may think before it has to answer.

`ThinkingBudget` is the setting: the budget B and the token ids the controller needs.
`ThinkingController` follows every row of one batch while it is decoded; the decode loop calls its
`step` once per generated token. Its definition:

* a generated `<think>` opens the thinking part, `</think>` closes it; a prompt that already ends
  inside an open think block (an assistant prefill) starts in the thinking state;
* the controller counts the *sampled* tokens inside the thinking part; when a row's count reaches
  B while its thinking is still open, the next tokens are not sampled but forced: the report's
  stop-thinking directive (`chat.STOP_THINKING_DIRECTIVE`, "Considering the limited time by the
  user, I have to give the solution based on the thinking directly now.\\n</think>.\\n\\n"),
  after which the row samples its answer as usual. Budget 0 forces "\\n\\n</think>\\n\\n" right
  after `<think>`, i.e. the empty think block of non-thinking mode;
* a row is forced at most once, and never when the model closes its thinking by itself first;
* the count runs over the whole completion (a think block re-opened after a natural close keeps
  counting), and after the directive a row may not open another think block, so a row never
  thinks more than B sampled tokens in all.

Forced tokens are part of the output (they count towards `max_new_tokens`) and are flagged in
`Generation.forced`, so an RL loss can mask them out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..chat import EMPTY_THINK, STOP_THINKING_DIRECTIVE

__all__ = ["ThinkingBudget", "ThinkingController", "thinking_open"]


@dataclass(frozen=True)
class ThinkingBudget:
    """A thinking budget with the token ids the controller needs (see the module docstring)."""

    budget: int
    think_start_id: int
    think_end_id: int
    directive_ids: tuple[int, ...]  # forced when the budget is reached (budget > 0)
    empty_ids: tuple[int, ...]  # forced right after <think> when the budget is 0

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise ValueError(f"thinking budget must be >= 0, got {self.budget}")
        if self.think_end_id not in self.directive_ids or self.think_end_id not in self.empty_ids:
            raise ValueError("the forced token sequences must close the think block (contain </think>)")

    @classmethod
    def from_tokenizer(cls, tokenizer, budget: int) -> "ThinkingBudget":
        start = tokenizer.think_start_id
        empty = tokenizer.encode(EMPTY_THINK)
        if not empty or empty[0] != start:
            raise ValueError("the tokenizer does not encode the empty think block as <think> + ...")
        return cls(
            budget=int(budget),
            think_start_id=start,
            think_end_id=tokenizer.think_end_id,
            directive_ids=tuple(tokenizer.encode(STOP_THINKING_DIRECTIVE)),
            empty_ids=tuple(empty[1:]),
        )

    @property
    def forced_ids(self) -> tuple[int, ...]:
        return self.empty_ids if self.budget == 0 else self.directive_ids


def thinking_open(prompt: Sequence[int], start_id: int, end_id: int) -> bool:
    """Whether the prompt ends inside an open think block (its last <think> after its last </think>)."""
    last_start = last_end = -1
    for i, t in enumerate(prompt):
        if t == start_id:
            last_start = i
        elif t == end_id:
            last_end = i
    return last_start > last_end


class ThinkingController:
    """The budget's state for every row of a batch, and its outputs per row.

    The state is kept per batch slot, as vectors, so a step costs a few tensor operations whatever
    the batch size; `keep` follows the engine when it drops finished rows. The outputs (`forced`,
    `thinking_tokens`, `budget_hit`) are kept per original row, since the slots move.
    """

    def __init__(self, budget: ThinkingBudget, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 device=None) -> None:
        n = len(prompts)
        self.budget = budget
        self.forced_seq = torch.tensor(budget.forced_ids, dtype=torch.long, device=device)
        self.n_forced = len(budget.forced_ids)
        # Per batch slot.
        self.rows = torch.arange(n, device=device)  # slot -> original row
        self.in_think = torch.tensor(
            [thinking_open(p, budget.think_start_id, budget.think_end_id) for p in prompts], device=device
        )
        self.count = torch.zeros(n, dtype=torch.long, device=device)  # sampled thinking tokens so far
        self.used = torch.zeros(n, dtype=torch.bool, device=device)  # forced once: thinking stays closed
        # Index into `forced_seq` of the next forced token; n_forced when the row is not being forced.
        self.forced_pos = torch.full((n,), self.n_forced, dtype=torch.long, device=device)
        # Per original row.
        self.forced = torch.zeros((n, max_new_tokens), dtype=torch.bool, device=device)  # [row, t]
        self.thinking_tokens = torch.zeros(n, dtype=torch.long, device=device)
        self.budget_hit = torch.zeros(n, dtype=torch.bool, device=device)
        self.t = 0  # the index of the next generated token

    def step(self, logits: torch.Tensor, sample: Callable[[torch.Tensor], torch.Tensor],
             live: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of every slot, and whether the controller forced it ([B] each).

        `logits` [B, V] are the step's logits, left unchanged; `sample` draws a token per row from
        logits (the engine's sampler). Rows whose budget was spent may not open a second think block,
        so `<think>` is masked for them before the draw. `live` [B] marks the rows still generating:
        the outputs of the others (finished, waiting to be dropped) keep the values they ended with.
        """
        b = self.budget
        if bool(self.used.any()):
            logits = logits.clone()  # the caller's logits stay as they are (it reads its log-probs from them)
            logits[:, b.think_start_id].masked_fill_(self.used, float("-inf"))
        token = sample(logits)
        trigger = self.in_think & ~self.used & (self.count >= b.budget)
        self.forced_pos = torch.where(trigger, torch.zeros_like(self.forced_pos), self.forced_pos)
        self.used |= trigger
        forcing = self.forced_pos < self.n_forced
        token = torch.where(forcing, self.forced_seq[self.forced_pos.clamp(max=self.n_forced - 1)], token)
        closes = token == b.think_end_id
        self.count += (self.in_think & ~closes & ~forcing).long()
        self.in_think = torch.where(token == b.think_start_id, True, torch.where(closes, False, self.in_think))
        self.forced_pos += forcing.long()

        self.forced[self.rows, self.t] = forcing
        rows = self.rows if live is None else self.rows[live]
        self.thinking_tokens[rows] = self.count if live is None else self.count[live]
        self.budget_hit[rows] = self.used if live is None else self.used[live]
        self.t += 1
        return token, forcing

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the slots `index` (in that order), as the engine does when it drops finished rows."""
        self.rows, self.in_think, self.count, self.used, self.forced_pos = (
            self.rows[index], self.in_think[index], self.count[index], self.used[index], self.forced_pos[index]
        )
