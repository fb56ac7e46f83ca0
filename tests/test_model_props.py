"""Property tests: RoPE/YaRN, GQA, router, packed-document masking (load balancing: test_load_balancing)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.config import ModelConfig
from qwen3repro.models.attention import Attention, build_attention_mask, rope_tables, rotate
from qwen3repro.models.moe import route
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.rope import apply_rope, default_inv_freq, rope_cos_sin, rope_parameters

SMALL = dict(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, rope_theta=10000.0, bos_token_id=None, eos_token_id=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ RoPE
@given(
    half=st.integers(1, 32),
    base=st.sampled_from([1e4, 1e6, 5e5]),
    m=st.integers(0, 4096),
    n=st.integers(0, 4096),
    offset=st.integers(0, 60_000),
    seed=st.integers(0, 2**16),
)
def test_rope_scores_depend_only_on_relative_position(half, base, m, n, offset, seed):
    d = 2 * half
    q, k = torch.randn(2, d, generator=_gen(seed))
    inv_freq = default_inv_freq(d, base)

    def score(pq, pk):
        cos, sin = rope_cos_sin(inv_freq, torch.tensor([pq, pk]))
        rq = apply_rope(q[None], cos[:1], sin[:1])
        rk = apply_rope(k[None], cos[1:], sin[1:])
        return (rq * rk).sum().item()

    # fp32 angles at positions up to ~6.5e4 carry ~4e-3 rad of rounding; a wrong rotation is O(|q||k|).
    tol = 2e-2 * q.norm().item() * k.norm().item()
    assert abs(score(m, n) - score(m + offset, n + offset)) <= tol
    assert abs(score(m, m) - (q * k).sum().item()) <= 1e-3 * q.norm().item() * k.norm().item() + 1e-5


@given(head_dim=st.sampled_from([8, 16, 32, 64, 128]), base=st.floats(100.0, 1e7), orig=st.integers(16, 65536))
def test_yarn_factor_one_is_plain_rope(head_dim, base, orig):
    common = dict(SMALL, head_dim=head_dim, rope_theta=base, max_position_embeddings=orig)
    plain = ModelConfig(**common)
    yarn = ModelConfig(**common, rope_scaling={"rope_type": "yarn", "factor": 1.0,
                                               "original_max_position_embeddings": orig})
    inv_p, af_p = rope_parameters(plain)
    inv_y, af_y = rope_parameters(yarn)
    torch.testing.assert_close(inv_y, inv_p, rtol=1e-6, atol=0)
    assert af_y == af_p == 1.0


@given(
    head_dim=st.sampled_from([8, 16, 32, 48, 64, 128, 256]),
    base=st.sampled_from([1e4, 1e5, 1e6, 1e7, 5e6]) | st.floats(500.0, 1e7),
    factor=st.sampled_from([1.0, 2.0, 4.0, 8.0]) | st.floats(1.0, 64.0),
    orig=st.integers(16, 65536),
    extra=st.sampled_from([{}, {"beta_fast": 16, "beta_slow": 2}, {"truncate": False},
                           {"attention_factor": 1.3}, {"mscale": 1.0, "mscale_all_dim": 0.5}]),
)
def test_yarn_matches_transformers(head_dim, base, factor, orig, extra):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import Qwen3Config

    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig, **extra}
    ours = ModelConfig(**dict(SMALL, head_dim=head_dim, rope_theta=base, max_position_embeddings=int(orig * factor)),
                       rope_scaling=scaling)
    hf = Qwen3Config(hidden_size=32, num_attention_heads=4, head_dim=head_dim,
                     max_position_embeddings=int(orig * factor),
                     rope_parameters={**scaling, "rope_theta": base})
    ref_inv, ref_af = rope_utils._compute_yarn_parameters(hf)
    inv, af = rope_parameters(ours)
    torch.testing.assert_close(inv, ref_inv, rtol=1e-6, atol=0)
    assert af == pytest.approx(ref_af, rel=1e-12)


# ------------------------------------------------------------------------------------------- GQA
@given(
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    seq=st.integers(1, 9),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=20)
def test_gqa_equals_mha_with_repeated_kv(kv_heads, groups, seq, padded, seed):
    heads, d = kv_heads * groups, 8
    torch.manual_seed(seed)
    gqa_cfg = ModelConfig(**dict(SMALL, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=d))
    mha_cfg = gqa_cfg.replace(num_key_value_heads=heads)
    gqa, mha = Attention(gqa_cfg, 0), Attention(mha_cfg, 0)
    with torch.no_grad():
        for p in gqa.parameters():
            p.normal_()
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        mha.q_norm.weight.copy_(gqa.q_norm.weight)
        mha.k_norm.weight.copy_(gqa.k_norm.weight)
        # head h of MHA uses kv head h // groups of GQA
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(kv_heads, d, -1).repeat_interleave(groups, 0).reshape(heads * d, -1)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, seq, 32)
    pos = torch.arange(seq)[None]
    cos, sin = rope_tables(*rope_cos_sin(default_inv_freq(d, 1e4), pos))
    am = torch.ones(2, seq, dtype=torch.bool)
    if padded and seq > 1:
        am[0, 0] = False
    mask = build_attention_mask(2, seq, 0, attention_mask=am if padded else None)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x, cos, sin, mask), mha(x, cos, sin, mask), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- router
@given(tokens=st.integers(1, 20), experts=st.integers(2, 16), data=st.data(), seed=st.integers(0, 2**16))
def test_router_topk_weights(tokens, experts, data, seed):
    k = data.draw(st.integers(1, experts))
    logits = torch.randn(tokens, experts, generator=_gen(seed)) * 3
    probs = logits.softmax(-1)
    w, idx = route(logits, k, norm_topk_prob=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(tokens))
    chosen = probs.gather(1, idx)
    rest = probs.scatter(1, idx, -1.0)
    assert bool((chosen.min(-1).values >= rest.max(-1).values).all())
    raw, idx2 = route(logits, k, norm_topk_prob=False)
    assert torch.equal(idx, idx2)
    torch.testing.assert_close(raw, chosen)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True))


# ------------------------------------------------------------------------------ packed documents
torch.manual_seed(0)
_PACK_MODELS = {
    "dense": Qwen3(ModelConfig(**SMALL)).eval(),
    "moe": Qwen3(ModelConfig(**SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)).eval(),
}


@given(
    name=st.sampled_from(sorted(_PACK_MODELS)),
    docs=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=20)
def test_segment_ids_equal_separate_documents(name, docs, seed):
    """Packed rows (documents of different lengths, positions restarting per document) == each alone."""
    model = _PACK_MODELS[name]
    width = max(sum(row) for row in docs)
    g = _gen(seed)
    ids = torch.randint(0, 53, (len(docs), width), generator=g)
    seg = torch.full((len(docs), width), -1, dtype=torch.long)
    pos = torch.zeros(len(docs), width, dtype=torch.long)
    for r, row in enumerate(docs):
        start = 0
        for j, n in enumerate(row):
            seg[r, start : start + n] = j
            pos[r, start : start + n] = torch.arange(n)
            start += n
        # trailing filler forms its own segment(s); it must not leak into real documents
        pos[r, start:] = torch.arange(width - start)
    with torch.no_grad():
        packed = model(ids, segment_ids=seg, position_ids=pos).logits
        for r, row in enumerate(docs):
            start = 0
            for n in row:
                alone = model(ids[r : r + 1, start : start + n]).logits[0]
                torch.testing.assert_close(packed[r, start : start + n], alone, atol=1e-5, rtol=0)
                start += n


def test_segment_mask_is_block_diagonal_causal():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = build_attention_mask(1, 6, 0, segment_ids=seg).mask[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(m, expected)


# ------------------------------------------------------------------------------ DCA hook
def test_dual_chunk_attention_within_one_chunk_equals_plain_model(monkeypatch):
    """With dual_chunk_attention_config set, attention goes through models.dca on pre-RoPE q/k.

    While every position fits in one chunk (chunk length = chunk_size - local_size), DCA is plain
    causal RoPE attention, so the model must reproduce the plain model: full forward and cached decoding.
    """
    from qwen3repro.models import dca

    calls = []
    real = dca.dual_chunk_attention

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs["chunk_size"], kwargs["local_size"]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(dca, "dual_chunk_attention", spy)
    cfg = ModelConfig(**SMALL)
    torch.manual_seed(0)
    plain = Qwen3(cfg).eval()
    with_dca = Qwen3(cfg.replace(dual_chunk_attention_config={"chunk_size": 16, "local_size": 4})).eval()
    with_dca.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 53, (2, 11))
    with torch.no_grad():
        ref = plain(ids).logits
        torch.testing.assert_close(with_dca(ids).logits, ref, atol=1e-5, rtol=0)
        cache = with_dca.new_kv_cache(2, 12)
        parts = [with_dca(ids[:, :6], kv_cache=cache).logits]
        parts += [with_dca(ids[:, i : i + 1], kv_cache=cache).logits for i in range(6, 11)]
        torch.testing.assert_close(torch.cat(parts, 1), ref, atol=1e-5, rtol=0)
        assert calls[0] == (11, 11, 16, 4) and calls[-1] == (1, 11, 16, 4)
        with pytest.raises(ValueError, match="padding"):
            with_dca(ids, attention_mask=torch.ones(2, 11).index_fill_(1, torch.tensor([0]), 0))


@given(half=st.integers(1, 16), seq=st.integers(1, 6), heads=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_rotate_with_folded_sign_equals_apply_rope(half, seq, heads, seed):
    """attention.rotate (sign folded into the sin table) == rope.apply_rope (rotate_half), bit for bit."""
    d = 2 * half
    x = torch.randn(2, seq, heads, d, generator=_gen(seed))
    pos = torch.randint(0, 10_000, (2, seq), generator=_gen(seed + 1))
    cos, sin = rope_cos_sin(default_inv_freq(d, 1e4), pos, attention_factor=1.2)
    ref = apply_rope(x.transpose(1, 2), cos[:, None], sin[:, None]).transpose(1, 2)
    assert torch.equal(rotate(x, *rope_tables(cos, sin)), ref)


def test_rmsnorm_backward_is_exact():
    """The hand-written RMSNorm backward passes gradcheck (fp64) and matches F.rms_norm in fp32."""
    from qwen3repro.models.attention import RMSNorm, _RMSNormFull

    norm = RMSNorm(6, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFull.apply(x, w, 1e-6), (x, norm.weight))
    norm32 = RMSNorm(6).float()
    with torch.no_grad():
        norm32.weight.copy_(norm.weight)
    x32 = x.detach().float().requires_grad_(True)
    g = torch.randn(3, 4, 6)
    ours = torch.autograd.grad(norm32(x32), (x32, norm32.weight), g)
    ref_x = x32.detach().requires_grad_(True)
    ref_w = norm32.weight.detach().clone().requires_grad_(True)
    ref = torch.autograd.grad(torch.nn.functional.rms_norm(ref_x, (6,), ref_w, 1e-6), (ref_x, ref_w), g)
    torch.testing.assert_close(norm32(x32), torch.nn.functional.rms_norm(x32, (6,), norm32.weight, 1e-6))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
