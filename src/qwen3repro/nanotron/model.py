"""Qwen3 (dense and MoE) on nanotron 0.4's parallel layers: `Qwen3ForTraining(NanotronModel)`.

Built as nanotron's own Llama is built, but for Qwen3, and with the math imported from the modules the tiny
model uses (`models.attention.RMSNorm`/`rotate`/`rope_tables`/`build_attention_mask`/`attend`,
`models.rope.rope_parameters`/`rope_cos_sin`, `models.moe.route`/`Experts`, `losses.load_balancing_loss`):

* token embedding: `TensorParallelEmbedding` (vocabulary split over TP);
* attention: one fused column-parallel `qkv_proj` with `contiguous_chunks=(nq·d, nkv·d, nkv·d)` and an
  explicit `head_dim` d (heads·d may differ from hidden, e.g. 0.6B), so each TP rank holds nq/tp query heads
  and nkv/tp KV heads (requires nkv % tp == 0: KV heads are never replicated, the generated layouts keep
  tp <= nkv); per-head QK-RMSNorm (replicated), RoPE with the stage's base (ABF) and optional YaRN;
  row-parallel `o_proj`;
* attention kernel: flash-attn (varlen, imported lazily, only on CUDA when installed) or torch SDPA
  otherwise, so the same class runs on CPU under gloo. Packed documents are separated by `position_ids`
  restarting at 0 (document masking on both paths);
* dense MLP: fused column-parallel `gate_up_proj` (chunks (I, I)), SwiGLU, row-parallel `down_proj`;
* MoE MLP: replicated router `gate` (softmax over all experts, top-k, renormalised); the experts are
  *tensor-parallel inside each expert*: every TP rank holds all E experts with 1/tp of each expert's
  intermediate size (gate/up split by rows, down by columns) and the outputs are summed over TP. nanotron 0.4
  has no expert parallelism (no all-to-all dispatch), so experts are never split *between* ranks;
* loss: `sharded_cross_entropy` over vocabulary-sharded logits, masked mean over `label_mask` (per micro-batch,
  or over the whole optimizer step after `weight_by_tokens`, as the SFT stages use it); for MoE plus
  `router_aux_loss_coef` x the load-balancing loss (below);
* one `PipelineBlock` per decoder layer (plus embedding, final norm, LM head, loss), balanced by FLOPs;
* initialisation (`init_model_randomly`): transformers' (normal(0, initializer_range), norms at 1), and the same
  weights for any TP/PP/DP layout given the seed: each parameter is drawn, unsharded, from generators seeded by
  the run's seed and the parameter's name, and each rank keeps its own shard (`_fill_normal_shard`).

Load balancing: `losses.load_balancing_loss` with scope "global" and the config's `lbl_layers` ("per_layer" by
default; module doc of `losses`). nanotron's pipeline engine runs one micro-batch at a time, and a layer sees only its
own rows, so neither can see the rest of the step. The global scope still holds: the trainer (`launch.py`) takes the
step's micro-batches from the loader before handing them to the engine and calls `count_experts(model,
micro_batches)`, a forward without autograd that counts top-k selections per sparse layer (`losses.ExpertCounts`)
and sums them over the pipeline group (layers live on different stages) and the data-parallel group (not TP: its
ranks hold identical routers and inputs), so f̄ covers every micro-batch of the step on every DP rank. Each sparse
layer then adds its term, the layer's `load_balancing_loss` divided by the number of sparse layers (both layer
settings are a mean over layers of such terms), to a running `aux_loss` tensor that travels with the hidden states
through the pipeline. P stays local: each micro-batch's term is the mean over its own rows, the engine divides by the
number of (equal-size) micro-batches and data parallelism averages gradients over ranks, which together give the
step's E·Σ_i f̄_i P̄_i.

Parallel layout per model (full/models.toml, full/README.md): TP inside a node (ALL_REDUCE mode) + DP with ZeRO-1
for every model: TP 1 (0.6B, 1.7B), 2 (4B), 4 (8B), 8 (14B) at 4k tokens, twice that (max 8) at 32k; 32B TP 8 x
PP 2; 30B-A3B TP 4 x PP 4; 235B-A22B TP 4 x PP 16 at 4k and PP 32 at 32k (no expert parallelism in 0.4); full/models.toml
is the source. Optional per-layer activation recomputation (`recompute_layers`), which 0.4 lacks, fits the 32k stages.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import field
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..losses import LBL_LAYERS, ExpertCounts, load_balancing_loss
from ..models.attention import RMSNorm, attend, build_attention_mask, rope_tables, rotate
from ..models.moe import Experts, route
from ..models.rope import rope_cos_sin, rope_parameters
from ..perf import train_step_flops
from .compat import import_nanotron, normalise_sharded_metadata

import_nanotron()

from nanotron import distributed as dist  # noqa: E402
from nanotron.models.base import NanotronModel, build_model  # noqa: E402
from nanotron.parallel import ParallelContext  # noqa: E402
from nanotron.parallel.parameters import NanotronParameter  # noqa: E402
from nanotron.parallel.pipeline_parallel.block import PipelineBlock  # noqa: E402
from nanotron.parallel.pipeline_parallel.p2p import P2P  # noqa: E402
from nanotron.parallel.pipeline_parallel.tensor_pointer import TensorPointer  # noqa: E402
from nanotron.parallel.sharded_parameters import SplitConfig, create_sharded_parameter_from_config  # noqa: E402
from nanotron.parallel.tensor_parallel.distributed_differentiable_primitives import (  # noqa: E402
    differentiable_all_reduce_sum,
    differentiable_identity,
)
from nanotron.parallel.tensor_parallel.enum import TensorParallelLinearMode  # noqa: E402
from nanotron.parallel.tensor_parallel.functional import sharded_cross_entropy  # noqa: E402
from nanotron.parallel.tensor_parallel.nn import (  # noqa: E402
    TensorParallelColumnLinear,
    TensorParallelEmbedding,
    TensorParallelRowLinear,
)
from nanotron.parallel.tied_parameters import create_pg_for_tied_weights, tie_parameters  # noqa: E402

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2")


# --------------------------------------------------------------------------------------------- config
# ModelConfig fields a nanotron run does not train with: dual chunk attention is an inference feature.
INFERENCE_ONLY_FIELDS = ("dual_chunk_attention_config",)
# What a nanotron run adds to the model: nanotron's marker of a model config, the attention kernel,
# activation recomputation per decoder layer (torch.utils.checkpoint; nanotron 0.4 has none of its own), and
# which rows share one f and P in the MoE load-balancing loss (`losses.LBL_LAYERS`).
NANOTRON_FIELDS = (
    ("is_qwen3_config", bool, True),
    ("attn_implementation", str, "auto"),
    ("recompute_layers", bool, False),
    ("lbl_layers", str, "per_layer"),
)


class _NanotronModelConfig:
    """The `model.model_config` section of a generated YAML: `ModelConfig`'s fields but the inference-only ones,
    and `NANOTRON_FIELDS` (the fields are generated from `ModelConfig`: see `Qwen3NTConfig` below).

    nanotron's loader builds it with `get_config_from_file(path, model_config_class=Qwen3NTConfig)`.
    """

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}")
        if self.lbl_layers not in LBL_LAYERS:
            raise ValueError(f"lbl_layers must be one of {LBL_LAYERS}, got {self.lbl_layers!r}")
        self.to_model_config()  # validates every field with ModelConfig's checks

    def to_model_config(self) -> ModelConfig:
        nanotron_only = {name for name, _, _ in NANOTRON_FIELDS}
        return ModelConfig.from_dict({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                      if f.name not in nanotron_only})

    @classmethod
    def from_model_config(cls, config: ModelConfig, **overrides: Any) -> "Qwen3NTConfig":
        d = config.to_dict()
        if d.pop("dual_chunk_attention_config", None) is not None:
            raise ValueError("dual chunk attention is an inference feature; it is not trained through nanotron")
        d["mlp_only_layers"] = list(d["mlp_only_layers"])
        d.update(overrides)
        return cls(**d)


def _nanotron_model_fields() -> list[tuple]:
    """`ModelConfig`'s fields as nanotron takes them, plus `NANOTRON_FIELDS`.

    nanotron builds the class from the YAML mapping (`Qwen3NTConfig(**model_config)`) and its trainer
    assigns fields (the padded vocabulary size), so the class is a mutable dataclass and a tuple default
    becomes a list (YAML has lists). nanotron's marker comes first among the defaulted fields, where
    nanotron's own configs put theirs, so the YAML reads in the same order.
    """
    required, defaulted = [], []
    for f in dataclasses.fields(ModelConfig):
        if f.name in INFERENCE_ONLY_FIELDS:
            continue
        if f.default is dataclasses.MISSING:
            required.append((f.name, f.type))
        elif isinstance(f.default, tuple):
            defaulted.append((f.name, list, field(default_factory=lambda default=f.default: list(default))))
        else:
            defaulted.append((f.name, f.type, f.default))
    (marker, *settings) = NANOTRON_FIELDS
    return required + [marker] + defaulted + settings


Qwen3NTConfig = dataclasses.make_dataclass(
    "Qwen3NTConfig", _nanotron_model_fields(), bases=(_NanotronModelConfig,),
    namespace={"__module__": __name__, "__doc__": _NanotronModelConfig.__doc__},
)


def _as_model_config(config: Union[Qwen3NTConfig, ModelConfig]) -> ModelConfig:
    return config.to_model_config() if isinstance(config, Qwen3NTConfig) else config


# ------------------------------------------------------------------------------------------- helpers
def check_tp(config: ModelConfig, tp: int) -> None:
    """The TP degrees this model supports: heads, KV heads, MLP/expert widths and vocabulary divisible by tp."""
    problems = []
    if config.num_attention_heads % tp:
        problems.append(f"num_attention_heads {config.num_attention_heads}")
    if config.num_key_value_heads % tp:
        problems.append(f"num_key_value_heads {config.num_key_value_heads} (KV heads are not replicated: tp <= KV heads)")
    if config.intermediate_size % tp and any(not config.is_sparse_layer(i) for i in range(config.num_hidden_layers)):
        problems.append(f"intermediate_size {config.intermediate_size}")
    if config.is_moe and config.moe_intermediate_size % tp:
        problems.append(f"moe_intermediate_size {config.moe_intermediate_size}")
    if config.vocab_size % tp:
        problems.append(f"vocab_size {config.vocab_size}")
    if problems:
        raise ValueError(f"tp={tp} does not divide: " + ", ".join(problems))


def segment_ids_from_positions(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Document ids [B, S] of packed sequences (a document starts where the position restarts at 0), or None
    when every row is one document (then the causal fast path applies)."""
    starts = position_ids == 0
    if bool(starts[:, 1:].any()):
        return starts.long().cumsum(-1)
    return None


