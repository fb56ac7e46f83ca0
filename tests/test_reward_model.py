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


# ----------------------------------------------------------------------------- the reward model
transformers = pytest.importorskip("transformers")

from qwen3repro.config import ModelConfig  # noqa: E402
from qwen3repro.models.qwen3 import Qwen3  # noqa: E402
from qwen3repro.models.reward import Qwen3RewardModel, last_attended_index  # noqa: E402

ATOL = 1e-5
COMMON = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, rope_theta=10000.0,
              bos_token_id=None, eos_token_id=None)
DENSE = ModelConfig(**COMMON, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                    head_dim=12, tie_word_embeddings=True)
MOE = ModelConfig(**COMMON, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
                  tie_word_embeddings=False)
EOS, PAD = 7, 0  # the delimiter every scored sequence ends with; a pad id distinct from every real token


def _reward_model(config: ModelConfig, seed: int = 0) -> Qwen3RewardModel:
    torch.manual_seed(seed)
    model = Qwen3RewardModel(config).eval()
    with torch.no_grad():  # norms at 1 would hide a mix-up of the norms
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _sequences(lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Random token rows of the given lengths (ids 1..V-1, never PAD), each ending with EOS."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(1, DENSE.vocab_size, (n - 1,), generator=g), torch.tensor([EOS])])
            for n in lengths]


def _pad(rows: list[torch.Tensor], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


def _load_hf(path):
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers reported loading problems: {problems}"
    return model.eval()


@pytest.mark.parametrize("config", [DENSE, MOE], ids=["dense-tied", "moe"])
def test_transformers_loads_the_saved_reward_model_with_the_same_scores(tmp_path, config):
    ours = _reward_model(config)
    ours.save_pretrained(tmp_path, pad_token_id=PAD)
    theirs = _load_hf(tmp_path)
    expected = "Qwen3MoeForSequenceClassification" if config.is_moe else "Qwen3ForSequenceClassification"
    assert type(theirs).__name__ == expected
    assert theirs.config.num_labels == 1
    assert torch.equal(theirs.score.weight, ours.score.weight)
    ids, mask = _pad(_sequences([9, 4, 13], seed=1), PAD, "right")  # where transformers' pad-id rule is right
    with torch.no_grad():
        ours_scores = ours(ids, mask)
        theirs_scores = theirs(input_ids=ids, attention_mask=mask).logits
    assert theirs_scores.shape == (3, 1)
    torch.testing.assert_close(ours_scores, theirs_scores[:, 0], rtol=0, atol=ATOL)
    reloaded = Qwen3RewardModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():  # same weights; tensors read from a file may sit at other alignments (summation order)
        torch.testing.assert_close(reloaded(ids, mask), ours_scores, rtol=0, atol=1e-6)


def test_our_reward_model_loads_a_transformers_sequence_classifier(tmp_path):
    cfg = transformers.Qwen3Config(**DENSE.to_hf_dict() | {"num_labels": 1, "pad_token_id": PAD})
    torch.manual_seed(3)
    theirs = transformers.Qwen3ForSequenceClassification(cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = Qwen3RewardModel.from_pretrained(tmp_path).eval()
    ids, mask = _pad(_sequences([5, 11], seed=2), PAD, "right")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   rtol=0, atol=ATOL)


_PADDING_MODEL = _reward_model(DENSE, seed=5)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_left_right_padding_and_pad_equal_to_eos_give_each_row_its_unpadded_score(lengths, seed):
    rows = _sequences(lengths, seed)
    with torch.no_grad():
        alone = torch.cat([_PADDING_MODEL(r[None]) for r in rows])
        for pad_id in (PAD, EOS):
            for side in ("right", "left"):
                ids, mask = _pad(rows, pad_id, side)
                torch.testing.assert_close(_PADDING_MODEL(ids, mask), alone, rtol=0, atol=ATOL,
                                           msg=f"pad id {pad_id}, {side} padding")


def test_pad_equal_to_eos_misleads_the_pad_id_rule_but_not_the_mask():
    """Why the pooling reads the mask: with pad == eos, transformers scores the token before the final eos."""
    ours = _reward_model(DENSE, seed=6)
    rows = _sequences([6, 3], seed=4)
    ids, mask = _pad(rows, EOS, "right")
    with torch.no_grad():
        alone = torch.cat([ours(r[None]) for r in rows])
        torch.testing.assert_close(ours(ids, mask), alone, rtol=0, atol=ATOL)
        hidden, _ = ours.final_hidden_states(ids, attention_mask=mask)
        rightmost_non_pad = (torch.arange(ids.shape[1]) * (ids != EOS)).argmax(-1)
        pad_id_rule = ours.score(hidden[torch.arange(2), rightmost_non_pad]).squeeze(-1)
    assert rightmost_non_pad.tolist() == [4, 1]
    assert not torch.allclose(pad_id_rule, alone, atol=ATOL)


def test_last_attended_index_and_empty_rows():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1]])
    assert last_attended_index(mask).tolist() == [1, 3, 1, 3]
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] attend no token"):
        last_attended_index(torch.tensor([[1, 0], [0, 0]]))


def test_from_causal_lm_keeps_the_backbone():
    torch.manual_seed(0)
    lm = Qwen3(DENSE).eval()
    rm = Qwen3RewardModel.from_causal_lm(lm).eval()
    assert not hasattr(rm, "lm_head") and rm.score.weight.shape == (1, DENSE.hidden_size)
    ids = _sequences([7], seed=0)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(rm.final_hidden_states(ids)[0], lm.final_hidden_states(ids)[0], rtol=0, atol=0)


