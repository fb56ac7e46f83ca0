"""The plan of a full-scale run: parallel layout, per-GPU memory, tokens per step, steps and time.

Pure arithmetic on the model config (no weights allocated, no nanotron import), so a plan is printed on any
machine. Memory per GPU, in bytes, for the pipeline stage that needs the most (the report prints it):

* weights: bf16, 2 bytes per parameter held by the GPU. A GPU holds its pipeline stage's blocks; matrices
  (embedding, attention and MLP projections, experts, LM head) are split over TP, norms and the MoE router
  are replicated.
* gradients: 4 bytes per parameter (nanotron accumulates gradients in fp32: `accumulate_grad_in_fp32`).
* optimizer states with ZeRO-1: fp32 master weights + Adam m + v = 12 bytes per parameter, divided by dp.
* activations (bf16, no recomputation: 0.4 has none), per token per decoder layer:
  `8h + (6(nq + nkv)·d + 8·I_tok)/tp` bytes, where h is hidden, nq/nkv the heads, d head_dim and I_tok the MLP
  width a token goes through (I for dense, k·I_moe for MoE). It counts the saved inputs of the two norms and of
  the qkv and gate/up projections (4 × 2h = 8h); q and k before QK-norm (2(nq + nkv)d), q, k after norm and RoPE
  and v (2(nq + 2nkv)d) and the attention output (2nq·d), together 6(nq + nkv)d; and the MLP's gate/up output,
  SiLU output and product (8·I_tok). MoE layers add the router's fp32 logits and probabilities (8E) and the k
  gathered token copies (2k·h). Flash attention keeps no S×S matrix. The last stage adds the fp32 logits and
  their softmax gradient: 8·V/tp bytes per token. With the 1F1B engine stage r holds min(pp − r, n_micro)
  micro-batches in flight (pp = 1: one).
  With activation recomputation (`recompute_layers`, our model's per-layer checkpointing) a layer in flight
  keeps only its input, 2h bytes per token, and one layer's full activations exist at a time (backward).
* Not counted: NCCL/allocator overhead and fragmentation (budget ~10%), temporary all-reduce buffers.

Time: steps × (training FLOPs per step, `perf.train_step_flops`) / (GPUs × peak bf16 FLOP/s × MFU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import ModelConfig
from ..perf import train_step_flops

GIB = 1024**3


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def check(self) -> list[str]:
        problems = []
        if self.world % (self.tp * self.pp):
            problems.append(f"world size {self.world} is not divisible by tp*pp = {self.tp * self.pp}")
        elif self.dp * self.tp * self.pp != self.world:
            problems.append(f"dp*tp*pp = {self.dp * self.tp * self.pp} != world size {self.world}")
        if self.tp > self.gpus_per_node:
            problems.append(f"tp={self.tp} spans more than one node ({self.gpus_per_node} GPUs per node)")
        return problems


# ----------------------------------------------------------------------------------- parameter counts
def layer_parameters(config: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(TP-sharded, replicated) parameter counts of one decoder layer."""
    h, d, nq, nkv = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads
    sharded = h * (nq + 2 * nkv) * d + nq * d * h
    replicated = 2 * d + 2 * h  # q_norm, k_norm, the two layer norms
    if config.is_sparse_layer(layer_idx):
        sharded += config.num_experts * 3 * h * config.moe_intermediate_size
        replicated += config.num_experts * h  # router
    else:
        sharded += 3 * h * config.intermediate_size
    return sharded, replicated


def layer_cost(config: ModelConfig) -> int:
    """Per-layer compute weight used to balance pipeline stages (as `Qwen3ForTraining.get_block_compute_costs`)."""
    h, d = config.hidden_size, config.head_dim
    attn = h * (config.num_attention_heads + 2 * config.num_key_value_heads) * d + config.num_attention_heads * d * h
    width = config.num_experts_per_tok * config.moe_intermediate_size if config.is_moe else config.intermediate_size
    return attn + 3 * h * width


def pipeline_assignment(config: ModelConfig, pp: int) -> list[int]:
    """Pipeline rank of each block [embedding, layer 0..L-1, final norm, lm_head, loss], as nanotron 0.4's
    `build_model` places them: cumulative FLOP cost against equal thresholds (the embedding costs 0)."""
    costs = [0] + [layer_cost(config)] * config.num_hidden_layers + [0, config.vocab_size * config.hidden_size, 0]
    total = sum(costs)
    thresholds = [total * (r + 1) / pp for r in range(pp)]
    ranks, rank, cum = [], 0, 0
    for c in costs:
        cum += c
        ranks.append(rank)
        if cum > thresholds[rank]:
            rank += 1
    return ranks


def stage_parameters(config: ModelConfig, tp: int, pp: int) -> list[dict]:
    """Per pipeline stage: parameters held by one GPU (after TP), and the decoder layers it runs."""
    ranks = pipeline_assignment(config, pp)
    h, v = config.hidden_size, config.vocab_size
    stages = [dict(params=0, sharded=0, replicated=0, layers=[], first=False, last=False) for _ in range(pp)]
    stages[ranks[0]]["sharded"] += v * h
    stages[ranks[0]]["first"] = True
    for i in range(config.num_hidden_layers):
        s, r = layer_parameters(config, i)
        st = stages[ranks[1 + i]]
        st["sharded"] += s
        st["replicated"] += r
        st["layers"].append(i)
    stages[ranks[-3]]["replicated"] += h  # final norm
    lm_rank = ranks[-2]
    stages[lm_rank]["last"] = True
    if not config.tie_word_embeddings or lm_rank != ranks[0]:
        stages[lm_rank]["sharded"] += v * h  # untied head, or a tied copy on another stage
    for st in stages:
        st["params"] = st["sharded"] // tp + st["replicated"]
    return stages