def _flash_attention(q, k, v, segment_ids):
    """q [B, S, H, D], k/v [B, S, Hk, D] (post-RoPE) -> [B, S, H, D] with flash-attn's varlen kernel."""
    from flash_attn import flash_attn_varlen_func  # GPU only; imported on first use

    b, s = q.shape[:2]
    if segment_ids is None:
        seqlens = torch.full((b,), s, dtype=torch.int32, device=q.device)
    else:
        ids = segment_ids + (torch.arange(b, device=q.device) * (s + 1))[:, None]
        seqlens = torch.unique_consecutive(ids.reshape(-1), return_counts=True)[1].to(torch.int32)
    cu = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(
        q.reshape(b * s, *q.shape[2:]), k.reshape(b * s, *k.shape[2:]), v.reshape(b * s, *v.shape[2:]),
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=int(seqlens.max()), max_seqlen_k=int(seqlens.max()),
        causal=True,
    )
    return out.view(b, s, *q.shape[2:])


def _use_flash(impl: str, x: torch.Tensor) -> bool:
    if impl == "sdpa":
        return False
    if impl == "flash_attention_2":
        return True
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------- modules
class Qwen3NTAttention(nn.Module):
    def __init__(self, config: ModelConfig, tp_pg, tp_mode, async_comm: bool, attn_implementation: str) -> None:
        super().__init__()
        tp = tp_pg.size()
        self.n_q, self.n_kv, self.d = config.num_attention_heads // tp, config.num_key_value_heads // tp, config.head_dim
        nq, nkv, d, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.qkv_proj = TensorParallelColumnLinear(
            h, (nq + 2 * nkv) * d, pg=tp_pg, mode=tp_mode, bias=False, async_communication=async_comm,
            contiguous_chunks=(nq * d, nkv * d, nkv * d),
        )
        self.o_proj = TensorParallelRowLinear(nq * d, h, pg=tp_pg, mode=tp_mode, bias=False, async_communication=async_comm)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.attn_implementation = attn_implementation

    def forward(self, x, cos, sin, segment_ids):
        b, s, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.n_q * self.d, self.n_kv * self.d, self.n_kv * self.d], dim=-1)
        q = rotate(self.q_norm(q.view(b, s, self.n_q, self.d)), cos, sin)
        k = rotate(self.k_norm(k.view(b, s, self.n_kv, self.d)), cos, sin)
        v = v.view(b, s, self.n_kv, self.d)
        if _use_flash(self.attn_implementation, x):
            out = _flash_attention(q, k, v, segment_ids)
        else:
            mask = build_attention_mask(b, s, 0, segment_ids=segment_ids, device=x.device)
            out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, mask).transpose(1, 2)
        return self.o_proj(out.reshape(b, s, self.n_q * self.d))


