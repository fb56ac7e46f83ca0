"""The distillation losses (qwen3repro.losses) against TRL and against their definitions.

* `generalized_jsd_loss` equals TRL's `GKDTrainer.generalized_jsd_loss` (the peer: value and gradient,
  for the student's and the teacher's logits) for β ∈ {0, 0.3, 0.5, 1} at two temperatures, on
  hypothesis-generated logits and masks;
* JSD(β)/β → KL(P_T‖P_S) as β → 0 and JSD(β)/(1−β) → KL(P_S‖P_T) as β → 1 (the endpoints are the
  plain KLs, not limits of the interior formula: nothing here assumes continuity there);
* `reverse_kl_pg_loss` equals its definition (value and gradient), and its gradient, averaged over
  every token the student could sample weighted by the student's probability, is the gradient of the
  reverse KL: the policy-gradient form optimises what `generalized_jsd_loss(β = 1)` does.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.losses import generalized_jsd_loss, reverse_kl_pg_loss


def _trl_jsd():
    try:
        from trl.experimental.gkd import GKDTrainer
    except Exception as exc:  # noqa: BLE001 - any import failure means the peer is unavailable
        pytest.skip(f"TRL's GKDTrainer is not importable ({type(exc).__name__}: {exc}); install the dev extra")
    return GKDTrainer.generalized_jsd_loss


@st.composite
def logits_and_mask(draw):
    b, t, v = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(b, t, generator=g) < draw(st.sampled_from([0.5, 1.0]))
    return student, teacher, mask


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@settings(max_examples=15)
@given(data=logits_and_mask())
def test_generalized_jsd_equals_trl(beta, temperature, data):
    trl_loss = _trl_jsd()
    student, teacher, mask = data
    ours_s, ours_t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    theirs_s, theirs_t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    ours = generalized_jsd_loss(ours_s, ours_t, mask, beta=beta, temperature=temperature)
    labels = torch.where(mask, 0, -100)
    theirs = trl_loss(theirs_s, theirs_t, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_s.grad, theirs_s.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_t.grad, theirs_t.grad, rtol=1e-4, atol=1e-6)


def _kl(p_logits, q_logits):
    """KL(p‖q) per position, in float64, straight from the definition Σ p·log(p/q)."""
    p, q = torch.softmax(p_logits.double(), -1), torch.softmax(q_logits.double(), -1)
    return (p * (p / q).log()).sum(-1)


@settings(max_examples=20)
@given(data=logits_and_mask(), temperature=st.sampled_from([1.0, 0.5, 2.0]))
def test_endpoints_are_the_two_kls_and_the_interior_tends_to_them(data, temperature):
    student, teacher, _ = data
    s, t = student / temperature, teacher / temperature
    forward, reverse = _kl(t, s).mean(), _kl(s, t).mean()
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=0.0, temperature=temperature).double(),
                               forward, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(generalized_jsd_loss(student, teacher, beta=1.0, temperature=temperature).double(),
                               reverse, rtol=1e-5, atol=1e-7)
    # Near the endpoints the interior is ~β·KL(P_T‖P_S) and ~(1−β)·KL(P_S‖P_T): the next term is of order
    # β·max(P_T/P_S) (resp. (1−β)·max(P_S/P_T)), so β is taken that much closer to the endpoint.
    # (Distributions so far apart that this needs β within 1e-12 of an endpoint are beyond float64.)
    p_s, p_t = torch.softmax(s, -1), torch.softmax(t, -1)
    for eps, beta_at, kl in ((1e-4 / float((p_t / p_s).max()), lambda e: e, forward),
                             (1e-4 / float((p_s / p_t).max()), lambda e: 1 - e, reverse)):
        if eps >= 1e-12:
            near = generalized_jsd_loss(student, teacher, beta=beta_at(eps), temperature=temperature) / eps
            torch.testing.assert_close(near, kl, rtol=1e-2, atol=1e-6)
    # ...and the interior itself is not the endpoint's value: the loss is discontinuous there.
    if forward > 1e-3:
        assert generalized_jsd_loss(student, teacher, beta=1e-3, temperature=temperature) < 0.5 * forward


def test_jsd_masking_and_bad_input():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per_position = _kl(s, t)
    torch.testing.assert_close(generalized_jsd_loss(s, t, mask, beta=1.0).double(), per_position[mask].mean())
    assert generalized_jsd_loss(s, t, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="vocabulary"):
        generalized_jsd_loss(s, torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        generalized_jsd_loss(s, t, torch.ones(3, 2, dtype=torch.bool))


@settings(max_examples=30)
@given(data=logits_and_mask())
def test_reverse_kl_pg_loss_equals_its_definition(data):
    student, teacher, mask = data
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, student.shape[-1], student.shape[:2], generator=g)
    logp = torch.log_softmax(student, -1).gather(-1, tokens[..., None])[..., 0].detach().requires_grad_()
    teacher_logp = torch.log_softmax(teacher, -1).gather(-1, tokens[..., None])[..., 0]
    old = logp.detach() + 0.1 * torch.randn(logp.shape, generator=g, dtype=logp.dtype)
    loss = reverse_kl_pg_loss(logp, teacher_logp, mask, old)
    m = mask.double()
    advantage = -(logp.detach() - teacher_logp)
    ratio = torch.exp(logp.detach() - old)
    n = m.sum().clamp(min=1)
    torch.testing.assert_close(loss.double(), -(ratio * advantage * m).sum() / n)
    loss.backward()
    torch.testing.assert_close(logp.grad.double(), -(ratio * advantage * m) / n)  # d(ρ·A)/dlogp = ρ·A


@settings(max_examples=20)
@given(v=st.integers(2, 10), seed=st.integers(0, 2**16))
def test_reverse_kl_pg_gradient_is_the_reverse_kl_gradient_in_expectation(v, seed):
    # One position, every token the student could sample: Σ_y p_S(y)·∇L(y) = ∇KL(p_S‖p_T) exactly.
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(1, 1, v, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(1, 1, v, generator=g, dtype=torch.float64)
    probs = torch.softmax(student.detach(), -1)[0, 0]
    expected = torch.zeros_like(student)
    for y in range(v):
        logp = torch.log_softmax(student, -1)[..., y]
        loss = reverse_kl_pg_loss(logp, torch.log_softmax(teacher, -1)[..., y], torch.ones(1, 1))
        (grad,) = torch.autograd.grad(loss, student)
        expected += probs[y] * grad
    (kl_grad,) = torch.autograd.grad(generalized_jsd_loss(student, teacher, beta=1.0), student)
    torch.testing.assert_close(expected, kl_grad.to(expected.dtype), rtol=1e-6, atol=1e-9)
