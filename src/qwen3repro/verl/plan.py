"""The plan of a verl stage: GPUs, per-GPU memory of training and of rollout, and time. Pure arithmetic.

Training memory per GPU (bytes; P = parameters one GPU holds):

* FSDP (verl's `engine/fsdp.yaml`: `model_dtype: fp32`, mixed precision bf16): the fp32 parameters, fp32 gradients
  and Adam's fp32 m, v are all sharded over the N GPUs: 16 · params / N; plus the bf16 copy of the unit being
  computed (one decoder layer, gathered; two with prefetch).
* Megatron (`engine/megatron.yaml`: bf16 model, `main_grads_dtype: fp32`, `use_distributed_optimizer: True`):
  P = dense / (TP·PP) + experts / (EP·ETP·PP); bf16 weights 2P, fp32 main gradients 4P, and the distributed
  optimizer's fp32 master + m + v, 12 bytes per parameter sharded over the data-parallel ranks of that parameter
  (dense: N / (TP·PP); experts: N / (EP·ETP·PP)). The embedding and LM head are averaged over the stages.
* Activations, with recomputation (FSDP `enable_gradient_checkpointing`; Megatron full recomputation, set by the
  generator): every layer in flight keeps its bf16 input, 2h per token, for each micro-batch in flight (1F1B: PP on
  the first stage), and one layer's full activations exist during its backward. Per token and layer the latter
  is `nanotron.plan.activation_bytes_per_token_layer` (calibrated on what autograd saves in our Qwen3 layer; an
  estimate for Megatron's, whose sequence parallelism would divide the replicated terms by TP).
* The last stage's logits: `nanotron.plan.final_bytes_per_token` (fp32 logits and the softmax saved by the loss).

Rollout memory (verl's hybrid engine: vLLM shares the GPUs with the actor): vLLM takes
`gpu_memory_utilization` of each GPU for its weights (bf16, total / rollout TP) and KV cache; the actor's
training state stays resident unless offloaded. KV bytes per token on one GPU: 2 (K, V) · 2 bytes · head_dim ·
layers · ceil(KV heads / rollout TP) (vLLM replicates KV heads when TP exceeds them). A plan fits when both
phases stay within `nanotron.plan.MEMORY_HEADROOM` of the GPU, the same 90% rule as the nanotron plans.

Time per step = rollout + teacher scoring + training:
rollout = generated tokens / (assumed decode tokens/s per GPU × GPUs); training FLOPs =
ppo_epochs × 6·N·tokens (+ attention, `perf.train_step_flops`) + one forward (2·N·tokens) for the old log-probs
(+ one for the reference model when a KL loss needs it), at the assumed MFU; the teacher's prefill is one forward
of the teacher over prompt + response on its own GPUs. Mean lengths are an assumed share of the maxima.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig
from ..models.registry import count_parameters
from ..nanotron.plan import (
    BF16, FP32, GIB, MEMORY_HEADROOM, activation_bytes_per_token_layer, checkpoint_bytes_per_token_layer,
    final_bytes_per_token,
)
from ..perf import train_step_flops

__all__ = ["Resources", "expert_parameters", "train_memory", "rollout_memory", "kv_bytes_per_token",
           "step_seconds", "GIB", "MEMORY_HEADROOM"]

FSDP_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 parameters, fp32 gradients, Adam m and v: all sharded
MEGATRON_WEIGHT_BYTES, MEGATRON_GRAD_BYTES, MEGATRON_OPTIM_BYTES = BF16, FP32, 3 * FP32
FSDP_GATHERED_UNITS = 2  # the layer being computed and the prefetched next one, bf16


@dataclass(frozen=True)
class Resources:
    """What one stage × model runs on: the actor/rollout pool and the layout."""

    nodes: int
    gpus_per_node: int
    strategy: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    rollout_tp: int = 1

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        """Data-parallel ranks of the actor (FSDP shards over all of them)."""
        return self.gpus // (self.tp * self.pp) if self.strategy == "megatron" else self.gpus


def expert_parameters(config: ModelConfig) -> int:
    if not config.is_moe:
        return 0
    per_layer = config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size
    return per_layer * sum(1 for i in range(config.num_hidden_layers) if config.is_sparse_layer(i))


def train_memory(config: ModelConfig, res: Resources, tokens_per_micro: int, offload: bool) -> dict[str, Any]:
    """Bytes per GPU of the actor update (module doc), each term and the total; `resident` is what stays on the GPU
    while vLLM generates (0 with offload)."""
    total = count_parameters(config)["total"]
    layers_on_stage = math.ceil(config.num_hidden_layers / res.pp)
    if res.strategy == "fsdp":
        state = FSDP_BYTES_PER_PARAM * total / res.gpus
        layer = (total - config.vocab_size * config.hidden_size) / config.num_hidden_layers
        gathered = FSDP_GATHERED_UNITS * BF16 * layer
        weights, grads, optim = 4 * total / res.gpus, 4 * total / res.gpus, 8 * total / res.gpus
        act_tp = 1
    else:
        experts = expert_parameters(config)
        dense_gpu = (total - experts) / (res.tp * res.pp)
        expert_gpu = experts / (res.ep * res.etp * res.pp)
        p = dense_gpu + expert_gpu
        weights, grads = MEGATRON_WEIGHT_BYTES * p, MEGATRON_GRAD_BYTES * p
        optim = (MEGATRON_OPTIM_BYTES * dense_gpu / max(1, res.gpus // (res.tp * res.pp))
                 + MEGATRON_OPTIM_BYTES * expert_gpu / max(1, res.gpus // (res.ep * res.etp * res.pp)))
        state, gathered, act_tp = weights + grads + optim, 0.0, res.tp
    in_flight = res.pp  # 1F1B: the first stage holds pp micro-batches (1 without a pipeline)
    per_layer = max(activation_bytes_per_token_layer(config, i, act_tp) for i in range(config.num_hidden_layers))
    kept = checkpoint_bytes_per_token_layer(config) * layers_on_stage * tokens_per_micro * in_flight
    activations = kept + per_layer * tokens_per_micro
    logits = final_bytes_per_token(config, act_tp) * tokens_per_micro
    peak = state + gathered + activations + logits
    return dict(weights=weights, gradients=grads, optimizer=optim, gathered=gathered, activations=activations,
                logits=logits, total=peak, resident=0.0 if offload else state)


def kv_bytes_per_token(config: ModelConfig, rollout_tp: int) -> int:
    """KV-cache bytes one token takes on one GPU of a vLLM replica (module doc)."""
    heads = math.ceil(config.num_key_value_heads / rollout_tp)
    return 2 * BF16 * config.head_dim * config.num_hidden_layers * heads


def rollout_memory(config: ModelConfig, rollout_tp: int, utilization: float, gpu_gib: float, seq_tokens: int,
                   sequences_per_replica: int) -> dict[str, Any]:
    """vLLM's share of one GPU: weights, the KV cache left for sequences, and how many run at once."""
    budget = utilization * gpu_gib * GIB
    weights = BF16 * count_parameters(config)["total"] / rollout_tp
    kv_room = budget - weights
    per_seq = kv_bytes_per_token(config, rollout_tp) * seq_tokens
    concurrent = max(0, int(kv_room // per_seq)) if kv_room > 0 else 0
    return dict(budget=budget, weights=weights, kv_room=kv_room, kv_per_sequence=per_seq, concurrent=concurrent,
                waves=math.ceil(sequences_per_replica / concurrent) if concurrent else None)


def step_seconds(config: ModelConfig, res: Resources, *, sequences: int, prompt_tokens: float,
                 response_tokens: float, ppo_epochs: int, with_reference: bool, tokens_per_s_per_gpu: float,
                 peak_tflops: float, mfu: float, teacher: ModelConfig | None = None,
                 teacher_gpus: int = 0) -> dict[str, float]:
    """Seconds of one step, by phase (module doc). Lengths are the assumed means."""
    seq_len = max(1, int(prompt_tokens + response_tokens))
    rollout = sequences * response_tokens / (tokens_per_s_per_gpu * res.gpus)
    full = train_step_flops(config, sequences, seq_len)  # forward + backward of every token once
    forwards = 1 + (1 if with_reference else 0)  # old log-probs, reference log-probs
    flops = ppo_epochs * full + forwards * full / 3
    rate = peak_tflops * 1e12 * mfu
    training = flops / (res.gpus * rate)
    scoring = (train_step_flops(teacher, sequences, seq_len) / 3 / (teacher_gpus * rate)
               if teacher is not None and teacher_gpus else 0.0)
    return dict(rollout=rollout, teacher=scoring, training=training, total=rollout + scoring + training,
                flops=flops)
