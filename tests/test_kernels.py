"""The compiled decode kernels (qwen3repro.kernels) against the PyTorch operations they replace.

* the whole-step kernel and the per-layer attention kernel: a decode step with either gives the
  logits of the same step as PyTorch operations (teacher-forced tokens, padded prompts, steps across
  the kernels' 16-slot blocks, batch compaction, group sizes 2 and 4, widths that are and are not
  multiples of the vector width, batches that fill the matrix products' register blocks and leave
  every remainder, one to three threads);
* top-k sampling: the kernel's token is the one the definition picks from the same noise (k largest,
  ties to the lower id; softmax at temperature T; top-p on the running mass; the exponential race;
  its frequencies are checked through `generate` in test_generate.py); min-p stays on PyTorch;
* building: the cache is reused; no compiler, a failing compiler or QWEN3REPRO_KERNELS=0 give None
  with a warning, and generation still runs (through PyTorch) with the same results;
* bad buffers are refused before any pointer is handed to C;
* the choice between a kernel and its PyTorch operations is measured: a kernel made slower than the
  PyTorch path is not used, a PyTorch path made slower is not used, and the choice is kept on disk
  per machine (a second process reads it instead of measuring);
* every instruction-set build this CPU can run (native, AVX2, the compiler's baseline) gives the
  PyTorch path's results.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from qwen3repro import kernels
from qwen3repro.generate import GREEDY, THINKING_SAMPLING, DenseDecodeStep, SamplingParams, generate
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config
from qwen3repro.perf import cpuinfo

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


def _model(group: int, odd: bool = False) -> Qwen3:
    """micro (head_dim 16, 2 query heads per KV head), or a 4-per-KV-head variant with head_dim 32;
    `odd`: hidden, intermediate and vocabulary sizes that are not multiples of any vector width (every
    matrix product's column remainder)."""
    cfg = get_model_config("micro")
    if group == 4:
        cfg = dataclasses.replace(cfg, num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    if odd:
        cfg = dataclasses.replace(cfg, hidden_size=44, intermediate_size=75, vocab_size=509)
    torch.manual_seed(group)
    return Qwen3(cfg).eval()


MODELS = {g: _model(g) for g in (2, 4)}
ODD_MODEL = _model(2, odd=True)


def _steps(model, prompts, feed, use_kernel: bool | str, keep_at: int | None = None, threads: int | None = None):
    """Prefill `prompts` (left-padded) and run len(feed) decode steps fed the tokens `feed[i]` [B];
    returns the logits of every step. `use_kernel`: True or "step" (every kernel, the whole-step one
    included), "attention" (the per-layer kernels, not the whole-step one), False (PyTorch operations).
    `keep_at`: drop every other row before that step (compaction). `threads`: for the decode steps."""
    b, width = len(prompts), max(map(len, prompts))
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN3REPRO_KERNELS", "1" if use_kernel else "0")
        if use_kernel == "attention":
            mp.setattr(kernels, "step_kernel", lambda *a: None)
        step = DenseDecodeStep(model, b, width + len(feed))
    assert (step.kernel is not None) == bool(use_kernel)
    assert (step.step_kernel is not None) == (use_kernel in (True, "step"))
    out = [step.prefill(ids, positions, None if bool(mask.all()) else mask)]
    pos = torch.tensor([len(p) for p in prompts])
    rows = torch.arange(b)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or before)
        for i, tokens in enumerate(feed):
            if keep_at is not None and i == keep_at and len(rows) > 1:
                keep = torch.arange(0, len(rows), 2)
                step.reorder(keep)
                rows, pos = rows[keep], pos[keep]
            out.append(step(tokens[rows], pos))
            pos = pos + 1
    finally:
        torch.set_num_threads(before)
    return out


@settings(max_examples=30, deadline=None)
@given(
    path=st.sampled_from(["step", "attention"]),
    model=st.sampled_from(["group 2", "group 4", "odd widths"]),
    lengths=st.one_of(st.lists(st.integers(1, 21), min_size=1, max_size=5),  # a few rows
                      st.lists(st.integers(1, 6), min_size=6, max_size=40)),  # full register blocks and their rests
    n_steps=st.integers(1, 40),
    compact=st.booleans(),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
# Every remainder of the matrix products' row blocks (8 rows with AVX-512, 6 with AVX2) in one thread's
# share: 23 rows on one thread, 15 on each of two, then 7 or 8 after compaction.
@example(path="step", model="odd widths", lengths=[2, 5] * 11 + [3], n_steps=4, compact=True, threads=1, seed=0)
@example(path="step", model="group 4", lengths=[4, 1, 7] * 10, n_steps=4, compact=True, threads=2, seed=1)
def test_compiled_decode_steps_match_torch_ops(path, model, lengths, n_steps, compact, threads, seed):
    model = {"group 2": MODELS[2], "group 4": MODELS[4], "odd widths": ODD_MODEL}[model]
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    feed = [torch.tensor([rng.randrange(vocab) for _ in lengths]) for _ in range(n_steps)]
    keep_at = rng.randrange(n_steps) if compact else None
    with torch.inference_mode():
        fast = _steps(model, prompts, feed, path, keep_at, threads)
        ref = _steps(model, prompts, feed, False, keep_at)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_kernel_and_torch_paths_generate_alike():
    # Same seed, same noise draws: the kernels change nothing but rounding, so the tokens agree.
    model = MODELS[2]
    prompts = [[3, 14, 15, 92, 65], [8, 97], [93, 23, 84, 62, 64, 33, 83], [2]]
    runs = {}
    for flag in ("1", "0"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("QWEN3REPRO_KERNELS", flag)
            runs[flag] = generate(model, prompts, THINKING_SAMPLING, max_new_tokens=40, return_logprobs=True, seed=7)
    for a, b in zip(runs["1"], runs["0"]):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------- sampling
def _reference_token(row: torch.Tensor, k: int, temperature: float, top_p: float, noise: torch.Tensor) -> tuple[int, bool]:
    """The definition, in float64 where it decides: -> (token, clear) where `clear` is False when
    float32 rounding could change the answer (a running mass at top_p, or two race scores that tie)."""
    order = torch.sort(row, descending=True, stable=True).indices[:k].tolist()  # ties: the lower id first
    values = row[order].double() / temperature
    p = torch.softmax(values, 0)
    before = torch.cumsum(p, 0) - p
    kept = before < top_p
    kept[0] = True
    race = torch.where(kept, p / noise.double(), torch.zeros_like(p))
    best = int(race.argmax())
    margin = (before - top_p).abs().min().item() if top_p < 1 else 1.0
    second = race.clone()
    second[best] = -1
    clear = margin > 1e-5 and (race[best] - second.max()).item() > 1e-5 * race[best].item()
    return order[best], clear


@settings(max_examples=60)
@given(
    data=st.data(),
    vocab=st.integers(2, 300),
    batch=st.integers(1, 4),
    temperature=st.floats(0.1, 2.0),
    top_p=st.one_of(st.just(1.0), st.floats(0.05, 0.999)),
    coarse=st.booleans(),
)
def test_sampling_kernel_matches_the_definition(data, vocab, batch, temperature, top_p, coarse):
    kernel = kernels.sampling_kernel()
    assert kernel is not None
    k = data.draw(st.integers(1, min(vocab, kernels.MAX_TOP_K)))
    # Coarse logits (a few values) make ties common; fine ones exercise the two-pass selection.
    values = st.integers(-3, 3).map(float) if coarse else st.floats(-20, 20, allow_nan=False, width=32)
    logits = torch.tensor(data.draw(st.lists(st.lists(values, min_size=vocab, max_size=vocab),
                                             min_size=batch, max_size=batch)), dtype=torch.float32)
    noise = torch.empty(batch, k).exponential_(generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    tokens = kernel(logits, k, temperature, top_p, noise)
    for r in range(batch):
        want, clear = _reference_token(logits[r], k, temperature, top_p, noise[r])
        assume(clear)
        assert tokens[r].item() == want


def test_sampling_kernel_on_a_real_vocabulary_row():
    # A Qwen3-sized vocabulary (151,936) with the report's settings: the two-pass top-k over many groups.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 151936, generator=g) * 4
    noise = torch.empty(3, 20).exponential_(generator=g)
    tokens = kernels.sampling_kernel()(logits, 20, 0.6, 0.95, noise)
    for r in range(3):
        want, clear = _reference_token(logits[r], 20, 0.6, 0.95, noise[r])
        assert clear and tokens[r].item() == want


def test_sampling_kernel_rows_of_minus_inf_and_nan():
    # A vocabulary mask leaves -inf entries; a NaN never wins; the top token always stays possible.
    logits = torch.full((2, 50), float("-inf"))
    logits[0, 7] = 1.0
    logits[1, :] = float("nan")
    logits[1, 30] = -2.0
    noise = torch.ones(2, 5)
    assert kernels.sampling_kernel()(logits, 5, 1.0, 0.9, noise).tolist() == [7, 30]


# ------------------------------------------------------------------------------------ building
@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty kernel cache and no remembered builds, restored afterwards."""
    monkeypatch.setenv("QWEN3REPRO_KERNEL_CACHE", str(tmp_path / "cache"))
    kernels._build.cache_clear()
    kernels._writable_cache.cache_clear()
    monkeypatch.setattr(kernels, "_CHOICES", {})
    yield tmp_path / "cache"
    kernels._build.cache_clear()
    kernels._writable_cache.cache_clear()


def test_builds_once_into_the_cache(fresh_build):
    assert kernels.attention_kernel(16, 2) is not None
    built = sorted(p.name for p in fresh_build.iterdir())
    assert len(built) == 1 and built[0].startswith("decode_attention-") and built[0].endswith(".so")
    kernels._build.cache_clear()  # a new process: loads the cached library, compiles nothing
    mtime = (fresh_build / built[0]).stat().st_mtime_ns
    assert kernels.attention_kernel(16, 2) is not None
    assert sorted(p.name for p in fresh_build.iterdir()) == built
    assert (fresh_build / built[0]).stat().st_mtime_ns == mtime
    assert kernels.attention_kernel(32, 2) is not None  # another head shape: another library
    assert len(list(fresh_build.iterdir())) == 2


@pytest.mark.parametrize("compiler", ["no-such-compiler-here", "false"])
def test_without_a_working_compiler_generation_falls_back(fresh_build, monkeypatch, compiler):
    monkeypatch.setenv("CC", compiler)
    with pytest.warns(UserWarning, match="PyTorch operations"):
        assert kernels.attention_kernel(16, 2) is None
    with pytest.warns(UserWarning, match="PyTorch operations"):
        assert kernels.sampling_kernel() is None
    with pytest.warns(UserWarning, match="PyTorch operations"):
        assert kernels.elementwise_kernel() is None
    with pytest.warns(UserWarning, match="PyTorch operations"):
        assert kernels.step_kernel(16, 2) is None
    model = MODELS[2]
    gens = generate(model, [[1, 2, 3], [4]], GREEDY, max_new_tokens=5, return_logprobs=True)
    monkeypatch.delenv("CC")
    kernels._build.cache_clear()
    assert [g.token_ids for g in gens] == [g.token_ids for g in generate(model, [[1, 2, 3], [4]], GREEDY, max_new_tokens=5)]


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("QWEN3REPRO_KERNELS", "0")
    assert kernels.attention_kernel(16, 2) is None and kernels.sampling_kernel() is None
    assert kernels.step_kernel(16, 2) is None
    step = DenseDecodeStep(MODELS[2], 2, 8)
    assert step.kernel is None and step.step_kernel is None


def test_unsupported_head_shapes_use_torch():
    for kernel in (kernels.attention_kernel, kernels.step_kernel):
        assert kernel(24, 2) is None  # not a multiple of 16
        assert kernel(32, 17) is None  # more query heads per KV head than the kernel holds


# ------------------------------------------------------------------------------------ bad input
def _buffers(b=2, hk=1, g=2, d=16, t=32):
    return dict(
        qkv=torch.zeros(b, hk * (g + 2) * d), qk_norm=torch.ones(hk * (g + 1), d), eps=1e-6,
        rope=torch.zeros(t, 1, d // 2, 2), positions=torch.zeros(b, dtype=torch.long),
        keys=torch.zeros(b * hk, d, t), values=torch.zeros(b * hk, t, d), bias=None,
        scores=torch.zeros(b * hk, g, t), out=torch.zeros(b, hk * g * d), kv_heads=hk,
    )


@pytest.mark.parametrize("change, message", [
    (dict(positions=torch.zeros(2, dtype=torch.int32)), "positions"),
    (dict(keys=torch.zeros(2, 16, 30)), "multiple of 16"),
    (dict(values=torch.zeros(2, 16, 32)), "values"),
    (dict(scores=torch.zeros(2, 3, 32)), "scores"),
    (dict(qkv=torch.zeros(2, 64, dtype=torch.float64)), "float32"),
    (dict(keys=torch.zeros(2, 32, 16).transpose(1, 2)), "contiguous"),
    (dict(bias=torch.zeros(2, 1, 16)), "bias"),
])
def test_attention_bind_refuses_bad_buffers(change, message):
    kernel = kernels.attention_kernel(16, 2)
    with pytest.raises(ValueError, match=message):
        kernel.bind(**{**_buffers(), **change})


def test_elementwise_bind_refuses_bad_buffers():
    kernel = kernels.elementwise_kernel()
    with pytest.raises(ValueError, match="same"):
        kernel.bind_rms(torch.zeros(2, 8), torch.zeros(2, 9), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.bind_rms(torch.zeros(8, 2).t(), torch.zeros(2, 8), 1e-6)
    with pytest.raises(ValueError, match="float32"):
        kernel.bind_swiglu(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="inter"):
        kernel.bind_swiglu(torch.zeros(2, 8), torch.zeros(2, 8))


def _step_buffers(b=2, hk=1, g=2, d=16, t=32, hidden=32, inter=48, vocab=64, layers=2):
    layer = lambda: dict(  # noqa: E731
        w_qkv=torch.zeros(hidden, hk * (g + 2) * d), qk_norm=torch.ones(hk * (g + 1), d),
        w_o=torch.zeros(hk * g * d, hidden), w_gu=torch.zeros(hidden, 2 * inter), w_down=torch.zeros(inter, hidden),
        keys=torch.zeros(b * hk, d, t), values=torch.zeros(b * hk, t, d),
        attn_norm_eps=1e-6, qk_norm_eps=1e-6, mlp_norm_eps=1e-6)
    workspace = dict(x=torch.zeros(b, hidden), xn=torch.zeros(b, hidden), qkv=torch.zeros(b, hk * (g + 2) * d),
                     scores=torch.zeros(b * hk, g, t), att=torch.zeros(b, hk * g * d), gu=torch.zeros(b, 2 * inter),
                     act=torch.zeros(b, inter))
    return dict(embed=torch.zeros(vocab, hidden), lm_head=torch.zeros(hidden, vocab), layers=[layer() for _ in range(layers)],
                rope=torch.zeros(t, 1, d // 2, 2), bias=None, final_eps=1e-6, workspace=workspace, kv_heads=hk)


@pytest.mark.parametrize("change, message", [
    (lambda a: a["layers"][1].update(w_gu=torch.zeros(32, 90)), "layer 1 w_gu"),
    (lambda a: a["layers"][0].update(keys=torch.zeros(2, 16, 30), values=torch.zeros(2, 30, 16)), "multiple of 16"),
    (lambda a: a.update(lm_head=torch.zeros(64, 32)), "lm_head"),
    (lambda a: a["workspace"].update(scores=torch.zeros(2, 3, 32)), "scores"),
    (lambda a: a["workspace"].update(x=torch.zeros(2, 32, dtype=torch.float64)), "float32"),
    (lambda a: a.update(embed=torch.zeros(32, 64).t()), "contiguous"),
    (lambda a: a.update(bias=torch.zeros(2, 1, 16)), "bias"),
])
def test_step_bind_refuses_bad_buffers(change, message):
    args = _step_buffers()
    change(args)
    with pytest.raises(ValueError, match=message):
        kernels.step_kernel(16, 2).bind(**args)


def test_step_call_refuses_a_bad_slot_or_buffers():
    call = kernels.step_kernel(16, 2).bind(**_step_buffers())
    tokens, positions, logits = torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.empty(2, 64)
    call(tokens, positions, logits, 31, 2)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="slot 32"):
        call(tokens, positions, logits, 32, 1)
    with pytest.raises(ValueError, match="int64"):
        call(tokens.int(), positions, logits, 3, 1)
    with pytest.raises(ValueError, match="logits"):
        call(tokens, positions, torch.empty(2, 63), 3, 1)


@settings(max_examples=20)
@given(rows=st.integers(1, 5), n=st.integers(1, 70), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_elementwise_kernel_matches_its_definition(rows, n, scale, seed):
    # Row lengths that are and are not multiples of the vector width; gates far into silu's tails.
    g = torch.Generator().manual_seed(seed)
    x, gu = torch.randn(rows, n, generator=g) * scale, torch.randn(rows, 2 * n, generator=g) * scale
    out, act = torch.empty(rows, n), torch.empty(rows, n)
    kernel = kernels.elementwise_kernel()
    kernel.bind_rms(x, out, 1e-6)(1)
    kernel.bind_swiglu(gu, act)(2)
    torch.testing.assert_close(out, x * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6).float())
    torch.testing.assert_close(act, torch.nn.functional.silu(gu[:, :n]) * gu[:, n:], rtol=1e-5, atol=1e-6)


def test_attention_call_refuses_a_slot_outside_the_cache():
    call = kernels.attention_kernel(16, 2).bind(**_buffers())
    call(31, 1)
    with pytest.raises(ValueError, match="slot 32"):
        call(32, 1)


def test_sampling_kernel_refuses_bad_arguments():
    kernel = kernels.sampling_kernel()
    with pytest.raises(ValueError, match="top-k"):
        kernel(torch.zeros(1, 10), 11, 1.0, 1.0, torch.ones(1, 11))
    k = kernels.MAX_TOP_K  # the C file's MAX_K: the largest k it takes
    assert kernel(torch.zeros(1, 300), k, 1.0, 1.0, torch.ones(1, k)).tolist() == [0]
    with pytest.raises(ValueError, match="top-k"):
        kernel(torch.zeros(1, 300), k + 1, 1.0, 1.0, torch.ones(1, k + 1))
    with pytest.raises(ValueError, match="noise"):
        kernel(torch.zeros(1, 10), 3, 1.0, 1.0, torch.ones(1, 4))
    with pytest.raises(ValueError, match="unit stride"):
        kernel(torch.zeros(10, 2).t(), 1, 1.0, 1.0, torch.ones(2, 1))


def test_min_p_runs_the_torch_path_and_filters(monkeypatch):
    # The kernel serves top-k without min-p only: with min-p the PyTorch filters run, and every sampled
    # token keeps at least min_p times the top token's probability (T = 1: the log-probs are the model's).
    monkeypatch.setattr(kernels, "sampling_kernel", lambda: pytest.fail("the kernel does not do min-p"))
    model = MODELS[2]
    prompts = [[5, 6], [7, 8, 9]] * 4
    gens = generate(model, prompts, SamplingParams(temperature=1.0, top_k=10, min_p=0.98), max_new_tokens=8,
                    return_logprobs=True, seed=0)
    for p, g in zip(prompts, gens):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + g.token_ids])).logits[0].float(), -1)
        best = logp[len(p) - 1: -1].max(-1).values
        assert (torch.tensor(g.logprobs) >= best + math.log(0.98) - 1e-5).all()


# ------------------------------------------------------------------------------- measured choices
def _slowed(fn, seconds=2e-3):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)
    return slow


def test_faster_measures_once_and_keeps_the_choice_on_disk(fresh_build, monkeypatch):
    calls = []

    def candidates():
        calls.append(1)
        return {"slow": lambda: time.sleep(2e-3), "quick": lambda: None}

    assert kernels.faster("op shape=1", candidates) == "quick"
    record = kernels.measured_choices()["op shape=1"]
    assert record["seconds"]["quick"] < record["seconds"]["slow"] and len(calls) == 1
    monkeypatch.setattr(kernels, "_CHOICES", {})  # a new process on the same machine: reads, measures nothing
    assert kernels.faster("op shape=1", lambda: pytest.fail("measured again")) == "quick"
    assert kernels.faster("op shape=2", candidates) == "quick" and len(calls) == 2  # another shape: measured
    (saved,) = fresh_build.glob("choices-*.json")
    assert set(json.loads(saved.read_text())) == {"op shape=1", "op shape=2"}
    saved.write_text("{not json")  # a damaged file is measured again, not trusted
    monkeypatch.setattr(kernels, "_CHOICES", {})
    assert kernels.faster("op shape=1", candidates) == "quick" and len(calls) == 3


@pytest.mark.parametrize("part, slowed", [("attention", "kernel"), ("attention", "torch"),
                                           ("step", "kernel"), ("step", "operations")])
def test_the_engine_never_keeps_the_slower_decode_path(fresh_build, monkeypatch, part, slowed):
    # Whichever path is made slower (by 2 ms a call, far beyond the timing noise), the engine measures
    # it and decodes with the other; its tokens are the same either way. `attention`: the per-layer
    # attention kernel against its PyTorch operations; `step`: the whole-step kernel against the
    # per-operation step (with its own kernels as measured).
    monkeypatch.setenv("QWEN3REPRO_KERNELS", "auto")
    kernel_class, other, attribute, key = {
        "attention": (kernels.AttentionKernel, "_torch_attention", "kernel", "decode-attention"),
        "step": (kernels.StepKernel, "_operations_step", "step_kernel", "decode-step"),
    }[part]
    if slowed == "kernel":
        bind = kernel_class.bind
        monkeypatch.setattr(kernel_class, "bind", lambda self, *a, **k: _slowed(bind(self, *a, **k)))
    else:
        monkeypatch.setattr(DenseDecodeStep, other, _slowed(getattr(DenseDecodeStep, other)))
    model = MODELS[2]
    step = DenseDecodeStep(model, 4, 24)
    assert (getattr(step, attribute) is None) == (slowed == "kernel")
    (record,) = [r for k, r in kernels.measured_choices().items() if k.startswith(key)]
    assert record["choice"] != slowed and record["seconds"][slowed] > record["seconds"][record["choice"]]
    prompts = [[3, 14, 15], [9, 2, 6, 5], [3], [5, 8]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QWEN3REPRO_KERNELS", "0")
        ref = generate(model, prompts, GREEDY, max_new_tokens=6)
    assert [g.token_ids for g in generate(model, prompts, GREEDY, max_new_tokens=6)] == [g.token_ids for g in ref]


@pytest.mark.parametrize("slowed", ["kernel", "torch"])
def test_the_engine_never_keeps_the_slower_norm_and_swiglu(fresh_build, monkeypatch, slowed):
    monkeypatch.setenv("QWEN3REPRO_KERNELS", "auto")
    if slowed == "kernel":
        bind = kernels.ElementwiseKernel.bind_swiglu
        monkeypatch.setattr(kernels.ElementwiseKernel, "bind_swiglu", lambda self, *a: _slowed(bind(self, *a)))
    else:
        monkeypatch.setattr(torch.nn.functional, "silu", _slowed(torch.nn.functional.silu))
    step = DenseDecodeStep(MODELS[2], 4, 24)
    assert (step.elementwise is None) == (slowed == "kernel")
    (record,) = [r for k, r in kernels.measured_choices().items() if k.startswith("decode-norm-swiglu")]
    assert record["choice"] != slowed and record["seconds"][slowed] > record["seconds"][record["choice"]]


@pytest.mark.parametrize("slowed", ["kernel", "torch"])
def test_the_sampler_never_keeps_the_slower_draw(fresh_build, monkeypatch, slowed):
    from qwen3repro.generate import sampling

    monkeypatch.setenv("QWEN3REPRO_KERNELS", "auto")
    if slowed == "kernel":
        monkeypatch.setattr(sampling, "_kernel_draw", _slowed(sampling._kernel_draw))
    else:
        monkeypatch.setattr(sampling, "_draw_top_k", _slowed(sampling._draw_top_k))
    chosen = sampling._sampling_kernel(3, 200, THINKING_SAMPLING, 1)
    assert (chosen is None) == (slowed == "kernel")
    (record,) = [r for k, r in kernels.measured_choices().items() if k.startswith("sample-top-k")]
    assert record["choice"] != slowed and record["seconds"][slowed] > record["seconds"][record["choice"]]


def test_forced_on_skips_the_measurement(fresh_build, monkeypatch):
    monkeypatch.setenv("QWEN3REPRO_KERNELS", "1")
    monkeypatch.setattr(kernels, "faster", lambda *a: pytest.fail("QWEN3REPRO_KERNELS=1 measures nothing"))
    step = DenseDecodeStep(MODELS[2], 2, 8)
    assert step.kernel is not None and step.step_kernel is not None
    from qwen3repro.generate import sampling
    assert sampling._sampling_kernel(2, 100, THINKING_SAMPLING, 1) is not None
    monkeypatch.setenv("QWEN3REPRO_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="QWEN3REPRO_KERNELS"):
        kernels.mode()


@pytest.mark.parametrize("isa", ["native", "avx2", "generic"])
def test_every_instruction_set_build_matches_torch(fresh_build, monkeypatch, isa):
    # The AVX2 build is what an AVX2-only machine runs (8-float vectors); on an AVX-512 machine native
    # builds 16-float ones: both, and the compiler's baseline, must give the PyTorch path's logits.
    if isa == "avx2" and not {"avx2", "fma"} <= cpuinfo()[1]:
        pytest.skip("this CPU cannot run AVX2 code")
    monkeypatch.setenv("QWEN3REPRO_KERNEL_ISA", isa)
    rng = random.Random(5)
    for group, model in MODELS.items():
        vocab = model.config.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 17, 9)]
        feed = [torch.tensor([rng.randrange(vocab) for _ in prompts]) for _ in range(20)]
        with torch.inference_mode():
            ref = _steps(model, prompts, feed, False, 7)
            for path in ("step", "attention"):
                for a, b in zip(_steps(model, prompts, feed, path, 7), ref):
                    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    built = {p.name.split("-")[0] for p in fresh_build.glob("*.so")}
    assert built == {"decode_attention", "decode_norm_swiglu", "decode_step"}
