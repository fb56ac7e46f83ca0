"""Dual Chunk Attention: positions, exactness against a naive reference, decoding, memory."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3repro.config import ModelConfig
from qwen3repro.models.dca import (
    dca_kwargs,
    dca_position_tables,
    dca_query_position_matrix,
    dca_relative_positions,
    dual_chunk_attention,
    dynamic_key_temperature,
    naive_dual_chunk_attention,
)
from qwen3repro.models.rope import apply_rope, default_inv_freq, rope_cos_sin, yarn_inv_freq


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small tensors: one intra-op thread is faster, and steadier on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _qkv(seed, B, Hq, Hkv, Sq, Sk, D, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Sk, D, generator=g, dtype=torch.float64)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def _rope(D, yarn):
    if yarn:
        return yarn_inv_freq(D, 1000.0, {"factor": 4.0, "original_max_position_embeddings": 32}, 128)
    return default_inv_freq(D, 1000.0), 1.0


@st.composite
def dca_cases(draw, max_len=48):
    chunk_size = draw(st.integers(2, 20))
    local_size = draw(st.integers(0, chunk_size - 1))
    Sk = draw(st.integers(1, max_len))
    return dict(
        seed=draw(st.integers(0, 2**16)),
        B=draw(st.integers(1, 2)),
        Hkv=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 3])),
        D=draw(st.sampled_from([4, 8, 16])),
        chunk_size=chunk_size,
        local_size=local_size,
        Sk=Sk,
        Sq=draw(st.integers(1, Sk)),
        k0=draw(st.sampled_from([0, 0, 0, 5, 23])),
        yarn=draw(st.booleans()),
        temperature=draw(st.sampled_from([None, None, 8, 20])),
        impl=draw(st.sampled_from(["auto", "explicit"])),
    )


def _run_both(c, dtype=torch.float64):
    Hq = c["Hkv"] * c["group"]
    q, k, v = _qkv(c["seed"], c["B"], Hq, c["Hkv"], c["Sq"], c["Sk"], c["D"], dtype)
    inv_freq, af = _rope(c["D"], c["yarn"])
    kw = dict(
        inv_freq=inv_freq,
        attention_factor=af,
        chunk_size=c["chunk_size"],
        local_size=c["local_size"],
        k_positions=torch.arange(c["k0"], c["k0"] + c["Sk"]),
        original_max_position_embeddings=c["temperature"],
    )
    out = dual_chunk_attention(q, k, v, impl=c["impl"], **kw)
    ref = naive_dual_chunk_attention(q, k, v, **kw)
    return out, ref


# ----------------------------------------------------------------------------- positions
def test_paper_worked_example():
    """Paper Fig. 2: s=6, c=10, w=4 -> P_q^Succ = [6,7,8,9,9,9]; here C = c-1 = 9, W = c-1-s = 3."""
    s, c, w = 6, 10, 4
    t = dca_position_tables(12, chunk_size=c - 1, local_size=c - 1 - s)
    assert t.succ[:6].tolist() == [6, 7, 8, 9, 9, 9]
    assert t.succ[6:].tolist() == [6, 7, 8, 9, 9, 9]  # the same pattern in every chunk
    assert t.key.tolist() == list(range(6)) * 2
    assert t.intra.tolist() == list(range(6)) * 2
    assert set(t.inter.tolist()) == {c - 1}
    assert t.chunk.tolist() == [0] * 6 + [1] * 6

    # The paper's combined matrix M, written from its definitions, over l = 20 (three chunks and a bit).
    l = 20
    pos = torch.arange(l)
    rel = dca_relative_positions(pos, pos, chunk_size=c - 1, local_size=c - 1 - s)
    succ = [s + i if i < w else c - 1 for i in range(s)]
    for i in range(l):
        for j in range(i + 1):
            gap = i // s - j // s
            pk = j % s
            expected = {0: i % s - pk, 1: succ[i % s] - pk}.get(gap, c - 1 - pk)
            assert rel[i, j].item() == expected, (i, j)


@given(st.integers(2, 40), st.data())
def test_relative_positions_bounded(chunk_size, data):
    """Every causal pair sees a relative distance in [0, C]; inside a chunk it is the true distance."""
    local_size = data.draw(st.integers(0, chunk_size - 1))
    pos = torch.arange(data.draw(st.integers(1, 120)))
    rel = dca_relative_positions(pos, pos, chunk_size, local_size)
    causal = pos[None, :] <= pos[:, None]
    assert rel[causal].min() >= 0 and rel[causal].max() <= chunk_size
    n = chunk_size - local_size
    same = (pos[:, None] // n == pos[None, :] // n) & causal
    assert torch.equal(rel[same], (pos[:, None] - pos[None, :]).expand_as(rel)[same])
    pq = dca_query_position_matrix(pos, pos, chunk_size, local_size)
    assert pq.max() <= chunk_size  # no query position beyond C


# ----------------------------------------------------------------------------- exactness
@given(dca_cases(max_len=40), st.data())
def test_single_chunk_is_plain_rope_attention(case, data):
    """(a) When every position fits in one chunk, DCA is causal attention with RoPE at absolute positions."""
    c = dict(case)
    n = c["chunk_size"] - c["local_size"]
    c["k0"] = data.draw(st.integers(0, max(0, n - c["Sk"]))) if c["Sk"] <= n else 0
    c["Sk"] = min(c["Sk"], n - c["k0"])
    c["Sq"] = min(c["Sq"], c["Sk"])
    Hq = c["Hkv"] * c["group"]
    q, k, v = _qkv(c["seed"], c["B"], Hq, c["Hkv"], c["Sq"], c["Sk"], c["D"])
    inv_freq, af = _rope(c["D"], c["yarn"])
    kpos = torch.arange(c["k0"], c["k0"] + c["Sk"])
    qpos = kpos[-c["Sq"] :]
    out = dual_chunk_attention(
        q, k, v, q_positions=qpos, inv_freq=inv_freq, attention_factor=af,
        chunk_size=c["chunk_size"], local_size=c["local_size"], impl=c["impl"],
    )
    qr = apply_rope(q, *rope_cos_sin(inv_freq, qpos, af, q.dtype))
    kr = apply_rope(k, *rope_cos_sin(inv_freq, kpos, af, k.dtype))
    mask = kpos[None, :] <= qpos[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@given(dca_cases())
def test_matches_naive_float64(case):
    """(b) Random shapes, chunk/local sizes, GQA, Sq <= Sk, YaRN, temperature: equal to the naive reference."""
    out, ref = _run_both(case)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@settings(max_examples=15)
@given(dca_cases())
def test_matches_naive_float32(case):
    out, ref = _run_both(case, torch.float32)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_many_chunks_long_keys():
    """Key ranges longer than the explicit path's key block, many chunks, both paths."""
    q, k, v = _qkv(0, 1, 4, 2, 200, 2100, 8)
    inv_freq, af = _rope(8, True)
    kw = dict(inv_freq=inv_freq, attention_factor=af, chunk_size=700, local_size=60)
    ref = naive_dual_chunk_attention(q, k, v, **kw)
    for impl in ("auto", "explicit"):
        torch.testing.assert_close(dual_chunk_attention(q, k, v, impl=impl, **kw), ref, atol=1e-10, rtol=1e-10)