class Qwen3NTMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp_pg, tp_mode, async_comm: bool) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = TensorParallelColumnLinear(
            h, 2 * i, pg=tp_pg, mode=tp_mode, bias=False, async_communication=async_comm, contiguous_chunks=(i, i)
        )
        self.down_proj = TensorParallelRowLinear(i, h, pg=tp_pg, mode=tp_mode, bias=False, async_communication=async_comm)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Qwen3NTMoE(nn.Module):
    """Router + experts, each expert split over TP along its intermediate dimension (module doc)."""

    def __init__(self, config: ModelConfig, tp_pg, num_sparse_layers: int, sparse_index: int, lbl_layers: str) -> None:
        super().__init__()
        tp, i = tp_pg.size(), config.moe_intermediate_size
        self.tp_pg = tp_pg
        self.num_experts, self.top_k, self.norm_topk_prob = config.num_experts, config.num_experts_per_tok, config.norm_topk_prob
        self.num_sparse_layers, self.lbl_layers = num_sparse_layers, lbl_layers
        self.sparse_index = sparse_index  # this layer's place among the model's sparse layers
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, i // tp)
        for name, split in (("gate_up_proj", SplitConfig(split_dim=1, contiguous_chunks=(i, i))),
                            ("down_proj", SplitConfig(split_dim=2))):
            setattr(self.experts, name, create_sharded_parameter_from_config(getattr(self.experts, name), tp_pg, split))
        # While `counting`: this layer's selection counts over the step's micro-batches on this rank. Then
        # `count_experts` sets `step_counts` (the counts f̄ is taken from, summed over PP and DP) for the step.
        self.counting = False
        self.counts: Optional[ExpertCounts] = None
        self.step_counts: Optional[ExpertCounts] = None

    def forward(self, x, aux_loss):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        if self.counting:  # the step's counting pass (`count_experts`)
            counts = ExpertCounts.of([router_logits], self.num_experts, self.top_k, layers="per_layer")
            self.counts = counts if self.counts is None else self.counts + counts
        weights, experts = route(router_logits, self.top_k, self.norm_topk_prob)
        # Inputs are replicated over TP and each rank computes a partial sum over its slice of every expert:
        # identity forward / all-reduce backward on the inputs, all-reduce forward on the output.
        y = self.experts(differentiable_identity(x, self.tp_pg), differentiable_identity(weights, self.tp_pg), experts)
        y = differentiable_all_reduce_sum(y, self.tp_pg).view(shape)
        if self.step_counts is not None:
            lbl = load_balancing_loss([router_logits], self.num_experts, self.top_k, scope="global",
                                      layers=self.lbl_layers, step_counts=self.step_counts)
            aux_loss = aux_loss + (lbl / self.num_sparse_layers).reshape(1)
        return y, aux_loss


