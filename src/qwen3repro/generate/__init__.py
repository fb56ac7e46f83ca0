"""The generation engine: one batched, KV-cached sampler for evals, RL rollouts, candidate
generation, distillation and chat.

    gens = generate(model, [prompt_ids, ...], THINKING_SAMPLING, max_new_tokens=256,
                    stop_token_ids=[tok.eos_token_id], tokenizer=tok, thinking_budget=64,
                    return_logprobs=True, seed=0)
    gens[i].token_ids, gens[i].logprobs, gens[i].finish_reason

Rooms, each with a docstring on what it holds and why:

    sampling.py  SamplingParams, the report's presets, the filters (presence penalty, temperature,
                 top-k, top-p, min-p) and the draw (`sample`; the compiled top-k kernel where it fits)
    budget.py    the thinking budget (report §4.3): `ThinkingBudget` and the per-batch
                 `ThinkingController`, whose `step` picks each token when a budget is set
    dense.py     `DenseDecodeStep`, the fast prefill and decode step of a dense full-precision Qwen3
                 (with the compiled attention kernel of `qwen3repro.kernels` on a CPU, when built)
    engine.py    `generate` and `Generation`: batching, padding, prefill, the decode loop, stopping
                 and log-probs, and `ModelForwardStep`, the decode step through `model.forward`

The compiled kernels are optional: without a C compiler, or with `QWEN3REPRO_KERNELS=0`, the same
arithmetic runs as PyTorch operations, which are the reference the kernels are tested against. Where
both can run, each kernel is timed against its PyTorch operations once per machine and shape
(`qwen3repro.kernels.faster`), and the faster runs.
"""
from __future__ import annotations

from .budget import ThinkingBudget, ThinkingController
from .dense import DenseDecodeStep
from .engine import Generation, ModelForwardStep, generate
from .sampling import (
    GREEDY,
    NON_THINKING_SAMPLING,
    THINKING_SAMPLING,
    SamplingParams,
    apply_min_p,
    apply_presence_penalty,
    apply_top_k,
    apply_top_p,
    sample,
    sampling_logits,
)

__all__ = [
    "Generation",
    "SamplingParams",
    "ThinkingBudget",
    "ThinkingController",
    "THINKING_SAMPLING",
    "NON_THINKING_SAMPLING",
    "GREEDY",
    "generate",
    "sample",
    "apply_presence_penalty",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "sampling_logits",
    "DenseDecodeStep",
    "ModelForwardStep",
]