@settings(max_examples=10)
@given(dca_cases(max_len=30))
def test_gradients_match_naive(case):
    """The differentiable (checkpointed, explicit) path has the naive reference's gradients."""
    Hq = case["Hkv"] * case["group"]
    q, k, v = _qkv(case["seed"], case["B"], Hq, case["Hkv"], case["Sq"], case["Sk"], case["D"])
    inv_freq, af = _rope(case["D"], case["yarn"])
    kw = dict(inv_freq=inv_freq, attention_factor=af, chunk_size=case["chunk_size"], local_size=case["local_size"])
    w = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1), dtype=q.dtype)
    grads = []
    for fn in (dual_chunk_attention, naive_dual_chunk_attention):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        (fn(qq, kk, vv, **kw) * w).sum().backward()
        grads.append([qq.grad, kk.grad, vv.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_bfloat16_close_to_float32():
    q, k, v = _qkv(3, 1, 4, 2, 96, 96, 16, torch.float32)
    inv_freq, af = _rope(16, True)
    kw = dict(inv_freq=inv_freq, attention_factor=af, chunk_size=24, local_size=4)
    ref = dual_chunk_attention(q, k, v, **kw)
    out = dual_chunk_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------- decoding
@given(dca_cases(max_len=40), st.data())
def test_incremental_decoding_equals_full_forward(case, data):
    """(c) Prefill then one query at a time over a growing cache of pre-RoPE keys == one full forward."""
    S = case["Sk"]
    Hq = case["Hkv"] * case["group"]
    q, k, v = _qkv(case["seed"], case["B"], Hq, case["Hkv"], S, S, case["D"])
    inv_freq, af = _rope(case["D"], case["yarn"])
    kw = dict(inv_freq=inv_freq, attention_factor=af, chunk_size=case["chunk_size"],
              local_size=case["local_size"], impl=case["impl"])
    full = dual_chunk_attention(q, k, v, **kw)
    prefill = data.draw(st.integers(1, S))
    steps = [dual_chunk_attention(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], **kw)]
    for t in range(prefill, S):
        steps.append(
            dual_chunk_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], q_positions=t, **kw)
        )
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-12, rtol=1e-12)


