"""The plan of a full-scale run: parallel layout, per-GPU memory, tokens per step, steps and time.

Pure arithmetic on the model config (no weights allocated, no nanotron import), so a plan is printed on any
machine. Memory per GPU, in bytes, for the pipeline stage that needs the most (the report prints it). A GPU holds
its pipeline stage's blocks; matrices (embedding, attention and MLP projections, experts, LM head) are split over
TP, norms and the MoE router are replicated. P is the number of parameters one GPU holds.

What nanotron 0.4 allocates per parameter, with `accumulate_grad_in_fp32: true` and ZeRO-1 (our configs). Read
from `optim/gradient_accumulator.py` (`FP32GradientAccumulator`), `optim/zero.py` (`ZeroDistributedOptimizer`),
`helpers.py` (`init_optimizer_and_grad_accumulator`) and `trainer.py` (no DDP wrapper with that pair of settings,
so no DDP bucket buffers; the DP gradient sync is an in-place all-reduce of the fp32 buffer):

* weights: bf16, 2P.
* fp32 gradient accumulators: 4P. `build_grad_buffers` allocates them for *every* parameter of the stage (not
  sharded by ZeRO-1: each DP rank accumulates all gradients and all-reduces them at the end of the step).
* bf16 gradients: 2P. Autograd writes each parameter's `.grad` in bf16; `FP32GradientAccumulator.backward` adds
  them to the fp32 buffers and drops them only after the whole backward, so at the end of every micro-batch's
  backward the stage holds a bf16 gradient for every parameter, on top of the fp32 buffers.
* optimizer, ZeRO-1: fp32 master weights (the accumulator's `big_flat_buffer`, built from this DP rank's slices
  only) 4P/dp + Adam's fp32 m and v 8P/dp = 12P/dp.
* MoE backward workspace: `Experts` takes its per-expert weights with `unbind(0)`, whose backward holds every
  expert's gradient piece until it stacks them into `.grad`: 2 bytes x one sparse layer's expert parameters
  (per GPU), one layer at a time.
* optimizer step: ZeRO-1 all-gathers the updated bf16 weights through `all_gather_coalesced`, which flattens
  them into new buffers, 2P(1 + 1/dp) when dp > 1. Activations and bf16 gradients are gone by then, so the
  step's peak is max'ed against the backward's, not added to it.

Activations (bf16 model; per token per decoder layer; t = tp, h hidden, nq/nkv heads, d head_dim, I the dense MLP
width, E experts, k experts per token, I_e an expert's width). What autograd saves for backward on the code the
full scale trains (`Qwen3NTDecoderLayer`, ALL_REDUCE TP, flash-attn varlen), calibrated against a measurement of
the saved tensors (tests/test_nanotron_memory.py: each storage once at its full size, since a view keeps its base
alive; exact up to a few bytes per sequence):

    A_layer = 16h + 8 + 4d                                   replicated over TP: the two layer norms, RoPE tables
            + (12(nq + nkv)d + 8nq + 4nkv) / t               attention, heads split over TP
            + 8I / t                                         dense MLP
         or + 8E + 6kh + 30k + 4 + 8k·I_e / t                MoE layer (router and dispatch replicated,
                                                                   experts split over TP)

term by term:

* layer norms, 2 x (8h + 4): RMSNorm normalises in fp32, so each norm keeps the fp32 copy of its input (4h) and
  its fp32 1/rms (4), the bf16 normalised x (2h, for the weight's gradient) and its bf16 output (2h, saved by the
  projection that follows). The layer's bf16 input itself is not kept (the first norm saves its fp32 copy).
* RoPE tables: cos and sin, bf16 [tokens, d] each, rebuilt and kept by every layer: 4d.
* attention: the fused qkv output, kept whole because v (a view of it) goes to flash-attn: 2(nq + 2nkv)d; the
  QK-norms' fp32 copies 4(nq + nkv)d, bf16 normalised q, k 2(nq + nkv)d and fp32 1/rms per head 4(nq + nkv); the
  RoPE'd q and k that flash-attn saves 2(nq + nkv)d; its output 2nq·d (also o_proj's input) and its fp32
  softmax log-sum-exp 4nq. Together 12(nq + nkv)d + 8nq + 4nkv. Flash-attn keeps no S x S matrix, so the bytes
  per token do not depend on the sequence length.
* dense MLP: the gate/up output (4I, kept whole because SiLU and the product save views of it), the SiLU output
  (2I) and the product saved by down_proj (2I): 8I.
* MoE layer: the router's softmax and the load-balancing loss's softmax, both fp32 over all E experts (8E); the
  top-k ids (int64, 8k), the fp32 top-k weights and their sum (4k + 4); the sort order and token ids of the
  dispatch (int64, 16k) and the k selected weights in bf16 (2k); three token copies of k·h each, replicated over
  TP: the gathered inputs, the concatenated expert outputs and the weighted outputs that `index_add_` saves (6kh);
  and per routed token the experts' own 8·I_e / t, as the dense MLP. 30k + 4 collects the small terms.

Per pipeline stage, with m micro-batches in flight (1F1B: stage r holds min(pp − r, micro-batches) of them; one
for pp = 1 and on the last stage):

* without recomputation: m · Σ_layers A_layer · tokens;
* with per-layer recomputation (`recompute_layers`: torch.utils.checkpoint around each decoder layer, our model's;
  0.4 has none): a layer in flight keeps only its input, 2h per token, plus the int64 position ids (8 per token,
  one tensor shared by the stage's layers); in backward one layer is re-run at a time, so one layer's A_layer
  exists once: m · (2h · layers + 8) · tokens + max A_layer · tokens;
* first stage: the embedding keeps the int64 token ids, 8 per token per micro-batch in flight;
* last stage: the final norm (8h + 4) and the LM head's logits: the fp32 logits and the shifted copy that becomes
  the softmax nanotron's `sharded_cross_entropy` saves are alive together, 8V/t per token, one micro-batch.

Not counted, and left to the 10% that `MEMORY_HEADROOM` keeps free: the CUDA context and NCCL buffers, allocator
fragmentation, and the activation gradients of the layer being back-propagated (about one layer's activations).
A plan `fits` when its worst stage needs at most 90% of the GPU's memory.

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


# ----------------------------------------------------------------------------------- memory constants
# Bytes per element of the dtypes the generated config trains with (checked on the YAML by the config tests).
BF16, FP32, INT64 = 2, 4, 8
# Bytes per parameter nanotron 0.4 allocates (module doc: FP32GradientAccumulator, ZeroDistributedOptimizer).
WEIGHT_BYTES = BF16  # the model's weights
FP32_GRAD_BYTES = FP32  # the accumulator's fp32 gradient buffers, every parameter of the stage
BF16_GRAD_BYTES = BF16  # autograd's `.grad`, alive until the accumulator folds it in after the backward
OPTIMIZER_BYTES = 3 * FP32  # fp32 master weights + Adam m + v, divided by dp (ZeRO-1)
# "Fits" means the worst stage needs at most this share of the GPU's memory. The rest is for what the plan does not
# count: the CUDA context and NCCL buffers (a few GiB), allocator fragmentation, and the activation gradients of the
# layer being back-propagated. The 90% rule is full/README.md's ("Memory per GPU").
MEMORY_HEADROOM = 0.9


# ----------------------------------------------------------------------------------- activations
def activation_bytes_per_token_layer(config: ModelConfig, layer_idx: int, tp: int) -> float:
    """Bytes one decoder layer saves for backward per token (module doc, A_layer), on one GPU of a TP group."""
    h, d, nq, nkv = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads
    norms = 2 * (FP32 * h + FP32 + BF16 * h + BF16 * h)  # fp32 input copy, fp32 1/rms, normalised x, output
    rope = 2 * BF16 * d  # cos and sin tables
    attention = (
        BF16 * (nq + 2 * nkv) * d  # fused qkv output, kept whole by v's view
        + (FP32 + BF16) * (nq + nkv) * d + FP32 * (nq + nkv)  # QK-norm: fp32 copies, normalised, 1/rms per head
        + BF16 * (nq + nkv) * d  # RoPE'd q and k (flash-attn's inputs)
        + BF16 * nq * d + FP32 * nq  # flash-attn output and its fp32 log-sum-exp
    ) / tp
    replicated = norms + rope
    if config.is_sparse_layer(layer_idx):
        e, k = config.num_experts, config.num_experts_per_tok
        router = (2 * FP32 * e  # softmax of the router and of the load-balancing loss
                  + INT64 * k + FP32 * k + FP32)  # top-k ids, fp32 top-k weights and their sum
        dispatch = 2 * INT64 * k + BF16 * k + 3 * BF16 * k * h  # sort order, token ids, weights; 3 token copies
        replicated += router + dispatch
        width = k * config.moe_intermediate_size  # each routed token goes through one expert's MLP
    else:
        width = config.intermediate_size
    mlp = (2 + 1 + 1) * BF16 * width / tp  # gate/up output (2 x width, kept whole by views), SiLU output, product
    return replicated + attention + mlp


def checkpoint_bytes_per_token_layer(config: ModelConfig) -> int:
    """With recomputation: what a layer keeps for backward per token, its bf16 input."""
    return BF16 * config.hidden_size


def final_bytes_per_token(config: ModelConfig, tp: int) -> float:
    """Last stage, one micro-batch: the final norm (as a layer norm above) and the fp32 logits with the shifted
    copy that becomes the softmax `sharded_cross_entropy` saves (both alive in its forward)."""
    h = config.hidden_size
    return (FP32 * h + FP32 + 2 * BF16 * h) + 2 * FP32 * config.vocab_size / tp


def expert_grad_workspace(config: ModelConfig, layers: list[int], tp: int) -> int:
    """Bytes of the per-expert gradient pieces one sparse layer's backward holds before stacking them (bf16)."""
    if not any(config.is_sparse_layer(i) for i in layers):
        return 0
    return BF16 * config.num_experts * 3 * config.hidden_size * config.moe_intermediate_size // tp


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
        """Bytes per GPU for the worst pipeline stage: each term of the module doc, and the total (the peak of the
        backward, or of the optimizer step where that is higher)."""
        c, lay = self.config, self.layout
        tokens = self.micro_batch_size * self.seq_len
        worst = None
        for rank, st in enumerate(stage_parameters(c, lay.tp, lay.pp)):
            p = st["params"]
            weights, grads, grads_bf16 = WEIGHT_BYTES * p, FP32_GRAD_BYTES * p, BF16_GRAD_BYTES * p
            optim = OPTIMIZER_BYTES * p / (lay.dp if self.zero_stage >= 1 else 1)
            in_flight = min(lay.pp - rank, self.grad_accum) if lay.pp > 1 else 1
            per_layer = [activation_bytes_per_token_layer(c, i, lay.tp) for i in st["layers"]]
            if self.recompute:
                # each layer's input, plus the int64 position ids its checkpoint keeps (one tensor for the stage),
                # for every micro-batch in flight; in backward, one re-run layer's full activations
                kept = checkpoint_bytes_per_token_layer(c) * len(per_layer) + (INT64 if per_layer else 0)
                act = kept * tokens * in_flight + max(per_layer, default=0) * tokens
            else:
                act = sum(per_layer) * tokens * in_flight
            if st["first"]:
                act += INT64 * tokens * in_flight  # the embedding's token ids
            if st["last"]:
                act += final_bytes_per_token(c, lay.tp) * tokens
            workspace = expert_grad_workspace(c, st["layers"], lay.tp)
            gather = WEIGHT_BYTES * p * (1 + 1 / lay.dp) if lay.dp > 1 and self.zero_stage >= 1 else 0
            backward = grads_bf16 + act + workspace
            total = weights + grads + optim + max(backward, gather)  # two peaks: they never coexist
            entry = dict(stage=rank, params=p, layers=len(st["layers"]), weights=weights, gradients=grads,
                         gradients_bf16=grads_bf16, optimizer=optim, activations=act, workspace=workspace,
                         step_buffers=gather, total=total, in_flight=in_flight,
                         peak="optimizer step" if gather > backward else "backward")
            if worst is None or total > worst["total"]:
                worst = entry
        return worst

    @property
    def memory_limit(self) -> float:
        """Bytes a plan may use per GPU: `MEMORY_HEADROOM` of the GPU's memory."""
        return MEMORY_HEADROOM * self.gpu_memory_gib * GIB

    @property
    def fits(self) -> bool:
        """Whether the worst pipeline stage fits in `MEMORY_HEADROOM` (90%) of the GPU's memory."""
        return self.memory()["total"] <= self.memory_limit

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
        limit = f"{MEMORY_HEADROOM:.0%} of {self.gpu_memory_gib:g} GiB"
        verdict = (f"fits in {limit}" if self.fits else
                   f"DOES NOT FIT in {limit} ({self.memory_limit / GIB:.1f} GiB): use recomputation, a smaller "
                   "micro-batch or more TP/PP")
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
            f"    gradients (bf16 .grad)     {g(mem['gradients_bf16'])}  (folded into fp32 after each backward)",
            f"    optimizer (ZeRO-1, /dp)    {g(mem['optimizer'])}  (fp32 master + Adam m, v)",
            f"    activations                {g(mem['activations'])}  ({mem['in_flight']} micro-batch(es) in flight, "
            + ("layers recomputed in backward)" if self.recompute else "no recomputation)"),
        ]
        if mem["workspace"]:
            lines.append(f"    expert-grad workspace      {g(mem['workspace'])}  (one MoE layer's backward)")
        if mem["step_buffers"]:
            lines.append(f"    step all-gather buffers    {g(mem['step_buffers'])}  (optimizer step: activations "
                         "and bf16 gradients are freed by then)")
        lines += [
            f"    total                      {g(mem['total'])}  (peak in the {mem['peak']}) of "
            f"{self.gpu_memory_gib:g} GiB: {verdict}",
            f"  compute     {self.flops_per_step:.3e} FLOPs per step; at MFU {self.mfu:.0%} of "
            f"{self.peak_tflops:g} TFLOP/s per GPU: {self.seconds / self.steps:.2f} s per step, "
            f"{self.seconds / 3600:,.1f} h ({days:,.1f} days) for the stage",
        ]
        return "\n".join(lines)


__all__ = [
    "Layout", "RunPlan", "layer_parameters", "stage_parameters", "pipeline_assignment",
    "activation_bytes_per_token_layer", "checkpoint_bytes_per_token_layer", "final_bytes_per_token",
    "expert_grad_workspace", "GIB", "MEMORY_HEADROOM",
]
