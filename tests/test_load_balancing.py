"""The MoE load-balancing loss (`losses.load_balancing_loss`, `losses.ExpertCounts`): both scopes and
both layer settings against their definitions written out here, the micro scope against transformers'
`load_balancing_loss_func`, the global scope over gradient accumulation against the loss on the
concatenated batch (values and gradients), and the pretraining stage's MoE branch through the trainer."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.config import ConfigError, ModelConfig
from qwen3repro.losses import LBL_LAYERS, ExpertCounts, load_balancing_loss
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.stages.pretrain import PretrainConfig, PretrainLoss, pretrain_loss
from qwen3repro.train.loop import TrainConfig, train


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lbl_by_definition(layer_logits, num_experts, top_k, mask=None, layers="per_layer"):
    """E·Σ_i f_i·P_i over all the given rows, per layer (then the mean) or pooled over layers.
    f_i: share of the (unmasked) rows that select expert i; P_i: mean router probability."""
    mask = torch.ones(layer_logits[0].shape[0]) if mask is None else mask.reshape(-1).float()
    groups = [[lg] for lg in layer_logits] if layers == "per_layer" else [list(layer_logits)]
    values = []
    for group in groups:
        probs = torch.cat([lg.float().softmax(-1) for lg in group])
        weight = mask.repeat(len(group))
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).float()
        f = (chosen * weight[:, None]).sum(0) / weight.sum()
        p = (probs * weight[:, None]).sum(0) / weight.sum()
        values.append(num_experts * (f * p).sum())
    return torch.stack(values).mean()


@st.composite
def router_batches(draw, max_layers=3):
    layers = draw(st.integers(1, max_layers))
    batch, seq = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    experts = draw(st.integers(2, 12))
    k = draw(st.integers(1, experts))
    seed = draw(st.integers(0, 2**16))
    logits = tuple(torch.randn(batch * seq, experts, generator=_gen(seed + i)) * 2 for i in range(layers))
    mask = (torch.rand(batch, seq, generator=_gen(seed + 99)) > 0.3).long()
    mask[:, -1] = 1  # at least one real token per row
    return logits, experts, k, mask


# ----------------------------------------------------------------------------- definitions and peer
@given(router_batches(), st.booleans(), st.sampled_from(LBL_LAYERS), st.sampled_from(["micro", "global"]))
def test_one_micro_batch_is_the_definition(batch, use_mask, layers, scope):
    """With one micro-batch that holds the step both scopes are E·Σ f_i P_i of its rows."""
    logits, experts, k, mask = batch
    mask = mask if use_mask else None
    got = load_balancing_loss(logits, experts, k, mask, scope=scope, layers=layers)
    assert got.item() == pytest.approx(lbl_by_definition(logits, experts, k, mask, layers).item(), rel=1e-5, abs=1e-6)


@given(router_batches(), st.booleans())
def test_micro_scope_pooled_matches_transformers(batch, use_mask):
    moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    logits, experts, k, mask = batch
    mask = mask if use_mask else None
    ref = moe.load_balancing_loss_func(logits, experts, k, mask)
    got = load_balancing_loss(logits, experts, k, mask, scope="micro", layers="pooled")
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


@given(router_batches(), st.integers(1, 4), st.sampled_from(LBL_LAYERS), st.integers(0, 2**16))
def test_micro_scope_is_the_mean_over_micro_batches_and_global_the_whole(batch, m, layers, seed):
    logits, experts, k, _ = batch
    logits = tuple(torch.cat([lg] * m) + torch.randn(m * lg.shape[0], experts, generator=_gen(seed)) for lg in logits)
    n = logits[0].shape[0] // m
    parts = [[lg[j * n:(j + 1) * n] for lg in logits] for j in range(m)]
    micro = load_balancing_loss(logits, experts, k, scope="micro", layers=layers, micro_batches=m)
    want = torch.stack([lbl_by_definition(part, experts, k, layers=layers) for part in parts]).mean()
    assert micro.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    # the global scope counts all of the call's micro-batches together: the split only orders the sums
    glob = load_balancing_loss(logits, experts, k, scope="global", layers=layers, micro_batches=m)
    assert glob.item() == pytest.approx(lbl_by_definition(logits, experts, k, layers=layers).item(), rel=1e-5, abs=1e-6)


@given(router_batches(), st.sampled_from(["micro", "global"]))
def test_per_layer_is_the_mean_of_each_layer_alone(batch, scope):
    logits, experts, k, mask = batch
    per_layer = load_balancing_loss(logits, experts, k, mask, scope=scope, layers="per_layer")
    alone = [load_balancing_loss([lg], experts, k, mask, scope=scope, layers="pooled") for lg in logits]
    assert per_layer.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5, abs=1e-6)


def test_pooling_hides_layers_that_are_each_imbalanced():
    """Layer 0 routes every token to experts {0, 1}, layer 1 to {2, 3}: pooled, the four experts look
    evenly used (the uniform value k); per layer, each layer is at its worst (E/k times k = E)."""
    e, k, tokens = 4, 2, 64
    layer0 = torch.tensor([20.0, 20.0, 0.0, 0.0]).repeat(tokens, 1)
    layer1 = torch.tensor([0.0, 0.0, 20.0, 20.0]).repeat(tokens, 1)
    pooled = load_balancing_loss([layer0, layer1], e, k, scope="micro", layers="pooled")
    per_layer = load_balancing_loss([layer0, layer1], e, k, scope="micro", layers="per_layer")
    assert pooled.item() == pytest.approx(k, rel=1e-6)
    assert per_layer.item() == pytest.approx(e, rel=1e-6)


@pytest.mark.parametrize("layers", LBL_LAYERS)
def test_uniform_routing_gives_k(layers):
    logits = (torch.zeros(8, 4), torch.zeros(8, 4))
    # ties broken by topk: every token picks the same 2 experts, but P is uniform: E * sum f_i/E = k
    assert load_balancing_loss(logits, 4, 2, layers=layers).item() == pytest.approx(2.0)


# ----------------------------------------------------------------------------- global scope over a step
@settings(max_examples=60, deadline=None)
@given(
    micro=st.integers(1, 4),
    layers=st.integers(1, 3),
    rows=st.integers(1, 12),
    experts=st.integers(2, 10),
    data=st.data(),
    masked=st.booleans(),
    layer_setting=st.sampled_from(LBL_LAYERS),
    seed=st.integers(0, 2**16),
)
def test_global_scope_over_accumulated_micro_batches_equals_the_concatenation(
        micro, layers, rows, experts, data, masked, layer_setting, seed):
    """Counts first, then each micro-batch's loss weighted by its routed rows: the value and the
    gradient of every router logit equal those of the loss on the concatenated batch."""
    k = data.draw(st.integers(1, experts))
    g = _gen(seed)
    # skewed micro-batches (each prefers different experts), so the micro scope really differs
    mbs = [[(torch.randn(rows, experts, generator=g) + 3 * F.one_hot(torch.tensor(j % experts), experts))
            .requires_grad_(True) for _ in range(layers)] for j in range(micro)]
    masks = [(torch.rand(1, rows, generator=g) > 0.4).long() if masked else None for _ in range(micro)]
    if masked:
        for m in masks:
            m[0, 0] = 1
    step = None
    for lg, m in zip(mbs, masks):
        counts = ExpertCounts.of(lg, experts, k, m, layers=layer_setting)
        step = counts if step is None else step + counts
    assert step.all_reduce() is step  # one process: nothing to sum
    routed = [float(m.sum()) if masked else float(rows) for m in masks]
    total = sum(r / sum(routed) * load_balancing_loss(lg, experts, k, m, layers=layer_setting, step_counts=step)
                for lg, m, r in zip(mbs, masks, routed))
    total.backward()

    concat = [torch.cat([mb[layer].detach() for mb in mbs]).requires_grad_(True) for layer in range(layers)]
    cmask = torch.cat(masks, 1) if masked else None
    ref = load_balancing_loss(concat, experts, k, cmask, layers=layer_setting)
    ref.backward()
    assert total.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    for layer in range(layers):
        got = torch.cat([mb[layer].grad for mb in mbs])
        torch.testing.assert_close(got, concat[layer].grad, rtol=1e-4, atol=1e-6)


@given(router_batches(max_layers=1), st.integers(1, 3))
def test_global_scope_gradient_flows_only_through_p(batch, repeats):
    logits, experts, k, _ = batch
    layer = logits[0].clone().requires_grad_(True)
    step = None
    for _ in range(repeats):  # the same micro-batch seen `repeats` times: f̄ unchanged
        counts = ExpertCounts.of([layer], experts, k)
        step = counts if step is None else step + counts
    f_bar = step.frequencies[0]
    assert not f_bar.requires_grad and f_bar.sum().item() == pytest.approx(k)
    load_balancing_loss([layer], experts, k, step_counts=step).backward()
    p = layer.detach().softmax(-1)
    # d/dz_tj of E/T Σ_t Σ_i f̄_i p_ti with f̄ constant = E/T p_tj (f̄_j - Σ_i f̄_i p_ti)
    expected = experts / layer.shape[0] * p * (f_bar - (p * f_bar).sum(-1, keepdim=True))
    torch.testing.assert_close(layer.grad, expected, atol=1e-6, rtol=1e-5)


def test_misuse_is_named():
    logits = (torch.randn(6, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match="scope"):
        load_balancing_loss(logits, 4, 2, scope="batch")
    with pytest.raises(ValueError, match="layers"):
        load_balancing_loss(logits, 4, 2, layers="mean")
    with pytest.raises(ValueError, match="equal micro-batches"):
        load_balancing_loss(logits, 4, 2, micro_batches=4)
    per_layer = ExpertCounts.of(logits, 4, 2)
    with pytest.raises(ValueError, match="global scope"):
        load_balancing_loss(logits, 4, 2, scope="micro", step_counts=per_layer)
    with pytest.raises(ValueError, match="pooled"):
        load_balancing_loss(logits, 4, 2, layers="pooled", step_counts=per_layer)
    with pytest.raises(ValueError, match="cannot add"):
        per_layer + ExpertCounts.of(logits, 4, 2, layers="pooled")


# ----------------------------------------------------------------------------- the pretraining stage
MOE = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                  norm_topk_prob=True, router_aux_loss_coef=0.5, max_position_embeddings=64)


class ListLoader:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def _moe_batches(b=4, s=10, seed=0):
    """One batch of b rows and its two halves; the halves route differently and the second has fewer targets."""
    g = _gen(seed)
    ids = torch.cat([torch.randint(0, 8, (b // 2, s), generator=g), torch.randint(40, 48, (b // 2, s), generator=g)])
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[b // 2:, :3] = -100
    whole = {"input_ids": ids, "labels": labels}
    halves = [{"input_ids": ids[:b // 2], "labels": labels[:b // 2]},
              {"input_ids": ids[b // 2:], "labels": labels[b // 2:]}]
    return whole, halves


def _moe_model():
    torch.manual_seed(0)
    return Qwen3(MOE)


def test_pretrain_global_lbl_over_grad_accum_is_the_step_value_logged_and_trained(tmp_path):
    """grad_accum = 2 with the counts first: the logged lbl is the global LBL of the step computed here
    by hand, and three steps train exactly like one micro-batch holding the whole step (values and,
    through the clipped AdamW updates, gradients)."""
    whole, halves = _moe_batches()
    model = _moe_model()
    with torch.no_grad():
        logits = model(whole["input_ids"], output_router_logits=True).router_logits
    by_hand = lbl_by_definition(logits, MOE.num_experts, MOE.num_experts_per_tok)
    common = dict(steps=3, lr=1e-2, warmup_steps=0, clip_grad_norm=0.05, log_every=1, weight_decay=0.0)
    quiet = dict(printer=lambda _m: None)

    accum = PretrainLoss(document_masking=False)
    b = train(model, ListLoader(halves), accum, TrainConfig(grad_accum=2, **common), tmp_path / "accum",
              prepare_step=accum.prepare_step, **quiet)
    rows = [json.loads(line) for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lbl"] == pytest.approx(by_hand.item(), rel=1e-5)

    a = train(_moe_model(), ListLoader([whole]), PretrainLoss(document_masking=False), TrainConfig(grad_accum=1, **common),
              tmp_path / "whole", **quiet)
    for s in (1, 2, 3):
        assert a["losses"][s] == pytest.approx(b["losses"][s], rel=1e-5)
    wa = Qwen3.from_pretrained(tmp_path / "whole").state_dict()
    wb = Qwen3.from_pretrained(tmp_path / "accum").state_dict()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-4)

    # Without the counting pass each micro-batch would be balanced on its own: another value.
    per_forward = train(_moe_model(), ListLoader(halves), PretrainLoss(document_masking=False),
                        TrainConfig(grad_accum=2, **common), tmp_path / "per-forward", **quiet)
    assert per_forward["losses"][1] != pytest.approx(a["losses"][1], rel=1e-4)


def test_pretrain_token_weighted_terms_sum_to_the_global_lbl_and_its_gradient():
    """The stage's micro-batch losses, weighted by their target tokens as the trainer does, have the
    value and the gradient of the loss on the whole batch, although the halves have unequal targets."""
    whole, halves = _moe_batches(seed=1)
    model = _moe_model()
    loss_fn = PretrainLoss(document_masking=False)
    loss_fn.prepare_step(model, halves)
    total, weight = 0.0, 0
    for half in halves:
        loss, mets = loss_fn(model, half)
        (loss * mets["num_tokens"]).backward()
        total += float(loss.detach()) * mets["num_tokens"]
        weight += mets["num_tokens"]
    got = {n: p.grad / weight for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref, _ = pretrain_loss(model, whole, document_masking=False)
    ref.backward()
    assert total / weight == pytest.approx(ref.item(), rel=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_pretrain_loss_refuses_counts_of_other_micro_batches():
    whole, halves = _moe_batches()
    model = _moe_model()
    loss_fn = PretrainLoss(document_masking=False)
    loss_fn.prepare_step(model, halves)
    with pytest.raises(RuntimeError, match="prepare_step"):
        loss_fn(model, whole)


def test_pretrain_config_names_bad_lbl_settings():
    base = dict(name="s1", corpus="s1", tokens=1000, seq_len=16, batch_size=4, n_docs=10, model="micro-moe")
    with pytest.raises(ConfigError, match="lbl_layers"):
        PretrainConfig(**base, lbl_layers="mean")
    with pytest.raises(ConfigError, match="load_balancing"):
        PretrainConfig(**base, load_balancing="batch")
    with pytest.raises(ConfigError, match="lbl_micro_batch"):
        PretrainConfig(**base, load_balancing="micro", lbl_micro_batch=3)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from qwen3repro.stages import tokenizer as tokenizer_stage
    from qwen3repro.stages.common import StageContext

    out = tmp_path_factory.mktemp("tok")
    tokenizer_stage.run(tokenizer_stage.TokenizerConfig(vocab_size=512, seq_len=64, n_docs=300), None,
                        StageContext(out, out / "cache", printer=lambda _m: None))
    return out


def test_pretrain_stage_moe_with_grad_accum_logs_the_step_global_lbl(tokenizer_dir, tmp_path):
    """The stage itself (`pretrain.run`) on a MoE with grad_accum = 2: the first step's logged lbl is
    the per-layer LBL of its two packed micro-batches together, from the stage's initial weights."""
    from qwen3repro.data.packing import PackingLoader
    from qwen3repro.stages import pretrain
    from qwen3repro.stages.common import StageContext
    from qwen3repro.tokenizer import Tokenizer

    cfg = PretrainConfig(name="s1", corpus="s1", tokens=64 * 2 * 2 * 2, seq_len=64, batch_size=2, n_docs=60,
                         model="micro-moe", eval_docs_per_language=0, rope_theta=1e4,
                         train={"grad_accum": 2, "lr": 1e-3, "log_every": 1, "warmup_steps": 0})
    ctx = StageContext(tmp_path / "s1", tmp_path / "cache", printer=lambda _m: None)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model = pretrain.build_model(cfg, tokenizer_dir, tokenizer)  # the weights the stage starts from
    docs = pretrain.tokenized_corpus(cfg, tokenizer, tmp_path / "cache")
    loader = PackingLoader(docs, seq_len=cfg.seq_len, batch_size=cfg.batch_size, eot_id=tokenizer.endoftext_id,
                           pad_id=tokenizer.pad_token_id, seed=cfg.seed)
    first_step = torch.cat([b["input_ids"] for b, _ in zip(loader, range(2))])
    with torch.no_grad():
        logits = model(first_step, output_router_logits=True).router_logits
    by_hand = lbl_by_definition(logits, model.config.num_experts, model.config.num_experts_per_tok)

    pretrain.run(cfg, tokenizer_dir, ctx)
    rows = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.steps == 2
    assert rows[0]["lbl"] == pytest.approx(by_hand.item(), rel=1e-5)