class Qwen3NTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp_pg, tp_mode, async_comm: bool, attn_implementation: str,
                 layer_idx: int, inv_freq: torch.Tensor, attention_factor: float, recompute: bool = False,
                 lbl_layers: str = "per_layer") -> None:
        super().__init__()
        self.recompute = recompute
        self.is_sparse = config.is_sparse_layer(layer_idx)
        self.is_moe_model = config.is_moe
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3NTAttention(config, tp_pg, tp_mode, async_comm, attn_implementation)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        n_sparse = sum(config.is_sparse_layer(i) for i in range(config.num_hidden_layers))
        sparse_index = sum(config.is_sparse_layer(i) for i in range(layer_idx))
        self.mlp = (Qwen3NTMoE(config, tp_pg, n_sparse, sparse_index, lbl_layers) if self.is_sparse
                    else Qwen3NTMLP(config, tp_pg, tp_mode, async_comm))
        self.inv_freq, self.attention_factor = inv_freq, attention_factor  # float32, not parameters

    def forward(self, hidden_states, position_ids, aux_loss=None):
        if self.recompute and torch.is_grad_enabled():
            # Keep only the layer's inputs; the backward re-runs the layer (its TP collectives included).
            return checkpoint(self._forward, hidden_states, position_ids, aux_loss, use_reentrant=False)
        return self._forward(hidden_states, position_ids, aux_loss)

    def _forward(self, hidden_states, position_ids, aux_loss=None):
        x = hidden_states
        inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_tables(*rope_cos_sin(inv_freq, position_ids, self.attention_factor, dtype=x.dtype))
        segment_ids = segment_ids_from_positions(position_ids)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids)
        h = self.post_attention_layernorm(x)
        if self.is_sparse:
            h, aux_loss = self.mlp(h, aux_loss)
        else:
            h = self.mlp(h)
        out = {"hidden_states": x + h, "position_ids": position_ids}
        if self.is_moe_model:
            out["aux_loss"] = aux_loss
        return out


class _Embedding(nn.Module):
    def __init__(self, config: ModelConfig, tp_pg, tp_mode) -> None:
        super().__init__()
        self.token_embedding = TensorParallelEmbedding(config.vocab_size, config.hidden_size, pg=tp_pg, mode=tp_mode)
        self.is_moe = config.is_moe

    def forward(self, input_ids, position_ids):
        out = {"hidden_states": self.token_embedding(input_ids), "position_ids": position_ids}
        if self.is_moe:
            out["aux_loss"] = torch.zeros(1, dtype=torch.float32, device=input_ids.device)
        return out


class _FinalNorm(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states):
        return {"hidden_states": self.norm(hidden_states)}


class _LMHead(nn.Module):
    def __init__(self, config: ModelConfig, tp_pg, tp_mode, async_comm: bool) -> None:
        super().__init__()
        self.linear = TensorParallelColumnLinear(
            config.hidden_size, config.vocab_size, pg=tp_pg, mode=tp_mode, bias=False, async_communication=async_comm
        )

    def forward(self, hidden_states):
        return {"sharded_logits": self.linear(hidden_states).float()}