# ----------------------------------------------------------------------------------- activations
def activation_bytes_per_token_layer(config: ModelConfig, layer_idx: int, tp: int) -> float:
    """Module doc: 8h + (6(nq+nkv)d + 8·I_tok)/tp (+ MoE router and token copies)."""
    h, d, nq, nkv = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads
    if config.is_sparse_layer(layer_idx):
        width = config.num_experts_per_tok * config.moe_intermediate_size
        extra = 8 * config.num_experts + 2 * config.num_experts_per_tok * h
    else:
        width, extra = config.intermediate_size, 0
    return 8 * h + (6 * (nq + nkv) * d + 8 * width) / tp + extra


@dataclass
class RunPlan:
    """The plan of one full-scale stage: its layout and batch, the memory per GPU and the time it takes."""

    model: str
    stage: str
    layout: Layout
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    tokens: int
    lr: float
    zero_stage: int = 1
    recompute: bool = False
    gpu_memory_gib: float = 80.0
    peak_tflops: float = 989.0
    mfu: float = 0.4
    config: ModelConfig | None = field(default=None, repr=False)
    train_steps: int | None = None  # the generated config's step count (tokens / tokens per step, rounded up)

    # ---------------------------------------------------------------- batch arithmetic
    @property
    def global_batch_seqs(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.layout.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_seqs * self.seq_len

    @property
    def steps(self) -> int:
        return self.train_steps or max(1, math.ceil(self.tokens / self.tokens_per_step))

    # ---------------------------------------------------------------- memory
    def memory(self) -> dict:
        """Bytes per GPU for the worst pipeline stage: weights, gradients, optimizer, activations, total."""
        c, lay = self.config, self.layout
        worst = None
        for rank, st in enumerate(stage_parameters(c, lay.tp, lay.pp)):
            p = st["params"]
            weights, grads = 2 * p, 4 * p
            optim = 12 * p / (lay.dp if self.zero_stage >= 1 else 1)
            in_flight = min(lay.pp - rank, self.grad_accum) if lay.pp > 1 else 1
            tokens = self.micro_batch_size * self.seq_len
            per_layer = [activation_bytes_per_token_layer(c, i, lay.tp) for i in st["layers"]]
            if self.recompute:
                act = (2 * c.hidden_size * len(per_layer) * in_flight + max(per_layer, default=0)) * tokens
            else:
                act = sum(per_layer) * tokens * in_flight
            if st["first"]:
                act += 2 * c.hidden_size * tokens * in_flight  # embedding output
            if st["last"]:
                act += 8 * c.vocab_size / lay.tp * tokens
            total = weights + grads + optim + act
            entry = dict(stage=rank, params=p, layers=len(st["layers"]), weights=weights, gradients=grads,
                         optimizer=optim, activations=act, total=total, in_flight=in_flight)
            if worst is None or total > worst["total"]:
                worst = entry
        return worst

    # ---------------------------------------------------------------- time
    @property
    def flops_per_step(self) -> float:
        return train_step_flops(self.config, self.global_batch_seqs, self.seq_len)

    @property
    def seconds(self) -> float:
        return self.steps * self.flops_per_step / (self.layout.world * self.peak_tflops * 1e12 * self.mfu)

    def render(self) -> str:
        lay, mem = self.layout, self.memory()
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        fits = mem["total"] <= self.gpu_memory_gib * GIB
        days = self.seconds / 86400
        lines = [
            f"plan: {self.model} · stage {self.stage}",
            f"  layout      {lay.nodes} node(s) x {lay.gpus_per_node} GPUs = {lay.world} GPUs: "
            f"dp={lay.dp} tp={lay.tp} pp={lay.pp} (dp*tp*pp = {lay.dp * lay.tp * lay.pp}), ZeRO-{self.zero_stage}, "
            f"TP mode all_reduce, PP engine 1f1b",
            f"  sequence    {self.seq_len} tokens, RoPE base {self.config.rope_theta:g}",
            f"  batch       micro {self.micro_batch_size} x accumulation {self.grad_accum} x dp {lay.dp} = "
            f"{self.global_batch_seqs} sequences = {self.tokens_per_step:,} tokens per step",
            f"  schedule    {self.tokens:,} tokens -> {self.steps:,} steps ({self.steps * self.tokens_per_step:,} tokens), "
            f"peak LR {self.lr:.3g}",
            f"  memory/GPU  (worst pipeline stage {mem['stage']}: {mem['layers']} layers, {mem['params']:,} parameters)",
            f"    weights (bf16)             {g(mem['weights'])}",
            f"    gradients (fp32 accum.)    {g(mem['gradients'])}",
            f"    optimizer (ZeRO-1, /dp)    {g(mem['optimizer'])}",
            f"    activations                {g(mem['activations'])}  ({mem['in_flight']} micro-batch(es) in flight, "
            + ("layers recomputed in backward)" if self.recompute else "no recomputation)"),
            f"    total                      {g(mem['total'])}  of {self.gpu_memory_gib:g} GiB: "
            + ("fits" if fits else "DOES NOT FIT: use more TP/PP or a smaller micro-batch"),
            f"  compute     {self.flops_per_step:.3e} FLOPs per step; at MFU {self.mfu:.0%} of "
            f"{self.peak_tflops:g} TFLOP/s per GPU: {self.seconds / self.steps:.2f} s per step, "
            f"{self.seconds / 3600:,.1f} h ({days:,.1f} days) for the stage",
        ]
        return "\n".join(lines)


__all__ = [
    "Layout", "RunPlan", "layer_parameters", "stage_parameters", "pipeline_assignment",
    "activation_bytes_per_token_layer", "GIB",
]