def test_chunked_prefill_equals_full_forward():
    q, k, v = _qkv(7, 2, 6, 2, 77, 77, 8)
    inv_freq, af = _rope(8, True)
    kw = dict(inv_freq=inv_freq, attention_factor=af, chunk_size=13, local_size=4)
    full = dual_chunk_attention(q, k, v, **kw)
    cuts = [0, 5, 9, 30, 31, 60, 77]
    parts = [
        dual_chunk_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], q_positions=torch.arange(a, b), **kw)
        for a, b in zip(cuts, cuts[1:])
    ]
    torch.testing.assert_close(torch.cat(parts, dim=2), full, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- temperature, config, errors
def test_dynamic_temperature():
    assert dynamic_key_temperature(100, None) == 1.0
    assert dynamic_key_temperature(100, 1000) == 1.0  # never below 1
    assert dynamic_key_temperature(4000, 1000) == pytest.approx(0.1 * math.log(4) + 1)
    # It multiplies the logits by f^2 (vLLM scales the keys and the softmax scale by f).
    q, k, v = _qkv(0, 1, 2, 1, 40, 40, 8)
    inv_freq = default_inv_freq(8, 1000.0)
    kw = dict(inv_freq=inv_freq, chunk_size=10, local_size=2)
    f = dynamic_key_temperature(40, 10)
    hot = dual_chunk_attention(q, k, v, original_max_position_embeddings=10, **kw)
    torch.testing.assert_close(hot, dual_chunk_attention(q, k, v, scale=8**-0.5 * f * f, **kw))


def test_config_kwargs():
    cfg = ModelConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        dual_chunk_attention_config={"chunk_size": 192, "local_size": 16},
    )
    assert dca_kwargs(cfg.dual_chunk_attention_config) == {
        "chunk_size": 192, "local_size": 16, "original_max_position_embeddings": None,
    }
    qwen25_1m = {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144}
    assert dca_kwargs(qwen25_1m)["original_max_position_embeddings"] == 262144


