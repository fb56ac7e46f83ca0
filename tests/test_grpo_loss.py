"""Peer tests: `losses.group_advantages` and `losses.grpo_loss` against TRL 1.16's GRPOTrainer.

TRL computes both inside instance methods of `GRPOTrainer`; following TRL's own tests, the trainer
object is made with `object.__new__` and given only the attributes the method reads:

* advantages: `_generate_and_score_completions`, with generation (`_generate`) and reward scoring
  (`_calculate_rewards`) replaced by stand-ins that return fixed completions and our rewards, so the
  advantages come out of TRL's own normalisation code (one reward function of weight 1, which is
  how our GRPO stage scores: rewards are already summed per completion);
* loss: `_compute_loss`, with the model call (`_get_per_token_logps_and_entropies`) replaced by one
  that returns our policy log-probs. Loss values *and gradients* (w.r.t. the policy log-probs) must
  agree: on-policy the loss is ≈ 0 while its gradient is not.

Every loss type and every advantage scale is a separate test case; the inputs (rewards with ties
and missing values, log-probs, old/ref log-probs, advantages with zeros, masks with empty rows)
come from Hypothesis, with the corner cases pinned as explicit examples.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwen3repro.losses import ADVANTAGE_EPS, ADVANTAGE_SCALES, GRPO_LOSS_TYPES, group_advantages, grpo_loss

NAN = float("nan")


def _grpo_trainer_class():
    try:
        from trl import GRPOTrainer
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"TRL is not importable ({type(exc).__name__}: {exc}); install the dev extra (trl==1.16.0)")
    return GRPOTrainer


def _one_process_accelerator():
    ident = lambda x: x  # noqa: E731
    return SimpleNamespace(
        num_processes=1, process_index=0, device=torch.device("cpu"), gather=ident, gather_for_metrics=ident,
        reduce=lambda x, reduction: x, pad_across_processes=lambda x, dim, pad_index: x, sync_gradients=True,
    )


# ----------------------------------------------------------------------------- advantages
def _scoring_trainer(rewards: torch.Tensor, group_size: int, scale: str):
    """A GRPOTrainer whose `_generate_and_score_completions` scores one-token completions with `rewards`."""
    n = rewards.numel()
    tr = object.__new__(_grpo_trainer_class())
    tr.accelerator = _one_process_accelerator()
    tr.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    tr.args = SimpleNamespace(
        steps_per_generation=1, gradient_accumulation_steps=1, per_device_train_batch_size=n,
        gradient_checkpointing_kwargs=None,
    )
    tr.num_iterations = 1
    tr.environment_factories = tr.environments = tr.tools = None
    tr.pad_to_multiple_of = None
    tr.mask_truncated_completions = False
    tr._tokenizer = SimpleNamespace(pad_token_id=0)
    tr.use_vllm = tr.vllm_importance_sampling_correction = False
    tr.beta = 0.0
    tr.num_generations = group_size
    tr.multi_objective_aggregation = "sum_then_normalize"
    tr.reward_weights = torch.ones(1)
    tr.reward_func_names = ["reward"]
    tr.scale_rewards = scale
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._logs = {"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
                "extra": defaultdict(list), "images": []}
    tr._pending_extra_logs, tr._pending_metrics = {}, {}
    tr.log_multimodal = False
    # (prompt ids, completion ids, tool mask, completion texts, sampling log-probs, extra fields, images, tool images)
    tr._generate = lambda prompts: ([[1]] * n, [[2]] * n, None, ["c"] * n, None, {}, None, None)
    tr._calculate_rewards = lambda inputs, prompts, completions, ids: rewards[:, None].clone()
    return tr


def trl_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    tr = _scoring_trainer(rewards, group_size, scale)
    out = tr._generate_and_score_completions([{"prompt": "p"}] * rewards.numel())
    return out["advantages"]


@st.composite
def grouped_rewards(draw):
    """Rewards [groups·size] from a small set of values: ties (all-equal groups) and NaN ("no reward") are common."""
    groups = draw(st.integers(1, 4))
    size = draw(st.integers(1, 6))
    values = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 3.0, NAN]),
                           min_size=groups * size, max_size=groups * size))
    return torch.tensor(values, dtype=torch.float32), size


@pytest.mark.parametrize("scale", ADVANTAGE_SCALES)
@settings(max_examples=25)
@given(batch=grouped_rewards())
@example(batch=(torch.tensor([1.0, 1.0, 1.0, 1.0]), 4))  # one tied group: no signal
@example(batch=(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5]), 3))  # a tied group beside a live one
@example(batch=(torch.tensor([1.0, NAN, 0.0, NAN]), 2))  # a group with one scored completion: its std is NaN
@example(batch=(torch.tensor([NAN, NAN, 0.0, 1.0]), 2))  # a group with no reward at all
@example(batch=(torch.tensor([0.5, 2.0]), 1))  # groups of one
@example(batch=(torch.tensor([3.0]), 1))  # a single completion
def test_group_advantages_equal_trl(scale, batch):
    rewards, size = batch
    ours = group_advantages(rewards.clone(), size, scale)
    theirs = trl_advantages(rewards, size, scale)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@settings(max_examples=30)
@given(batch=grouped_rewards())
def test_group_scaled_advantages_are_centred_with_unit_std(batch):
    """Per group of size > 1: advantages over the scored completions sum to 0, and their sample std is
    std/(std + ε) (≈ 1 unless the group is tied, 0 when it is); missing rewards get 0."""
    rewards, size = batch
    adv = group_advantages(rewards, size, "group").view(-1, size).double()
    r = rewards.view(-1, size).double()
    for a_g, r_g in zip(adv, r):
        scored = ~torch.isnan(r_g)
        assert torch.all(a_g[~scored] == 0)
        if scored.sum() < 2:
            assert torch.all(a_g == 0)  # no std from fewer than two rewards: no signal
            continue
        assert abs(float(a_g[scored].sum())) < 1e-5
        std = float(r_g[scored].std(unbiased=True))
        expected = std / (std + ADVANTAGE_EPS)
        assert float(a_g[scored].std(unbiased=True)) == pytest.approx(expected, abs=1e-5)


def test_group_advantages_ignore_missing_rewards():
    r = torch.tensor([1.0, NAN, 0.0, 1.0])
    a = group_advantages(r, 4)
    assert a[1] == 0.0
    kept = torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(a[[0, 2, 3]], group_advantages(kept, 3))


# ----------------------------------------------------------------------------- loss
def _loss_trainer(loss_type, eps_low, eps_high, beta, max_completion_length, policy_logps):
    tr = object.__new__(_grpo_trainer_class())
    tr.accelerator = _one_process_accelerator()
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr.model = SimpleNamespace(training=True)
    tr.args = SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1)
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


def make_batch(b, t, seed, old_noise, lengths, zero_adv, on_policy):
    """Policy/old/ref log-probs [b, t], advantages [b] (zero where `zero_adv`), mask from `lengths`."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    # Old and reference log-probs near the policy's, so some ratios fall inside and some outside the clip range
    # (old_noise = 0: every ratio is exactly 1, on the clip range's inside).
    old = logps + torch.randn(b, t, generator=g, dtype=torch.float64) * old_noise
    ref = logps + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(b, generator=g, dtype=torch.float64).masked_fill(torch.tensor(zero_adv), 0.0)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
    return logps, (None if on_policy else old), ref, adv, mask


