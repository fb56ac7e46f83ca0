"""The reward model: the Bradley–Terry loss against TRL 1.16's `RewardTrainer.compute_loss`, and the
scalar-head Qwen3 reward model (pooling, padding, save/load) against transformers'
`Qwen3ForSequenceClassification`.

TRL computes the loss inside an instance method; as in TRL's own tests, the trainer is made with
`object.__new__` and given only the attributes `compute_loss` reads. Its `model` is a stand-in that
returns given rewards as `logits` [2B, 1] (chosen rows first, as TRL's collator stacks them), so the
loss comes out of TRL's own code; values and gradients (w.r.t. the rewards) must agree exactly.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwen3repro.losses import bradley_terry_loss


def _reward_trainer_class():
    try:
        from trl import RewardTrainer
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"TRL is not importable ({type(exc).__name__}: {exc}); install the dev extra (trl==1.16.0)")
    return RewardTrainer


def _reward_trainer(center_coefficient: float | None):
    """A RewardTrainer whose `compute_loss(model, inputs)` runs on one process, in training mode."""
    ident = lambda x: x  # noqa: E731
    tr = object.__new__(_reward_trainer_class())
    tr.accelerator = SimpleNamespace(gather=ident, gather_for_metrics=ident)
    tr.args = SimpleNamespace(center_rewards_coefficient=center_coefficient)
    tr.model = SimpleNamespace(training=True)
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._total_train_tokens = 0
    tr._tp_size = 1
    return tr


def _trl_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin, center_coefficient):
    """TRL's loss of rewards (chosen, rejected), through `RewardTrainer.compute_loss`."""
    logits = torch.cat([chosen, rejected])[:, None]
    trainer = _reward_trainer(center_coefficient)
    inputs = {"input_ids": torch.zeros(logits.shape[0], 1, dtype=torch.long),
              "attention_mask": torch.ones(logits.shape[0], 1, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return trainer.compute_loss(lambda **inputs: SimpleNamespace(logits=logits), inputs)


_REWARD = st.floats(-30.0, 30.0, allow_nan=False, width=32)


@st.composite
def _pairs(draw):
    n = draw(st.integers(1, 9))
    chosen = draw(st.lists(_REWARD, min_size=n, max_size=n))
    rejected = draw(st.lists(_REWARD, min_size=n, max_size=n))
    margin = draw(st.one_of(st.none(), st.lists(st.floats(0.0, 5.0, width=32), min_size=n, max_size=n)))
    center = draw(st.one_of(st.none(), st.sampled_from([0.0, 0.01, 0.5])))
    return chosen, rejected, margin, center


@settings(max_examples=150, deadline=None)
@given(_pairs())
@example(([0.0], [0.0], None, None))  # log 2
@example(([1.0, -2.0], [1.0, -2.0], [0.5, 0.5], 0.01))  # ties, with margin and centring
@example(([30.0], [-30.0], None, 0.5))  # saturated sigmoid
def test_bradley_terry_loss_equals_trl_value_and_gradient(case):
    chosen, rejected, margin, center = case
    ours_c, ours_r = (torch.tensor(v, requires_grad=True) for v in (chosen, rejected))
    trl_c, trl_r = (torch.tensor(v, requires_grad=True) for v in (chosen, rejected))
    margin_t = None if margin is None else torch.tensor(margin)
    ours = bradley_terry_loss(ours_c, ours_r, margin=margin_t, center_coefficient=center)
    theirs = _trl_loss(trl_c, trl_r, margin_t, center)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_c.grad, trl_c.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours_r.grad, trl_r.grad, rtol=0, atol=0)


def test_bradley_terry_loss_known_values():
    """log 2 at a tie; the margin shifts the difference; centring squares the pair's *sum*."""
    zero = torch.zeros(3)
    assert bradley_terry_loss(zero, zero).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    c, r = torch.tensor([2.0]), torch.tensor([1.0])
    assert bradley_terry_loss(c, r, margin=1.0).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    centred = bradley_terry_loss(c, r, center_coefficient=0.1) - bradley_terry_loss(c, r)
    assert centred.item() == pytest.approx(0.1 * 3.0**2)


def test_bradley_terry_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"chosen_rewards \(3,\) and rejected_rewards \(2,\)"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
