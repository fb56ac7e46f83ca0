"""A reward from a Bradley–Terry reward model (`models.reward.Qwen3RewardModel`): the reward of general
RL for tasks that neither a rule nor a reference answer can check (Qwen3 report §4.4).

    scorer = RewardModelScorer.load("runs/tiny/flagship/reward-model")
    scorer.score(prompt, completion)                      # the raw reward, a float
    scorer.score_many([(prompt, completion), ...])        # batched
    configure_reward_model(scorer)                        # the default of the "reward_model" reward
    get_reward("reward_model")(completion, question=prompt)   # RewardResult(sigmoid(raw), "raw ...")

What is scored. One sequence per (prompt, completion): the chat rendering of the user turn with the
generation prompt (thinking mode, exactly what the policy was prompted with), then the completion as
the policy wrote it, cut at its first end-of-turn token, then one fixed delimiter `<|im_end|>`
(`scored_text`). For a well-formed completion this is the chat template's rendering of
[user, assistant] up to the assistant's `<|im_end|>`; a malformed one (no `</think>`, two think
blocks) is kept verbatim instead of being re-rendered into a well-formed turn, so the model sees the
malformation it is meant to punish. The model pools the last attended token, which is therefore
always that delimiter.

Batches. `score_many` pads rows (right by default, left on request, with the tokenizer's pad id or any
other, the eos included) and reads the mask, so a row scores what it scores alone. A sequence longer
than `max_len` tokens keeps its last `max_len` tokens: the answer and the delimiter, which decide the
reward, survive; the start of a long prompt does not.

The reward "reward_model" is sigmoid(raw) in (0, 1), the Bradley–Terry probability that the
completion beats one scored 0, with the raw score in the reason. Without a scorer (none passed, none
configured) it is "no reward", never a crash.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import torch

from ..chat import END_OF_TURN_TOKENS, render
from ..models.reward import Qwen3RewardModel
from ..tokenizer import Tokenizer
from .registry import RewardResult, register

__all__ = ["DELIMITER", "DEFAULT_MAX_LEN", "RewardModelScorer", "configure_reward_model", "pad_rows",
           "reward_model_reward", "scored_text"]

DELIMITER = "<|im_end|>"
"""The token every scored sequence ends with, where the reward is read."""
DEFAULT_MAX_LEN = 1024
"""TRL's `RewardConfig.max_length`."""
PADDING_SIDES = ("right", "left")


def scored_text(prompt: str, completion: str) -> str:
    """The text the reward model scores for `completion` (the assistant's output) to the user `prompt`."""
    cuts = [completion.find(t) for t in END_OF_TURN_TOKENS if t in completion]
    if cuts:
        completion = completion[: min(cuts)]
    head = render([{"role": "user", "content": prompt}], add_generation_prompt=True, enable_thinking=True)
    return head + completion + DELIMITER


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a reward model; see the module docstring."""

    def __init__(self, model: Qwen3RewardModel, tokenizer: Tokenizer, *, max_len: int = DEFAULT_MAX_LEN,
                 batch_size: int = 16, padding_side: str = "right", pad_id: int | None = None) -> None:
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"RewardModelScorer: padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        for name, value in (("max_len", max_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RewardModelScorer: {name} must be an integer >= 1, got {value!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len, self.batch_size, self.padding_side = max_len, batch_size, padding_side
        self.pad_id = tokenizer.pad_token_id if pad_id is None else int(pad_id)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu",
             **settings) -> "RewardModelScorer":
        """The reward model and tokenizer saved in `directory` (a reward-model stage's output)."""
        model = Qwen3RewardModel.from_pretrained(directory, device=device)
        return cls(model, Tokenizer.load(directory), **settings)

    def encode(self, prompt: str, completion: str) -> list[int]:
        """The token ids scored for one pair (the last `max_len` of them)."""
        return self.tokenizer.encode(scored_text(prompt, completion))[-self.max_len:]

    def score(self, prompt: str, completion: str) -> float:
        """The raw reward of one completion."""
        return self.score_many([(prompt, completion)])[0]

    def score_many(self, pairs: Iterable[tuple[str, str]]) -> list[float]:
        """Raw rewards of (prompt, completion) pairs, in order, `batch_size` sequences per forward."""
        return self.score_ids([self.encode(p, c) for p, c in pairs])

    @torch.inference_mode()
    def score_ids(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """Raw rewards of token rows. Rows are batched by length (less padding); the order is kept."""
        if any(len(r) == 0 for r in rows):
            raise ValueError("RewardModelScorer: a row has no tokens")
        device = next(self.model.parameters()).device
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        scores: list[float] = [math.nan] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            ids, mask = pad_rows([rows[i] for i in chunk], self.pad_id, self.padding_side)
            rewards = self.model(ids.to(device), mask.to(device)).tolist()
            for i, r in zip(chunk, rewards):
                scores[i] = float(r)
        return scores


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one padded batch: input ids and attention mask (1 = token) [B, max length]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, cols] = torch.tensor(list(row), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


_default_scorer: RewardModelScorer | None = None


def configure_reward_model(scorer: RewardModelScorer | None) -> None:
    """Set (None: unset) the scorer `reward_model_reward` uses when the call passes none."""
    global _default_scorer
    _default_scorer = scorer


@register("reward_model")
def reward_model_reward(completion: str, question: str, scorer: RewardModelScorer | None = None) -> RewardResult:
    """sigmoid(the reward model's raw score) of `completion` to the user prompt `question`."""
    scorer = scorer if scorer is not None else _default_scorer
    if scorer is None:
        return RewardResult(None, "no reward model configured")
    if not isinstance(completion, str):
        return RewardResult(0.0, "not text")
    raw = scorer.score(question, completion)
    if not math.isfinite(raw):
        return RewardResult(None, f"reward model: non-finite raw score {raw}")
    return RewardResult(1.0 / (1.0 + math.exp(-raw)) if raw >= 0 else math.exp(raw) / (1.0 + math.exp(raw)),
                        f"reward model: raw {raw:+.4f}")