class _Loss(nn.Module):
    def __init__(self, tp_pg, aux_coef: Optional[float]) -> None:
        super().__init__()
        self.tp_pg = tp_pg
        self.aux_coef = aux_coef
        # None: each micro-batch's loss is the mean over its own counted tokens. Set by `weight_by_tokens` for one
        # optimizer step: the step's counted tokens per micro-batch and DP rank, so the step's loss is the mean
        # over every counted token of the step.
        self.tokens_per_micro_batch: Optional[float] = None

    def forward(self, sharded_logits, label_ids, label_mask, aux_loss=None):
        per_token = sharded_cross_entropy(sharded_logits, label_ids, group=self.tp_pg, dtype=torch.float)
        mask = label_mask.to(per_token.dtype)
        denominator = mask.sum().clamp(min=1) if self.tokens_per_micro_batch is None else self.tokens_per_micro_batch
        loss = (per_token * mask).sum() / denominator
        if aux_loss is not None and self.aux_coef:
            loss = loss + self.aux_coef * aux_loss.sum()
        return {"loss": loss}


# ------------------------------------------------------------------------------------------- model
class Qwen3ForTraining(NanotronModel):
    """nanotron training model. forward(input_ids, position_ids, label_ids, label_mask) -> {"loss"}.

    Signature as nanotron's trainer calls model classes: (config, parallel_context, parallel_config, random_states).
    Tensors are [batch, seq]; label_ids[t] is the target of position t (already shifted).
    """

    def __init__(self, config: Union[Qwen3NTConfig, ModelConfig], parallel_context: ParallelContext,
                 parallel_config=None, random_states=None, device: Optional[torch.device] = None) -> None:
        super().__init__()
        attn_impl = config.attn_implementation if isinstance(config, Qwen3NTConfig) else "auto"
        recompute = config.recompute_layers if isinstance(config, Qwen3NTConfig) else False
        lbl_layers = config.lbl_layers if isinstance(config, Qwen3NTConfig) else "per_layer"
        mc = _as_model_config(config)
        self.config, self.model_config = config, mc
        self.parallel_context, self.parallel_config = parallel_context, parallel_config
        tp_pg = parallel_context.tp_pg
        check_tp(mc, tp_pg.size())
        tp_mode = parallel_config.tp_mode if parallel_config is not None else TensorParallelLinearMode.ALL_REDUCE
        if tp_mode is not TensorParallelLinearMode.ALL_REDUCE:
            raise ValueError("Qwen3ForTraining supports tp_mode ALL_REDUCE only (sequence-parallel REDUCE_SCATTER is not implemented)")
        async_comm = bool(parallel_config.tp_linear_async_communication) if parallel_config is not None else False
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.p2p = P2P(parallel_context.pp_pg, device=device)
        with torch.device("cpu"):
            inv_freq, attention_factor = rope_parameters(mc)
        moe = mc.is_moe
        stream = {"hidden_states", "position_ids"} | ({"aux_loss"} if moe else set())

        self.embedding = PipelineBlock(
            p2p=self.p2p, module_builder=_Embedding, module_kwargs=dict(config=mc, tp_pg=tp_pg, tp_mode=tp_mode),
            module_input_keys={"input_ids", "position_ids"}, module_output_keys=stream,
        )
        self.decoder = nn.ModuleList(
            PipelineBlock(
                p2p=self.p2p, module_builder=Qwen3NTDecoderLayer,
                module_kwargs=dict(config=mc, tp_pg=tp_pg, tp_mode=tp_mode, async_comm=async_comm,
                                   attn_implementation=attn_impl, layer_idx=i, inv_freq=inv_freq,
                                   attention_factor=attention_factor, recompute=recompute, lbl_layers=lbl_layers),
                module_input_keys=stream, module_output_keys=stream,
            )
            for i in range(mc.num_hidden_layers)
        )
        self.final_norm = PipelineBlock(
            p2p=self.p2p, module_builder=_FinalNorm, module_kwargs=dict(config=mc),
            module_input_keys={"hidden_states"}, module_output_keys={"hidden_states"},
        )
        self.lm_head = PipelineBlock(
            p2p=self.p2p, module_builder=_LMHead,
            module_kwargs=dict(config=mc, tp_pg=tp_pg, tp_mode=tp_mode, async_comm=async_comm),
            module_input_keys={"hidden_states"}, module_output_keys={"sharded_logits"},
        )
        self.loss = PipelineBlock(
            p2p=self.p2p, module_builder=_Loss,
            module_kwargs=dict(tp_pg=tp_pg, aux_coef=mc.router_aux_loss_coef if moe else None),
            module_input_keys={"sharded_logits", "label_ids", "label_mask"} | ({"aux_loss"} if moe else set()),
            module_output_keys={"loss"},
        )

    def forward(self, input_ids, position_ids, label_ids, label_mask):
        out = self.embedding(input_ids=input_ids, position_ids=position_ids)
        for block in self.decoder:
            out = block(**out)
        hidden = self.final_norm(hidden_states=out["hidden_states"])["hidden_states"]
        logits = self.lm_head(hidden_states=hidden)["sharded_logits"]
        extra = {"aux_loss": out["aux_loss"]} if self.model_config.is_moe else {}
        return self.loss(sharded_logits=logits, label_ids=label_ids, label_mask=label_mask, **extra)

    # --------------------------------------------------------------------------------- nanotron hooks
    def get_block_compute_costs(self):
        c = self.model_config
        h, d = c.hidden_size, c.head_dim
        attn = h * (c.num_attention_heads + 2 * c.num_key_value_heads) * d + c.num_attention_heads * d * h
        mlp = 3 * h * (c.num_experts_per_tok * c.moe_intermediate_size if c.is_moe else c.intermediate_size)
        return {Qwen3NTDecoderLayer: attn + mlp, _LMHead: c.vocab_size * h}

    def get_flops_per_sec(self, iteration_time_in_sec, sequence_length, global_batch_size):
        flops = train_step_flops(self.model_config, global_batch_size, sequence_length)
        per_gpu = flops / (iteration_time_in_sec * self.parallel_context.world_pg.size() * 1e12)
        return per_gpu, per_gpu

    def tie_custom_params(self) -> None:
        """Called by nanotron's trainer (and `tie_model_parameters`) once the blocks are built.

        QK-norm weights are shared by all heads, but each TP rank holds only its own heads, so their gradients
        are partial sums: tie them across TP with a SUM reduction (the trainer would otherwise tie every
        replicated parameter without reduction). Also normalises the shard metadata (compat, numpy 2)."""
        _tie_replicated(self, self.parallel_context, reduce_op=dist.ReduceOp.SUM,
                        only=lambda name, m: isinstance(m, RMSNorm) and name.endswith((".q_norm", ".k_norm")))
        normalise_sharded_metadata(self)

    def get_embeddings_lm_head_tied_names(self):
        if self.model_config.tie_word_embeddings:
            return ["embedding.pp_block.token_embedding.weight", "lm_head.pp_block.linear.weight"]
        return []

    @torch.no_grad()
    def init_model_randomly(self, config=None, seed: Optional[int] = None) -> None:
        """transformers' init (normal(0, initializer_range), norms at 1), identical for every parallel layout.

        nanotron's trainer calls `init_model_randomly(config=<its whole Config>)` after `set_random_seed`, which
        seeds the global RNG alike on every rank: drawing each rank's shard from the global RNG would give every
        TP rank the same shard (every model with tp > 1 would train 1/tp of its heads and MLP/expert widths). So
        the global RNG is not used: every parameter is drawn as its whole unsharded tensor from generators seeded
        by the seed and the parameter's name (`_fill_normal_shard`), and each rank keeps its slice, using the
        shard metadata nanotron attaches to sharded parameters. The weights then depend on the seed only, not on
        TP, PP (names do not depend on the stage a layer lives on) or DP; replicated parameters are the same on
        every rank, and tied parameters (the LM head tied to the embedding) are drawn under one name.

        The seed: `seed` if given, else the trainer config's `general.seed`, else 0. The std is the model's
        `initializer_range`; a trainer config whose `model.init_method.std` differs is refused rather than ignored.
        """
        seed = _init_seed_from(config, seed)
        std = self.model_config.initializer_range
        init_std = getattr(getattr(getattr(config, "model", None), "init_method", None), "std", None)
        if init_std is not None and not math.isclose(float(init_std), std, rel_tol=1e-6):
            raise ValueError(f"model.init_method.std is {init_std} but the model's initializer_range is {std}: "
                             "the initialisation is transformers' (std = initializer_range); make them equal")
        prefixes = {id(m): f"{n}." for n, m in self.named_modules()}
        prefixes[id(self)] = ""
        # The embedding/LM head pair is drawn under the first name whether or not it is tied yet, so the LM head
        # on the last pipeline stage gets the embedding's values.
        tied = self.get_embeddings_lm_head_tied_names()
        alias = {name: tied[0] for name in tied}
        done = set()
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in done:  # a parameter tied inside this process appears under several names
                    continue
                done.add(id(param))
                name = f"{module_name}.{param_name}"
                if isinstance(param, NanotronParameter) and param.is_tied:
                    name = param.get_tied_info().get_full_name_from_module_id_to_prefix(module_id_to_prefix=prefixes)
                name = alias.get(name, name)
                if isinstance(module, RMSNorm):
                    param.fill_(1.0)
                elif isinstance(module, nn.Linear) and param_name == "bias":
                    param.zero_()
                elif isinstance(module, (nn.Linear, nn.Embedding, Experts)):
                    _fill_normal_shard(param, name, seed, std)
                else:
                    raise TypeError(f"init_model_randomly has no rule for {name} (a parameter of "
                                    f"{type(module).__name__}); add one")


