"""KV cache, dense and MoE: prefill + incremental decoding gives the logits of one full forward; the cache
holds, slot by slot, the RoPE-rotated keys and the values a full forward computes; crop rewinds and reorder
keeps the right rows (with their padding flags and positions)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qwen3repro.config import ModelConfig
from qwen3repro.models.qwen3 import Qwen3

ATOL = 1e-5
COMMON = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=10000.0,
              bos_token_id=None, eos_token_id=None)
CONFIGS = {
    "dense": ModelConfig(**COMMON, tie_word_embeddings=True),
    "moe": ModelConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
}
torch.manual_seed(0)
MODELS = {name: Qwen3(cfg).eval() for name, cfg in CONFIGS.items()}


def _full_forward_keys_values(model, ids):
    """Per layer, the keys (after QK-norm and RoPE) and values [B, Hk, S, D] of a cache-free forward.

    Keys are read before RoPE (the k_norm output) and rotated here with the textbook rotate-half
    formula, θ_i = base^(−2i/D), so that the check does not go through the model's own RoPE helpers.
    """
    cfg = model.config
    b, s = ids.shape
    hk, d = cfg.num_key_value_heads, cfg.head_dim
    seen = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        hooks.append(attn.k_norm.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("k", i), out)))
        hooks.append(attn.v_proj.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("v", i), out)))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    theta = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(s, dtype=torch.float64)[:, None] * theta[None, :]  # [S, D/2]
    cos = torch.cat([angle.cos(), angle.cos()], -1)[None, :, None].float()
    sin = torch.cat([angle.sin(), angle.sin()], -1)[None, :, None].float()
    keys, values = [], []
    for i in range(cfg.num_hidden_layers):
        k = seen[("k", i)]  # [B, S, Hk, D]
        k1, k2 = k[..., : d // 2], k[..., d // 2 :]
        rotated = k * cos + torch.cat([-k2, k1], -1) * sin
        keys.append(rotated.transpose(1, 2))
        values.append(seen[("v", i)].view(b, s, hk, d).transpose(1, 2))
    return torch.stack(keys), torch.stack(values)


@given(
    name=st.sampled_from(sorted(MODELS)),
    batch=st.integers(1, 3),
    prompt=st.integers(1, 12),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25)
def test_incremental_decoding_matches_full_forward(name, batch, prompt, chunks, seed):
    model = MODELS[name]
    total = prompt + sum(chunks)
    ids = torch.randint(0, model.config.vocab_size, (batch, total), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_kv_cache(batch, total + 2)
        pieces = [model(ids[:, :prompt], kv_cache=cache).logits]
        start = prompt
        for n in chunks:  # one token at a time (n = 1) and chunks of several tokens
            pieces.append(model(ids[:, start : start + n], kv_cache=cache).logits)
            start += n
    assert cache.length == total
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)


@given(
    name=st.sampled_from(sorted(MODELS)),
    lengths=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=20)
def test_left_padded_batch_matches_single_sequences(name, lengths, steps, seed):
    """Batched generation with left padding + attention_mask + position_ids == each row alone."""
    model = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    seqs = [torch.randint(0, model.config.vocab_size, (n + steps,), generator=g) for n in lengths]
    b = len(lengths)
    prompt = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt[i, width - n :] = seqs[i][:n]
        mask[i, width - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model.new_kv_cache(b, width + steps)
        out = model(prompt, attention_mask=mask, position_ids=pos, kv_cache=cache).logits
        batched = [out[:, -1]]
        next_pos = pos[:, -1:] + 1
        full_mask = mask
        for t in range(steps - 1):
            tok = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
            full_mask = torch.cat([full_mask, torch.ones(b, 1, dtype=torch.long)], 1)
            # alternate the two mask spellings: full [B, past+1], or new-tokens-only (the cache remembers)
            am = full_mask if t % 2 == 0 else None
            out = model(tok, attention_mask=am, position_ids=next_pos, kv_cache=cache).logits
            batched.append(out[:, -1])
            next_pos = next_pos + 1
        for i, n in enumerate(lengths):
            alone = model(seqs[i][None, : n + steps - 1]).logits[0, n - 1 :]
            got = torch.stack([x[i] for x in batched])
            torch.testing.assert_close(got, alone, atol=ATOL, rtol=0)
            # the prompt rows themselves (real tokens only) match too
            torch.testing.assert_close(
                model(prompt, attention_mask=mask, position_ids=pos).logits[i, width - n :],
                model(seqs[i][None, :n]).logits[0],
                atol=ATOL,
                rtol=0,
            )


def test_cache_overflow_and_crop():
    model = MODELS["dense"]
    ids = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        cache = model.new_kv_cache(1, 5)
        with pytest.raises(ValueError, match="max_len"):
            model(ids, kv_cache=cache)
        cache = model.new_kv_cache(1, 8)
        model(ids, kv_cache=cache)
        cache.crop(4)  # rewind two tokens and feed different ones
        other = torch.randint(0, 61, (1, 2))
        got = model(other, kv_cache=cache).logits
        full = model(torch.cat([ids[:, :4], other], 1)).logits[:, 4:]
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
    # the rewound slots hold the new tokens' keys and values
    keys, values = _full_forward_keys_values(model, torch.cat([ids[:, :4], other], 1))
    assert cache.length == 6
    torch.testing.assert_close(cache.k[:, :, :, :6], keys, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.v[:, :, :, :6], values, atol=ATOL, rtol=0)


@given(
    name=st.sampled_from(sorted(MODELS)),
    batch=st.integers(1, 3),
    prompt=st.integers(1, 8),
    chunks=st.lists(st.integers(1, 3), max_size=4),
    spare=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=15)
def test_cache_holds_the_keys_and_values_of_a_full_forward(name, batch, prompt, chunks, spare, seed):
    model = MODELS[name]
    cfg = model.config
    total = prompt + sum(chunks)
    ids = torch.randint(0, cfg.vocab_size, (batch, total), generator=torch.Generator().manual_seed(seed))
    cache = model.new_kv_cache(batch, total + spare)
    assert cache.k.shape == (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, total + spare, cfg.head_dim)
    assert cache.k.dtype == cache.v.dtype == torch.float32 and cache.length == 0
    with torch.no_grad():
        model(ids[:, :prompt], kv_cache=cache)
        start = prompt
        for n in chunks:
            model(ids[:, start : start + n], kv_cache=cache)
            start += n
    keys, values = _full_forward_keys_values(model, ids)
    assert cache.length == total
    torch.testing.assert_close(cache.k[:, :, :, :total], keys, atol=ATOL, rtol=0)
    torch.testing.assert_close(cache.v[:, :, :, :total], values, atol=ATOL, rtol=0)
    assert torch.all(cache.k[:, :, :, total:] == 0) and torch.all(cache.v[:, :, :, total:] == 0)  # untouched slots
    assert torch.equal(cache.positions[:, :total], torch.arange(total).expand(batch, total))
    assert not cache.has_padding and bool(cache.valid.all())


@given(
    name=st.sampled_from(sorted(MODELS)),
    lengths=st.lists(st.integers(1, 7), min_size=2, max_size=4),
    before=st.integers(0, 2),
    after=st.integers(1, 3),
    data=st.data(),
)
@settings(max_examples=15)
def test_reorder_keeps_the_chosen_rows(name, lengths, before, after, data):
    """Left-padded batch; decode `before` steps, keep/reorder rows (beam search, dropping finished
    sequences), decode `after` more steps passing only the new tokens: every kept row's logits equal
    those of its sequence alone, so its keys, values, positions and padding flags moved with it."""
    model = MODELS[name]
    b, width = len(lengths), max(lengths)
    keep = data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=b, unique=True), label="keep")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    seqs = [torch.randint(0, model.config.vocab_size, (n + before + after,), generator=g) for n in lengths]
    prompt = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt[i, width - n :] = seqs[i][:n]
        mask[i, width - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    index = torch.tensor(keep)
    with torch.no_grad():
        cache = model.new_kv_cache(b, width + before + after)
        model(prompt, attention_mask=mask, position_ids=pos, kv_cache=cache)
        next_pos = pos[:, -1:] + 1
        for t in range(before):
            tok = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
            model(tok, attention_mask=torch.ones(b, 1, dtype=torch.long), position_ids=next_pos, kv_cache=cache)
            next_pos = next_pos + 1
        k_before, v_before = cache.k.clone(), cache.v.clone()
        valid_before, positions_before = cache.valid.clone(), cache.positions.clone()
        cache.reorder(index)
        assert cache.batch_size == len(keep)
        assert torch.equal(cache.k, k_before[:, index]) and torch.equal(cache.v, v_before[:, index])
        assert torch.equal(cache.valid, valid_before[index]) and torch.equal(cache.positions, positions_before[index])
        next_pos = next_pos[index]
        got = []
        for t in range(before, before + after):
            tok = torch.stack([seqs[i][lengths[i] + t] for i in keep])[:, None]
            got.append(model(tok, position_ids=next_pos, kv_cache=cache).logits[:, -1])
            next_pos = next_pos + 1
        for row, i in enumerate(keep):
            n = lengths[i]
            alone = model(seqs[i][None, : n + before + after]).logits[0, n + before :]
            torch.testing.assert_close(torch.stack([x[row] for x in got]), alone, atol=ATOL, rtol=0)


KEEP_MODELS = {
    **MODELS,
    "dca": Qwen3(ModelConfig(**COMMON, tie_word_embeddings=True,
                             dual_chunk_attention_config={"chunk_size": 8, "local_size": 2})).eval(),
}


@given(
    name=st.sampled_from(sorted(KEEP_MODELS)),
    batch=st.integers(1, 3),
    past=st.integers(0, 6),
    prompt=st.integers(1, 20),
    keep=st.integers(1, 22),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(name="dense", batch=2, past=0, prompt=10, keep=4, padded=False, seed=1)  # SDPA's causal path
@example(name="dca", batch=1, past=0, prompt=20, keep=12, padded=False, seed=2)  # queries span two chunks
@example(name="moe", batch=2, past=3, prompt=7, keep=1, padded=True, seed=3)
@settings(max_examples=40, deadline=None)
def test_logits_to_keep_gives_the_last_positions_of_a_full_forward(name, batch, past, prompt, keep, padded, seed):
    """`logits_to_keep=k` (the prefill's shortcut: the last layer computes queries, attention and MLP
    for the last k positions only) equals the last k logits of a full forward, with or without cached
    tokens before and left padding, and leaves the same cache: the next token's logits agree too."""
    model = KEEP_MODELS[name]
    padded = padded and name != "dca"  # DCA accepts no padding mask
    g = torch.Generator().manual_seed(seed)
    total = past + prompt
    ids = torch.randint(0, model.config.vocab_size, (batch, total + 1), generator=g)
    mask = torch.ones(batch, total + 1, dtype=torch.long)
    if padded:
        for row in range(batch):
            mask[row, : int(torch.randint(0, total, (1,), generator=g))] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def upto(n):  # the padding mask of the first n tokens; None without padding (SDPA's causal path)
        return mask[:, :n] if padded else None

    with torch.no_grad():
        full = model(ids[:, :total], attention_mask=upto(total), position_ids=positions[:, :total]).logits
        caches, kept = [], []
        for k in (0, keep):
            cache = model.new_kv_cache(batch, total + 1)
            if past:
                model(ids[:, :past], attention_mask=upto(past), position_ids=positions[:, :past], kv_cache=cache)
            out = model(ids[:, past:total], attention_mask=upto(total), position_ids=positions[:, past:total],
                        kv_cache=cache, logits_to_keep=k).logits
            kept.append(out)
            caches.append(cache)
        n = min(keep, prompt)
        assert kept[1].shape == (batch, n, model.config.vocab_size)
        real = mask[:, total - n: total, None].bool()  # padding queries' outputs are meaningless
        torch.testing.assert_close(torch.where(real, kept[1], 0), torch.where(real, full[:, -n:], 0),
                                   atol=ATOL, rtol=0)
        nexts = [model(ids[:, total:], attention_mask=upto(total + 1), position_ids=positions[:, total:], kv_cache=c).logits
                 for c in caches]
    torch.testing.assert_close(nexts[1], nexts[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(caches[1].k[:, :, :, :total], caches[0].k[:, :, :, :total], atol=0, rtol=0)
