"""Peer tests: `losses.grpo_loss` and `losses.group_advantages` against TRL 1.16's GRPOTrainer.

TRL's `_compute_loss` is an instance method; following TRL's own tests, the trainer object is made
with `object.__new__` and given only the attributes the method reads, and the model call
(`_get_per_token_logps_and_entropies`) is replaced by one that returns our policy log-probs. Loss
values *and gradients* (w.r.t. the policy log-probs) must agree: on-policy the loss is ≈ 0 while its
gradient is not. Inputs (log-probs, old/ref log-probs, advantages, masks) come from Hypothesis.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.losses import group_advantages, grpo_loss

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _trl():
    try:
        from trl import GRPOTrainer
        from trl.trainer.utils import nanstd
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"TRL is not importable ({type(exc).__name__}: {exc}); install the dev extra (trl==1.16.0)")
    return GRPOTrainer, nanstd


def _trainer(loss_type, eps_low, eps_high, beta, max_completion_length, policy_logps):
    GRPOTrainer, _ = _trl()
    tr = object.__new__(GRPOTrainer)
    ident = lambda x: x  # noqa: E731
    tr.accelerator = SimpleNamespace(
        num_processes=1, gather=ident, reduce=lambda x, reduction: x,
        pad_across_processes=lambda x, dim, pad_index: x, gather_for_metrics=ident, sync_gradients=True,
    )
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr.model = SimpleNamespace(training=True)
    tr.args = SimpleNamespace(
        use_bias_correction_kl=True, delta=None, steps_per_generation=1,
    )
    tr.loss_type = loss_type
    tr.epsilon_low, tr.epsilon_high = eps_low, eps_high
    tr.beta = beta
    tr.max_completion_length = max_completion_length
    tr.importance_sampling_level = "token"
    tr.top_entropy_quantile = 1.0
    tr.off_policy_mask_threshold = None
    tr.use_vllm = False
    tr.vllm_importance_sampling_correction = False
    tr._entropy_bonus_enabled = False
    tr.aux_loss_enabled = False
    tr.current_gradient_accumulation_steps = 1
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (policy_logps, torch.zeros_like(policy_logps), None)
    return tr


@st.composite
def batches(draw):
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    # Old and reference log-probs near the policy's, so some ratios fall inside and some outside the clip range.
    old = logps + torch.randn(b, t, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.0, 0.1, 0.5]))
    ref = logps + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.tensor(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    on_policy = draw(st.booleans())
    return logps, (None if on_policy else old), ref, adv, mask


@settings(max_examples=20)
@given(
    batch=batches(),
    loss_type=st.sampled_from(LOSS_TYPES),
    beta=st.sampled_from([0.0, 0.04]),
    eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)]),
)
def test_grpo_loss_equals_trl(batch, loss_type, beta, eps):
    logps, old, ref, adv, mask = batch
    eps_low, eps_high = eps
    max_len = logps.shape[1] + 3  # dr_grpo's constant differs from the padded width on purpose

    ours_in = logps.clone().requires_grad_(True)
    ours = grpo_loss(
        ours_in, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, beta=beta,
        ref_logps=ref if beta else None, max_completion_length=max_len,
    )
    (g_ours,) = torch.autograd.grad(ours, ours_in)

    trl_in = logps.clone().requires_grad_(True)
    tr = _trainer(loss_type, eps_low, eps_high, beta, max_len, trl_in)
    b, t = logps.shape
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": mask.sum().to(torch.float64),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    theirs = tr._compute_loss(None, inputs)
    (g_theirs,) = torch.autograd.grad(theirs, trl_in, allow_unused=False)

    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=0)


def test_on_policy_loss_is_zero_but_gradient_is_not():
    torch.manual_seed(0)
    logps = (-torch.rand(4, 6)).requires_grad_(True)
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 4)
    loss = grpo_loss(logps, None, adv, torch.ones(4, 6), loss_type="dapo")
    (grad,) = torch.autograd.grad(loss, logps)
    assert abs(loss.item()) < 1e-6 and grad.abs().sum() > 0


@settings(max_examples=30)
@given(
    groups=st.integers(1, 4),
    size=st.integers(1, 6),
    values=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 3.0]), min_size=24, max_size=24),
    scale=st.sampled_from(["group", "batch", "none"]),
)
def test_group_advantages_equal_trl_formula(groups, size, values, scale):
    _, nanstd = _trl()
    rewards = torch.tensor(values[: groups * size])
    mean = rewards.view(-1, size).mean(dim=1).repeat_interleave(size)
    expected = rewards - mean
    if scale == "group":
        std = nanstd(rewards.view(-1, size), dim=1).repeat_interleave(size) if size > 1 else torch.zeros_like(rewards)
        expected = expected / (std + 1e-4)
    elif scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        expected = expected / (std + 1e-4)
    expected = torch.nan_to_num(expected, nan=0.0)
    torch.testing.assert_close(group_advantages(rewards, size, scale), expected, atol=1e-6, rtol=1e-6)
    if size > 1:  # Bessel's correction: the same as torch.std(unbiased=True)
        torch.testing.assert_close(
            nanstd(rewards.view(-1, size), dim=1), rewards.view(-1, size).std(dim=1, unbiased=True)
        )


def test_group_advantages_ignore_missing_rewards():
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    a = group_advantages(r, 4)
    assert a[1] == 0.0
    kept = torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(a[[0, 2, 3]], group_advantages(kept, 3))


def test_bad_arguments():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 2, scale="std")
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3), loss_type="ppo")
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3), beta=0.1)