def test_trl_loss_on_the_reward_model_and_a_few_steps_separate_the_pairs():
    """TRL's `compute_loss` with our reward model as its model gives our loss and our parameter
    gradients; a few Adam steps on pairs that differ only in one token then rank every pair right."""
    model = _reward_model(DENSE, seed=7).train()
    prefixes = _sequences([5, 8, 3, 6], seed=9)
    chosen = [torch.cat([p[:-1], torch.tensor([11, EOS])]) for p in prefixes]
    rejected = [torch.cat([p[:-1], torch.tensor([12, EOS])]) for p in prefixes]
    ids, mask = _pad(chosen + rejected, EOS, "right")
    trainer = _reward_trainer(0.01)

    def trl_model(**inputs):
        return SimpleNamespace(logits=model(inputs["input_ids"], inputs["attention_mask"])[:, None])

    theirs = trainer.compute_loss(trl_model, {"input_ids": ids, "attention_mask": mask})
    their_grads = torch.autograd.grad(theirs, list(model.parameters()))
    rewards = model(ids, mask)
    ours = bradley_terry_loss(rewards[:4], rewards[4:], center_coefficient=0.01)
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        rewards = model(ids, mask)
        loss = bradley_terry_loss(rewards[:4], rewards[4:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        rewards = model(ids, mask)
    assert bool((rewards[:4] > rewards[4:]).all()), rewards
    assert bradley_terry_loss(rewards[:4], rewards[4:]).item() < theirs.item()


# ----------------------------------------------------------------------------- the scorer and the reward
import math  # noqa: E402

from qwen3repro.chat import render  # noqa: E402
from qwen3repro.rewards import get_reward  # noqa: E402
from qwen3repro.rewards.reward_model import (RewardModelScorer, configure_reward_model, pad_rows,  # noqa: E402
                                             scored_text)
from qwen3repro.tokenizer import train_tokenizer  # noqa: E402

_TEXTS = [f"<think>\nstep {i}: {i}+{i + 1}={2 * i + 1}\n</think>\n\nThe answer is {2 * i + 1}. Tamor lives in Belka."
          for i in range(60)]


@pytest.fixture(scope="module")
def scorer():
    tokenizer = train_tokenizer(_TEXTS, 300)
    model = _reward_model(ModelConfig(**{**DENSE.to_dict(), "vocab_size": tokenizer.vocab_size}), seed=11)
    return RewardModelScorer(model, tokenizer, max_len=64, batch_size=3)


def test_scored_text_is_the_chat_rendering_ending_with_one_delimiter():
    prompt, response = "12+30=", "<think>\n2+0+0=2\n</think>\n\n42"
    text = scored_text(prompt, response)
    rendered = render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    assert text == rendered.removesuffix("\n") and text.endswith("42<|im_end|>")
    # the policy's own end token, or anything after it, is replaced by the one delimiter
    assert scored_text(prompt, response + "<|im_end|>") == text == scored_text(prompt, response + "<|endoftext|>x")
    # a malformed response is scored as written, not re-rendered into a well-formed turn
    assert scored_text(prompt, "42 no think").endswith("<|im_start|>assistant\n42 no think<|im_end|>")


@settings(max_examples=10, deadline=None)
@given(picks=st.lists(st.tuples(st.integers(0, 59), st.integers(0, 59)), min_size=1, max_size=5))
def test_scorer_batches_score_each_pair_as_alone_whatever_the_padding(scorer, picks):
    pairs = [(_TEXTS[a][:20], _TEXTS[b][: 10 + 3 * a]) for a, b in picks]
    alone = [scorer.score_ids([scorer.encode(p, c)])[0] for p, c in pairs]
    eos = scorer.tokenizer.eos_token_id
    for side in ("right", "left"):
        for pad_id in (scorer.tokenizer.pad_token_id, eos):
            other = RewardModelScorer(scorer.model, scorer.tokenizer, max_len=64, batch_size=4, padding_side=side,
                                      pad_id=pad_id)
            torch.testing.assert_close(torch.tensor(other.score_many(pairs)), torch.tensor(alone), rtol=0, atol=ATOL,
                                       msg=f"{side} padding, pad id {pad_id}")


def test_scorer_keeps_the_end_of_a_long_sequence(scorer):
    ids = scorer.encode("a question", " ".join(_TEXTS))
    assert len(ids) == scorer.max_len and ids[-1] == scorer.tokenizer.eos_token_id
    ids, mask = pad_rows([[5, 6, 7], [8]], 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_reward_model_reward_with_and_without_a_scorer(scorer):
    reward = get_reward("reward_model")
    configure_reward_model(None)
    assert reward("<think>\n\n</think>\n\n42", question="12+30=").score is None
    assert "no reward model configured" in reward("42", question="q").reason
    raw = scorer.score("12+30=", "<think>\n\n</think>\n\n42")
    passed = reward("<think>\n\n</think>\n\n42", question="12+30=", scorer=scorer)
    assert passed.score == pytest.approx(1 / (1 + math.exp(-raw)), abs=1e-12) and 0 < passed.score < 1
    assert f"{raw:+.4f}" in passed.reason
    try:
        configure_reward_model(scorer)
        assert reward("<think>\n\n</think>\n\n42", question="12+30=").score == passed.score
    finally:
        configure_reward_model(None)
    assert reward("42", question="q").score is None


def test_scorer_loads_a_saved_reward_model(tmp_path, scorer):
    scorer.model.save_pretrained(tmp_path, pad_token_id=scorer.tokenizer.pad_token_id)
    scorer.tokenizer.save(tmp_path)
    loaded = RewardModelScorer.load(tmp_path, max_len=64)
    pairs = [("12+30=", "<think>\n\n</think>\n\n42"), ("q", _TEXTS[3])]
    torch.testing.assert_close(torch.tensor(loaded.score_many(pairs)), torch.tensor(scorer.score_many(pairs)),
                               rtol=0, atol=1e-6)