@st.composite
def loss_batches(draw):
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 7))
    return make_batch(
        b, t,
        seed=draw(st.integers(0, 2**31 - 1)),
        old_noise=draw(st.sampled_from([0.0, 0.1, 0.5])),
        lengths=draw(st.lists(st.integers(0, t), min_size=b, max_size=b)),  # 0: an empty row
        zero_adv=draw(st.lists(st.booleans(), min_size=b, max_size=b)),  # a tied group's advantage is 0
        on_policy=draw(st.booleans()),
    )


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@settings(max_examples=25)
@given(
    batch=loss_batches(),
    beta=st.sampled_from([0.0, 0.04]),
    eps=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.3)]),
    extra_items=st.integers(0, 9),
    extra_length=st.integers(0, 3),
)
@example(batch=make_batch(3, 4, 1, 0.5, [0, 0, 0], [False] * 3, False), beta=0.04, eps=(0.2, 0.28),
         extra_items=0, extra_length=0)  # every row empty
@example(batch=make_batch(3, 5, 2, 0.5, [5, 0, 2], [False] * 3, False), beta=0.04, eps=(0.2, 0.2),
         extra_items=3, extra_length=2)  # one empty row
@example(batch=make_batch(2, 3, 3, 0.0, [3, 1], [True, True], True), beta=0.0, eps=(0.2, 0.2),
         extra_items=0, extra_length=0)  # tied groups only: zero advantages on-policy
def test_grpo_loss_equals_trl(loss_type, batch, beta, eps, extra_items, extra_length):
    logps, old, ref, adv, mask = batch
    eps_low, eps_high = eps
    max_len = logps.shape[1] + extra_length  # dr_grpo's constant may exceed the padded width
    # dapo's normaliser counts the active tokens of the whole generation batch, of which this may be a part
    num_items = mask.sum().to(torch.float64) + extra_items

    ours_in = logps.clone().requires_grad_(True)
    ours = grpo_loss(
        ours_in, old, adv, mask, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, beta=beta,
        ref_logps=ref if beta else None, max_completion_length=max_len, num_items=num_items,
    )
    (g_ours,) = torch.autograd.grad(ours, ours_in)

    trl_in = logps.clone().requires_grad_(True)
    tr = _loss_trainer(loss_type, eps_low, eps_high, beta, max_len, trl_in)
    b, t = logps.shape
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "num_items_in_batch": num_items,
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    theirs = tr._compute_loss(None, inputs)
    (g_theirs,) = torch.autograd.grad(theirs, trl_in, allow_unused=False)

    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=0)
    assert torch.all(g_ours[mask == 0] == 0)  # padding never receives gradient


def test_on_policy_loss_is_zero_but_gradient_is_not():
    torch.manual_seed(0)
    logps = (-torch.rand(4, 6)).requires_grad_(True)
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 4)
    loss = grpo_loss(logps, None, adv, torch.ones(4, 6), loss_type="dapo")
    (grad,) = torch.autograd.grad(loss, logps)
    assert abs(loss.item()) < 1e-6 and grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4), 2, scale="std")
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3), loss_type="ppo")
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 3), beta=0.1)
