"""Rollout-generation benchmark: our `generate` vs transformers' `generate`, same model, same run.

The model is a randomly initialised `tiny-student` (fp32, CPU), built once as our `Qwen3` and
copied weight for weight into transformers' `Qwen3ForCausalLM`. Both sample 128 new tokens for a
batch of 32 prompts of 32 tokens with the report's thinking-mode settings (T 0.6, top-p 0.95,
top-k 20), with their KV caches, and without stopping early (ours: no stop tokens; transformers:
`min_new_tokens` = `max_new_tokens`), so both produce exactly 32 × 128 tokens. The printed ratio
compares the two on the same machine at the same moment: they run in pairs, back to back, and the
ratio is the median of the pairs' ratios (process CPU time is reported too); results also go to
`runs/bench/generate.json`, with which of the engine's compiled decode kernels ran (the engine
measures each against its PyTorch operations and keeps the faster). The goal is ≥ 5×;
the benchmark reports the ratio rather than failing on a noisy machine.

Run with `make bench`.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from qwen3repro import kernels
from qwen3repro.generate import THINKING_SAMPLING, generate
from qwen3repro.models.qwen3 import Qwen3
from qwen3repro.models.registry import get_model_config

from .timing import interleaved

pytestmark = pytest.mark.bench

MODEL = "tiny-student"
BATCH, PROMPT_LEN, NEW_TOKENS = 32, 32, 128
ROUNDS = 6
OUT = Path(os.environ.get("QWEN3REPRO_BENCH_OUT", "runs/bench"))


def _config():
    import dataclasses

    cfg = get_model_config(MODEL)
    # The tiny tokenizer's layout: 26 special tokens last, <|im_end|> third of them.
    eos = cfg.vocab_size - 26 + 2
    return dataclasses.replace(cfg, eos_token_id=eos)


def _hf_model(cfg, ours):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf_cfg = Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                            if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    hf = Qwen3ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return hf


def test_generate_vs_transformers(benchmark):
    cfg = _config()
    torch.manual_seed(0)
    ours = Qwen3(cfg).eval()
    hf = _hf_model(cfg, ours)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size - 26, (BATCH, PROMPT_LEN), generator=g)
    prompt_lists = prompts.tolist()
    s = THINKING_SAMPLING

    def run_ours():
        gens = generate(ours, prompt_lists, s, max_new_tokens=NEW_TOKENS, stop_token_ids=(), seed=0)
        assert sum(len(x) for x in gens) == BATCH * NEW_TOKENS

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0,
            )
        assert out.shape == (BATCH, PROMPT_LEN + NEW_TOKENS)

    # ROUNDS pairs, ours and transformers back to back (their order alternating), after one warm-up each.
    times = interleaved({"ours": run_ours, "hf": run_hf}, ROUNDS, warmup=1)
    pairs = [(*o, *h) for o, h in zip(times["ours"], times["hf"])]  # (ours wall, ours CPU, hf wall, hf CPU)
    ours_s, ours_cpu, hf_s, hf_cpu = (statistics.median(p[i] for p in pairs) for i in range(4))
    benchmark.pedantic(run_ours, rounds=ROUNDS, warmup_rounds=0)
    tokens = BATCH * NEW_TOKENS
    results = {
        "model": MODEL, "batch": BATCH, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
        "threads": torch.get_num_threads(),
        # Which of the compiled decode kernels ran: the engine measures each against its PyTorch
        # operations once per machine and shape and keeps the faster (QWEN3REPRO_KERNELS=0: never).
        "kernel_isa": kernels.isa(),
        "kernel_choices": {k: v["choice"] for k, v in kernels.measured_choices().items()},
        "ours_s": ours_s, "transformers_s": hf_s,
        "ours_tokens_per_s": tokens / ours_s, "transformers_tokens_per_s": tokens / hf_s,
        # The median over the pairs of each pair's ratio (the times above are each side's median).
        "speedup_vs_transformers": statistics.median(p[2] / p[0] for p in pairs),
        "speedup_by_pair": [round(p[2] / p[0], 3) for p in pairs],
        "ours_cpu_s": ours_cpu, "transformers_cpu_s": hf_cpu,
        "cpu_time_speedup_vs_transformers": statistics.median(p[3] / p[1] for p in pairs),
    }
    benchmark.extra_info.update(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "generate.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = (f"  {k:34s} {v:.4g}" if isinstance(v, float) else f"  {k:34s} {v}" for k, v in results.items())
    print("\n" + "\n".join(lines))
    assert results["speedup_vs_transformers"] > 0