def test_dca_rotates_with_base_frequencies_whatever_rope_scaling_says():
    """vLLM's get_rope builds DCA's rotary embedding (base RoPE) when dual_chunk_attention_config is
    present, ignoring rope_scaling: a config with YaRN + DCA is the same model as DCA alone, and
    differs from YaRN alone at a length where YaRN changes the frequencies."""
    from qwen3repro.models.qwen3 import Qwen3
    from qwen3repro.models.rope import rope_parameters

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e4,
                  max_position_embeddings=256)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    dca = {"chunk_size": 48, "local_size": 4, "original_max_position_embeddings": 64}
    both_cfg = ModelConfig(**common, rope_scaling=yarn, dual_chunk_attention_config=dca)
    inv, factor = rope_parameters(both_cfg)
    torch.testing.assert_close(inv, default_inv_freq(16, 1e4))
    assert factor == 1.0
    torch.manual_seed(0)
    both = Qwen3(both_cfg).eval()
    dca_only = Qwen3(ModelConfig(**common, dual_chunk_attention_config=dca)).eval()
    yarn_only = Qwen3(ModelConfig(**common, rope_scaling=yarn)).eval()
    dca_only.load_state_dict(both.state_dict())
    yarn_only.load_state_dict(both.state_dict())
    ids = torch.randint(0, 64, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = both(ids).logits
        torch.testing.assert_close(out, dca_only(ids).logits)
        assert not torch.allclose(out, yarn_only(ids).logits, atol=1e-4)


def test_rejects_bad_inputs():
    q, k, v = _qkv(0, 1, 2, 1, 4, 6, 8)
    kw = dict(inv_freq=default_inv_freq(8, 1000.0), chunk_size=4, local_size=1)
    with pytest.raises(ValueError, match="last"):
        dual_chunk_attention(q, k, v, q_positions=0, k_positions=0, **kw)
    with pytest.raises(ValueError, match="consecutive"):
        dual_chunk_attention(q, k, v, q_positions=torch.tensor([2, 3, 4, 9]), **kw)
    with pytest.raises(ValueError, match="more queries"):
        dual_chunk_attention(k.repeat(1, 2, 1, 1), q[:, :1], q[:, :1], **kw)
    with pytest.raises(ValueError, match="local_size"):
        dual_chunk_attention(q, k, v, inv_freq=kw["inv_freq"], chunk_size=4, local_size=4)


# ----------------------------------------------------------------------------- memory
def _peak_allocated_bytes(fn) -> int:
    """Peak of live CPU allocations made while fn runs, from the profiler's allocation events."""
    profiler = pytest.importorskip("torch.profiler")
    event_types = pytest.importorskip("torch._C._profiler")
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == event_types._EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _growth(lengths, peaks):
    """(largest ratio of peaks for a doubling of length, least-squares slope of log peak vs log length)."""
    ratios = [b / a for a, b in zip(peaks, peaks[1:])]
    x = [math.log(n) for n in lengths]
    y = [math.log(p) for p in peaks]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    return max(ratios), slope


def _full_matrix_attention(q, k, v):
    """Causal attention through one explicit [L, L] score matrix: the quadratic control."""
    L = q.shape[-2]
    s = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def _measure_peaks() -> dict[str, tuple[list[int], list[int]]]:
    kw = dict(inv_freq=default_inv_freq(32, 1e4), chunk_size=512, local_size=64)
    results = {}
    for impl, lengths in (("auto", [1024, 2048, 4096, 8192]), ("explicit", [512, 1024, 2048, 4096])):
        peaks = []
        for L in lengths:
            q, k, v = _qkv(0, 1, 4, 2, L, L, 32, torch.float32)
            if not peaks:  # warm-up outside the profiler (one-time allocations of the kernels)
                dual_chunk_attention(q, k, v, impl=impl, **kw)
            peaks.append(_peak_allocated_bytes(lambda: dual_chunk_attention(q, k, v, impl=impl, **kw)))
        results[impl] = (lengths, peaks)
    lengths, peaks = [512, 1024, 2048, 4096], []
    for L in lengths:  # forward + backward through the checkpointed explicit path
        q, k, v = (t.requires_grad_() for t in _qkv(0, 1, 4, 2, L, L, 32, torch.float32))
        peaks.append(_peak_allocated_bytes(lambda: dual_chunk_attention(q, k, v, **kw).sum().backward()))
    results["train"] = (lengths, peaks)
    lengths, peaks = [256, 512, 1024, 2048], []
    for L in lengths:
        q, k, v = _qkv(0, 1, 4, 4, L, L, 32, torch.float32)
        peaks.append(_peak_allocated_bytes(lambda: _full_matrix_attention(q, k, v)))
    results["full-matrix"] = (lengths, peaks)
    return results


def test_peak_memory_linear_in_length(capsys):
    """(e) Measured: DCA's peak memory (fused and explicit forward, and forward + backward) at most doubles
    when the length doubles at a fixed chunk size, while a full score matrix quadruples."""
    results = _measure_peaks()
    with capsys.disabled():
        for name, (lengths, peaks) in results.items():
            ratio, slope = _growth(lengths, peaks)
            mb = ", ".join(f"{n}: {p / 2**20:.2f} MiB" for n, p in zip(lengths, peaks))
            print(f"\n[dca memory] {name:11s} {mb}; max doubling ratio {ratio:.2f}, log-log slope {slope:.2f}")
    for impl in ("auto", "explicit", "train"):
        ratio, slope = _growth(*results[impl])
        assert ratio < 2.5 and slope < 1.2, (impl, results[impl])
    ratio, slope = _growth(*results["full-matrix"])
    assert ratio > 3.5 and slope > 1.8, results["full-matrix"]  # the measurement can tell the two apart


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_fused_matches_naive(dtype):
    q, k, v = _qkv(0, 2, 8, 2, 700, 2000, 64, torch.float32, device="cuda")
    inv_freq, af = _rope(64, True)
    kw = dict(inv_freq=inv_freq, attention_factor=af, chunk_size=300, local_size=40)
    ref = dual_chunk_attention(q.double(), k.double(), v.double(), impl="explicit", **kw)
    out = dual_chunk_attention(q.to(dtype), k.to(dtype), v.to(dtype), impl="fused", **kw)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
