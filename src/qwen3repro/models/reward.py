"""A scalar reward model on the Qwen3 decoder, trained on preference pairs with the Bradley–Terry loss
(`losses.bradley_terry_loss`).

Head. `score = Linear(hidden, 1, bias=False)` on the final-norm hidden states, named as in
transformers' `Qwen3ForSequenceClassification` (`Qwen3MoeForSequenceClassification`) with
`num_labels=1`, so a saved directory loads there as it is: `model.*` backbone tensors and
`score.weight` [1, H], no `lm_head`.

Pooling. The reward of a row is the head's output at the row's last attended token, found from the
attention mask (index L−1 − argmax(fliplr(mask))), never from the pad id. transformers takes the
rightmost token whose id is not the pad id; Qwen3 base tokenizers use `<|endoftext|>` as both pad
and eos, so that rule skips a sequence's own final eos and scores the token before it. With the
mask, left padding, right padding and pad == eos all score the same token. Position ids default to
the count of attended tokens before each token (cumsum(mask) − 1), so a left-padded row gets the
positions it has unpadded (RoPE sees only position differences, so a shift would change the scores
by rounding alone); right padding and no padding give transformers' default (arange), which is where
the two agree.

Scored sequences should end with one fixed delimiter (the chat template's `<|im_end|>`), so that
the pooled token is the same kind of token in every row.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..config import ModelConfig
from . import hf
from .qwen3 import Qwen3, Qwen3Decoder


def last_attended_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """The index [B] of each row's last token whose mask is 1 (left or right padding alike).

    A row with no attended token has no reward; it is an error rather than a score of padding.
    """
    mask = attention_mask.to(torch.bool)
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} attend no token; a reward needs at least one")
    return mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)


class Qwen3RewardModel(Qwen3Decoder):
    """Qwen3 decoder + scalar head. `forward(input_ids, attention_mask) -> rewards [B]` (float32)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        self.reset_parameters()

    @classmethod
    def from_causal_lm(cls, lm: Qwen3) -> "Qwen3RewardModel":
        """A reward model with `lm`'s backbone (copied) and a freshly initialised head, normal(0,
        initializer_range) as transformers initialises `score`; the usual start of reward-model
        training is the policy's SFT checkpoint."""
        p = lm.model.embed_tokens.weight
        with torch.device(p.device):
            model = cls(lm.config).to(p.dtype)
        model.model.load_state_dict(lm.model.state_dict())
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards [B] of input_ids [B, S] (attention_mask [B, S], 1 = real token, 0 = padding).

        position_ids [B, S] default to cumsum(mask) − 1 (arange(S) without a mask).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; input_ids have "
                             f"{tuple(input_ids.shape)}")
        last = last_attended_index(attention_mask)
        if position_ids is None:
            position_ids = (attention_mask.to(torch.long).cumsum(dim=1) - 1).clamp(min=0)
        hidden, _ = self.final_hidden_states(input_ids, position_ids=position_ids, attention_mask=attention_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(pooled).squeeze(-1).float()

    def save_pretrained(
        self, path: str | os.PathLike, max_shard_size: int | str = "5GB", *, pad_token_id: int | None = None
    ) -> None:
        """Write the Hugging Face layout of a one-label sequence classifier (see hf.py).

        pad_token_id goes into config.json for transformers, which needs it to score a padded batch
        (this model pools by the attention mask and does not read it).
        """
        architecture = self.config.to_hf_dict()["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
        updates = {"architectures": [architecture], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
        if pad_token_id is not None:
            updates["pad_token_id"] = pad_token_id
        hf.save_pretrained(self, path, max_shard_size=max_shard_size, config_updates=updates)


__all__ = ["Qwen3RewardModel", "last_attended_index"]