# ------------------------------------------------------------------------------------- initialisation
# Random numbers are drawn in blocks of whole rows (along dim 0 of the unsharded tensor) of about this many
# elements (at least one row), each block from its own generator, so a rank never materialises a large unsharded
# tensor (the stacked experts of a large MoE layer hold ~10^9 numbers) and skips the blocks its shard does not touch.
_INIT_BLOCK_ELEMENTS = 1 << 22


def _init_seed_from(config, seed: Optional[int]) -> int:
    if seed is not None:
        return int(seed)
    general_seed = getattr(getattr(config, "general", None), "seed", None)
    return int(general_seed) if general_seed is not None else 0


def _block_seed(seed: int, name: str, block: int) -> int:
    """A generator seed for one block of one parameter: a stable digest (unlike `hash`, the same in every process)."""
    digest = hashlib.sha256(f"{seed}|{name}|{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid, non-negative torch seed


def _concrete(s: slice, size: int, what: str) -> tuple[int, int]:
    start, stop, step = s.indices(size)
    if step != 1:
        raise ValueError(f"{what}: strided shard slices are not supported ({s})")
    return start, stop


@torch.no_grad()
def _fill_normal_shard(param: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Fill `param` with this rank's part of an unsharded normal(0, std) tensor that depends only on (seed, name).

    A sharded `NanotronParameter` carries the unsharded shape and (local slices, global slices) pairs (several
    for fused tensors built with `contiguous_chunks`, e.g. QKV); any other parameter is its whole tensor. The
    unsharded tensor is generated block by block (rows of dim 0, block size from the unsharded shape only), in
    float32 whatever the parameter's dtype, so every layout sees the same numbers."""
    if isinstance(param, NanotronParameter) and param.is_sharded:
        info = param.get_sharded_info()
        shape = tuple(int(n) for n in info.unsharded_shape)
        pairs = [(p.local_slices, p.global_slices) for p in info.local_global_slices_pairs]
    else:
        shape = tuple(param.shape)
        whole = tuple(slice(None) for _ in shape)
        pairs = [(whole, whole)]
    if not shape:
        raise ValueError(f"{name}: a scalar parameter has no normal-init rule")
    # Each pair as (local start row, global rows [g0, g1), slices of the other dimensions).
    rows = []
    for local, glob in pairs:
        l0, l1 = _concrete(local[0], param.shape[0], name)
        g0, g1 = _concrete(glob[0], shape[0], name)
        if l1 - l0 != g1 - g0:
            raise ValueError(f"{name}: shard metadata maps {l1 - l0} local rows to {g1 - g0} global rows")
        rows.append((l0, g0, g1, tuple(local[1:]), tuple(glob[1:])))
    block_rows = max(1, _INIT_BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    for index, start in enumerate(range(0, shape[0], block_rows)):
        stop = min(start + block_rows, shape[0])
        wanted = [r for r in rows if r[1] < stop and r[2] > start]
        if not wanted:
            continue
        generator = torch.Generator(device=param.device).manual_seed(_block_seed(seed, name, index))
        block = torch.empty((stop - start, *shape[1:]), dtype=torch.float32, device=param.device)
        block.normal_(0.0, std, generator=generator)
        for l0, g0, g1, local_rest, global_rest in wanted:
            lo, hi = max(g0, start), min(g1, stop)  # the global rows of this pair that the block holds
            dst = (slice(l0 + lo - g0, l0 + hi - g0), *local_rest)
            param[dst] = block[(slice(lo - start, hi - start), *global_rest)]


# ------------------------------------------------------------------------------------- building
def build_qwen3(config: Union[Qwen3NTConfig, ModelConfig], parallel_context: ParallelContext, parallel_config=None,
                dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> Qwen3ForTraining:
    """Build, place blocks on pipeline ranks and tie parameters, as nanotron's trainer does (without its CUDA calls)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(
        model_builder=lambda: Qwen3ForTraining(config, parallel_context, parallel_config, device=device),
        parallel_context=parallel_context, dtype=dtype, device=device,
    )
    tie_model_parameters(model, parallel_context)
    return model


def tie_model_parameters(model: Qwen3ForTraining, parallel_context: ParallelContext) -> None:
    """What nanotron's trainer does after building (`trainer.mark_tied_parameters`), for use without the trainer:
    tie embedding/LM head across pipeline ranks (gradients summed), call `tie_custom_params`, then mark every
    other replicated parameter as tied across TP (identical by construction in ALL_REDUCE mode).
    `sync_tied_weights_gradients` (after backward) then sums the gradients that must be summed."""
    pc = parallel_context
    names = model.get_embeddings_lm_head_tied_names()
    if names:
        ties = []
        for target in names:
            block = model.get_submodule(target.split(".pp_block")[0])
            ties.append((target, (int(pc.world_rank_matrix[dist.get_rank(pc.expert_pg), block.rank,
                                                          dist.get_rank(pc.dp_pg), dist.get_rank(pc.tp_pg)]),)))
        tie_parameters(root_module=model, ties=ties, parallel_context=pc, reduce_op=dist.ReduceOp.SUM)
    model.tie_custom_params()
    _tie_replicated(model, pc, reduce_op=None)
    create_pg_for_tied_weights(root_module=model, parallel_context=pc)


def _tie_replicated(model: nn.Module, pc: ParallelContext, reduce_op, only=None) -> None:
    tp_ranks = tuple(sorted(dist.get_process_group_ranks(pc.tp_pg)))
    for module_name, module in model.named_modules():
        if only is not None and not only(module_name, module):
            continue
        for param_name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, NanotronParameter) and (param.is_sharded or param.is_tied):
                continue
            tie_parameters(root_module=model, ties=[(f"{module_name}.{param_name}", tp_ranks)],
                           parallel_context=pc, reduce_op=reduce_op)


def pipeline_inputs(model: Qwen3ForTraining, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """A micro-batch as each pipeline rank must pass it: real tensors where they are consumed, pointers elsewhere."""
    pp_rank = dist.get_rank(model.parallel_context.pp_pg)
    first, last = model.embedding.rank, model.loss.rank
    out = {}
    for key in ("input_ids", "position_ids"):
        out[key] = batch[key] if pp_rank == first else TensorPointer(group_rank=first)
    for key in ("label_ids", "label_mask"):
        out[key] = batch[key] if pp_rank == last else TensorPointer(group_rank=last)
    return out


@torch.no_grad()
def weight_by_tokens(model: Qwen3ForTraining, micro_batches) -> Optional[float]:
    """Make the coming optimizer step's loss the mean over all its counted tokens (every micro-batch, every DP
    rank), as the tiny SFT stage weights micro-batches (`num_tokens` in train.loop), instead of the mean of
    per-micro-batch means. What matters for SFT: packed rows hold very different numbers of assistant tokens.

    nanotron divides each micro-batch's loss by the number of micro-batches and DDP averages gradients over DP,
    so each micro-batch's loss is its masked sum over N_step / (micro-batches x dp). Only the last pipeline stage
    computes the loss; the count is all-reduced over its DP group. Returns that denominator (None elsewhere)."""
    pc = model.parallel_context
    if dist.get_rank(pc.pp_pg) != model.loss.rank:
        return None
    masks = [mb["label_mask"] for mb in micro_batches]
    count = torch.stack([m.sum().to(torch.float64) for m in masks]).sum().reshape(1)
    dist.all_reduce(count, group=pc.dp_pg)
    per_micro_batch = max(float(count) / (len(masks) * pc.dp_pg.size()), 1e-6)  # an all-masked step gives loss 0
    model.loss.pp_block.tokens_per_micro_batch = per_micro_batch
    return per_micro_batch


def sparse_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, Qwen3NTMoE)]


@torch.no_grad()
def count_experts(model: Qwen3ForTraining, micro_batches) -> Optional[ExpertCounts]:
    """The counting pass of the global-scope LBL for one optimizer step: count every sparse layer's top-k
    selections over every micro-batch, sum them over the pipeline and data-parallel groups, and give each sparse
    layer the counts its loss takes f̄ from (its own for "per_layer", all layers' for "pooled"). Returns the
    per-layer counts of the step ([sparse layers, E])."""
    if not model.model_config.is_moe:
        return None
    mc, pc = model.model_config, model.parallel_context
    layers = sparse_layers(model)
    for m in layers:
        m.counting, m.counts, m.step_counts = True, None, None
    try:
        for mb in micro_batches:
            model(**pipeline_inputs(model, mb))
    finally:
        for m in layers:
            m.counting = False
    # One row per sparse layer of the whole model; this pipeline stage fills the rows of the layers it holds.
    n_sparse = sum(mc.is_sparse_layer(i) for i in range(mc.num_hidden_layers))
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    counts = torch.zeros(n_sparse, mc.num_experts, dtype=torch.float64, device=device)
    rows = torch.zeros(n_sparse, dtype=torch.float64, device=device)
    for m in layers:
        if m.counts is not None:
            counts[m.sparse_index] = m.counts.counts[0].to(device)
            rows[m.sparse_index] = m.counts.rows[0].to(device)
    step = ExpertCounts(counts, rows, "per_layer").all_reduce(pc.pp_pg).all_reduce(pc.dp_pg)
    pooled = ExpertCounts(step.counts.sum(0, keepdim=True), step.rows.sum(0, keepdim=True), "pooled")
    for m in layers:
        i = m.sparse_index
        m.step_counts = (ExpertCounts(step.counts[i:i + 1], step.rows[i:i + 1], "per_layer")
                         if m.lbl_layers == "per_layer" else pooled)
    return step


__all__ = [
    "Qwen3NTConfig", "Qwen3ForTraining", "build_qwen3", "tie_model_parameters", "pipeline_inputs",
    "count_experts", "check_tp", "segment_ids_from_positions", "weight_by_tokens", "ATTN_IMPLEMENTATIONS",
]
