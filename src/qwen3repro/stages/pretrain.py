"""Pretraining stages S1 (general), S2 (reasoning), S3 (long context) — one function, three recipes.

Qwen3 report §3.2: S1 trains every model on general data at 4,096 tokens; S2 raises the share of
STEM/code/reasoning/synthetic data with an accelerated LR decay; S3 trains at 32,768 tokens on a
75/25 mix of long and medium documents with the RoPE base raised from 10,000 to 1,000,000 (ABF).
What differs between the stages is data only in the recipes (`recipes/s1.toml` …) plus two model
changes this stage applies when the recipe asks: a new `rope_theta` and a longer
`max_position_embeddings`.

MoE models add the load-balancing loss (`losses.load_balancing_loss`) with the recipe's two settings:
`load_balancing` is its scope, "global" (expert selection frequencies counted over every micro-batch
of the optimizer step, all `grad_accum` of them: Qiu et al. 2025, used for Qwen3-MoE) or "micro"
(each group of `lbl_micro_batch` sequences on its own); `lbl_layers` is "per_layer" or "pooled". The
global scope needs the step's counts before its first backward, so with gradient accumulation the
stage hands the trainer `PretrainLoss.prepare_step`, a forward without autograd over the step's
micro-batches that counts them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..config import ConfigError
from ..config_fields import NonNegative, Positive, checked_fields
from ..data.cache import verified_map
from ..data.copy_warmup import DEFAULT_SPAN_RANGE, CopyWarmupLoader
from ..data.packing import PackingLoader
from ..data.synthetic import LONG_CONTEXT_STAGES, build_corpus, check_length_mix, corpus_length_ranges, heldout_text
from ..lineage import make_lineage, write_lineage
from ..losses import LBL_LAYERS, LBL_SCOPES, ExpertCounts, load_balancing_loss, masked_cross_entropy
from ..models.qwen3 import Qwen3
from ..models.registry import get_model_config
from ..tokenizer import Tokenizer
from ..train.loop import TrainConfig, TrainTable, train
from ..files import write_json_atomic
from .common import StageContext, copy_tokenizer


@dataclass(frozen=True)
class PretrainConfig:
    name: str
    """Stage name (s1, s2, s3, s1-control, ...): the output directory's name."""
    corpus: str
    """Synthetic corpus: 's1', 's2' or 's3' (`data.synthetic`)."""
    tokens: Positive
    """Training tokens; steps = tokens // (seq_len · batch_size · grad_accum)."""
    seq_len: Positive
    batch_size: Positive
    n_docs: Positive
    """Documents generated for the corpus (the loader loops over them if tokens exceed one epoch)."""
    length_mix: tuple[tuple[float, float, float], ...] = ()
    """Long-context corpus only: rows [min_fraction, max_fraction, share], `share` of the documents
    having between min_fraction·seq_len and max_fraction·seq_len tokens (`data.synthetic.length_mix`);
    empty for the short-document corpora, whose documents have their kinds' own lengths."""
    model: str | None = None
    """Registry name of the model to build when there is no parent model (S1)."""
    corpus_offset: NonNegative = 0
    """Skip the first N documents of the corpus stream (a control run continuing S1 with unseen data)."""
    rope_theta: float | None = None
    """Set the RoPE base (S3's ABF: 1e4 -> 1e6); None keeps the parent's."""
    document_masking: bool = False
    """Attention stays inside each packed document (positions restart per document)."""
    load_balancing: str = "global"
    """MoE only: the load-balancing loss's scope, 'global' (the optimizer step) or 'micro'."""
    lbl_layers: str = "per_layer"
    """MoE only: 'per_layer' (each MoE layer over its own experts) or 'pooled' (all layers in one f and P)."""
    lbl_micro_batch: Positive = 1
    """MoE only: sequences per micro-batch for the 'micro' scope (divides the batch size)."""
    router_aux_loss_coef: float | None = None
    """MoE only: overrides the model's coefficient."""
    eval_docs_per_language: NonNegative = 8
    """Held-out prose documents per language for the eval loss (0: no eval)."""
    copy_warmup_steps: NonNegative = 0
    """Optimizer steps of repeated random spans before the corpus (`data.copy_warmup`): a tiny-scale
    stand-in for the induction heads real corpora form early. Added to the steps `tokens` gives."""
    copy_warmup_batch_size: Positive = 8
    """Rows per warm-up step."""
    copy_warmup_seq_len: NonNegative = 0
    """Tokens per warm-up row; 0 means `seq_len`. Short rows form induction heads in fewer steps
    (fewer distractors per query): the tiny flagship's loss fell to the copy floor by ~900 steps of
    32 x 64 tokens, against ~1,500 of 8 x 256."""
    copy_warmup_span: tuple[Positive, Positive] = DEFAULT_SPAN_RANGE
    """[shortest, longest] repeated span in warm-up documents (a document is span + span + EOT)."""
    category_weights: Mapping[str, float] = field(default_factory=dict)
    """Real-data category weights of the stage's mixture (web, code, math, ...): what the full scale trains
    on (`data.mixture.stage_mixture`). The synthetic corpus (`corpus`) has document kinds of its own."""
    seed: int = 0
    train: TrainTable = field(default_factory=dict)
    """TrainConfig fields except `steps` (derived from `tokens`)."""
    description: str = ""

    def __post_init__(self) -> None:
        if self.load_balancing not in LBL_SCOPES:
            raise ConfigError(f"load_balancing must be one of {LBL_SCOPES}, got {self.load_balancing!r}")
        if self.lbl_layers not in LBL_LAYERS:
            raise ConfigError(f"lbl_layers must be one of {LBL_LAYERS}, got {self.lbl_layers!r}")
        batch_sizes = (self.batch_size, self.copy_warmup_batch_size) if self.copy_warmup_steps else (self.batch_size,)
        if self.lbl_micro_batch < 1 or any(b % self.lbl_micro_batch for b in batch_sizes):
            raise ConfigError(f"lbl_micro_batch must be >= 1 and divide the batch size(s) {batch_sizes}, "
                              f"got {self.lbl_micro_batch}")
        if "steps" in self.train:
            raise ConfigError("train.steps is derived from `tokens`; set tokens instead")
        if self.copy_warmup_steps < 0 or self.copy_warmup_batch_size < 1:
            raise ConfigError(f"copy_warmup_steps must be >= 0 and copy_warmup_batch_size >= 1, got "
                              f"{self.copy_warmup_steps} and {self.copy_warmup_batch_size}")
        if self.copy_warmup_seq_len < 0:
            raise ConfigError(f"copy_warmup_seq_len must be >= 0 (0: seq_len), got {self.copy_warmup_seq_len}")
        span = tuple(self.copy_warmup_span)
        if len(span) != 2 or not all(isinstance(x, int) for x in span) or not 1 <= span[0] <= span[1]:
            raise ConfigError(f"copy_warmup_span must be [shortest, longest] with 1 <= shortest <= longest, "
                              f"got {self.copy_warmup_span!r}")
        object.__setattr__(self, "copy_warmup_span", span)
        try:  # the corpus's checks: a valid mix, present exactly for the long-context corpus
            object.__setattr__(self, "length_mix", check_length_mix(self.length_mix))
            corpus_length_ranges(self.corpus, self.seq_len, self.length_mix)
        except ValueError as e:
            raise ConfigError(f"stage {self.name}: {e}") from None
        if self.copy_warmup_steps and int(self.train.get("grad_accum", 1)) != 1:
            raise ConfigError("copy_warmup_steps needs grad_accum = 1 (one warm-up batch per optimizer step)")
        self.train_config()  # validate now, naming unknown keys

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "PretrainConfig") -> "PretrainConfig":
        return cls(**checked_fields(cls, d, where))

    @property
    def corpus_steps(self) -> int:
        accum = int(self.train.get("grad_accum", 1))
        return max(1, self.tokens // (self.seq_len * self.batch_size * accum))

    @property
    def steps(self) -> int:
        """Optimizer steps: the copy warm-up's, then the corpus's."""
        return self.copy_warmup_steps + self.corpus_steps

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict({**self.train, "steps": self.steps, "seed": self.train.get("seed", self.seed)})


# ----------------------------------------------------------------------------- pieces
def build_model(cfg: PretrainConfig, parent: Path | None, tokenizer: Tokenizer) -> Qwen3:
    """The parent's model (S2, S3) or a fresh one from the registry (S1), with the stage's changes."""
    has_parent_model = parent is not None and (Path(parent) / "config.json").exists()
    if has_parent_model:
        base = Qwen3.from_pretrained(parent)
        model_cfg = base.config
    else:
        if cfg.model is None:
            raise ConfigError(f"stage {cfg.name}: no parent model and no `model` to build")
        if cfg.rope_theta is None:
            raise ConfigError(f"stage {cfg.name}: a stage that builds a fresh model states its RoPE base (rope_theta)")
        base = None
        model_cfg = get_model_config(cfg.model).replace(eos_token_id=tokenizer.endoftext_id, bos_token_id=None)
        if len(tokenizer) > model_cfg.vocab_size:
            raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but model {cfg.model} only {model_cfg.vocab_size} rows")
    changes: dict[str, Any] = {"max_position_embeddings": max(model_cfg.max_position_embeddings, cfg.seq_len)}
    if cfg.rope_theta is not None:
        changes["rope_theta"] = float(cfg.rope_theta)
    if cfg.router_aux_loss_coef is not None:
        changes["router_aux_loss_coef"] = float(cfg.router_aux_loss_coef)
    model_cfg = model_cfg.replace(**changes)
    if base is None:
        torch.manual_seed(cfg.seed)
        return Qwen3(model_cfg)
    model = Qwen3(model_cfg)
    model.load_state_dict(base.state_dict())
    return model


def tokenized_corpus(cfg: PretrainConfig, tokenizer: Tokenizer, cache_dir: Path,
                     say: Callable[[str], None] | None = None):
    """The stage's corpus (cached by `build_corpus`) with an `input_ids` column; the tokenized copy
    `datasets` caches beside it is checked against the cache's manifest (`data.cache.verified_map`,
    which reports a damaged one through `say` and computes it again)."""
    # Long-context documents are sized to fill rows, so they are counted with the real tokenizer.
    count = (lambda s: len(tokenizer.encode(s))) if cfg.corpus in LONG_CONTEXT_STAGES else None
    ds = build_corpus(cfg.corpus, seed=cfg.seed, n_docs=cfg.n_docs, seq_len=cfg.seq_len, length_mix=cfg.length_mix,
                      offset=cfg.corpus_offset, cache_dir=cache_dir, count_tokens=count)
    backend = tokenizer.backend

    def encode(batch):
        return {"input_ids": [e.ids for e in backend.encode_batch(batch["text"], add_special_tokens=False)]}

    return verified_map(ds, encode, say=say, batched=True, batch_size=1000,
                        remove_columns=ds.column_names, desc=f"tokenize {cfg.name}")


def _model_inputs(batch: Mapping[str, torch.Tensor], document_masking: bool) -> dict[str, Any]:
    if document_masking:
        return {"position_ids": batch["position_ids"], "segment_ids": batch["segment_ids"]}
    return {}


@dataclass(frozen=True)
class StepRouting:
    """One optimizer step's routing on this rank, counted before its first backward (global-scope LBL)."""

    counts: ExpertCounts
    """Top-k selection counts over the step's micro-batches (and data-parallel ranks)."""
    rows: int
    """Routed rows (tokens through each MoE layer) of the step's micro-batches."""
    tokens: int
    """Target tokens of the step's micro-batches: the trainer's weights."""


def pretrain_loss(model: Qwen3, batch: Mapping[str, torch.Tensor], *, document_masking: bool,
                  load_balancing: str = "global", lbl_layers: str = "per_layer", lbl_micro_batch: int = 1,
                  step: StepRouting | None = None):
    """Next-token CE (+ coef x the MoE load-balancing loss), token-weighted for the trainer.

    LBL scope "micro": the mean over groups of `lbl_micro_batch` sequences of each group's loss.
    "global": f̄ from `step` (the step's counts, `PretrainLoss.prepare_step`) or, without it, from
    this forward, which then holds the whole step (grad_accum = 1). The trainer weights micro-batch
    j by its target tokens w_j, while the LBL is a mean over routed rows R_j, so the global term is
    scaled by (R_j / w_j)·(W / N), W and N the step's tokens and rows (1 when every routed row has
    a target): the trainer's weighted mean over the step, optimised and logged as `lbl`, is then
    exactly E·Σ_i f̄_i P̄_i of the step.
    """
    is_moe = model.config.is_moe
    out = model(batch["input_ids"], output_router_logits=is_moe, **_model_inputs(batch, document_masking))
    labels = batch["labels"]
    ce = masked_cross_entropy(out.logits, labels)
    num_tokens = int((labels != -100).sum())
    metrics: dict[str, Any] = {"num_tokens": num_tokens, "ce": ce.detach()}
    loss = ce
    if is_moe:
        cfg = model.config
        e, k = cfg.num_experts, cfg.num_experts_per_tok
        if load_balancing == "micro":
            aux = load_balancing_loss(out.router_logits, e, k, scope="micro", layers=lbl_layers,
                                      micro_batches=batch["input_ids"].shape[0] // lbl_micro_batch)
        else:
            aux = load_balancing_loss(out.router_logits, e, k, scope="global", layers=lbl_layers,
                                      step_counts=None if step is None else step.counts)
            if step is not None:
                # A micro-batch without targets has trainer weight 0: its rows' share cannot enter.
                rows = batch["input_ids"].numel()
                aux = aux * ((rows / num_tokens) * (step.tokens / step.rows) if num_tokens else 0.0)
        loss = ce + cfg.router_aux_loss_coef * aux
        metrics["lbl"] = aux.detach()
    return loss, metrics


class PretrainLoss:
    """The stage's loss_fn (`pretrain_loss` with the recipe's settings) and, for the global-scope
    LBL of a MoE trained with gradient accumulation, the trainer's `prepare_step`: a forward without
    autograd over the step's micro-batches that counts their expert selections (summed over
    data-parallel ranks when torch.distributed is initialised) before the first backward."""

    def __init__(self, *, document_masking: bool, load_balancing: str = "global", lbl_layers: str = "per_layer",
                 lbl_micro_batch: int = 1) -> None:
        self.settings = dict(document_masking=document_masking, load_balancing=load_balancing,
                             lbl_layers=lbl_layers, lbl_micro_batch=lbl_micro_batch)
        self.step: StepRouting | None = None
        self._counted_on: list[Mapping[str, torch.Tensor]] = []  # the micro-batches `step` was counted on

    @torch.no_grad()
    def prepare_step(self, model: Qwen3, micro_batches: list[Mapping[str, torch.Tensor]]) -> None:
        cfg = model.config
        counts, rows, tokens = None, 0, 0
        for batch in micro_batches:
            out = model(batch["input_ids"], output_router_logits=True,
                        **_model_inputs(batch, self.settings["document_masking"]))
            c = ExpertCounts.of(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok,
                                layers=self.settings["lbl_layers"])
            counts = c if counts is None else counts + c
            rows += batch["input_ids"].numel()
            tokens += int((batch["labels"] != -100).sum())
        self.step = StepRouting(counts.all_reduce(), rows, tokens)
        self._counted_on = list(micro_batches)

    def __call__(self, model: Qwen3, batch: Mapping[str, torch.Tensor]):
        if self.step is not None and not any(batch is b for b in self._counted_on):
            raise RuntimeError("the step's expert counts were taken on other micro-batches: give the trainer "
                               "prepare_step=loss.prepare_step so it counts every step")
        return pretrain_loss(model, batch, **self.settings, step=self.step)


def heldout_loss_fn(tokenizer: Tokenizer, seq_len: int, docs_per_language: int):
    """eval_fn: mean next-token loss on held-out prose of every language (never in training)."""
    docs = heldout_text(n_per_language=docs_per_language)
    encoded = [tokenizer.encode(d["text"])[: seq_len + 1] for d in docs]

    def eval_fn(model: Qwen3) -> dict[str, float]:
        total, count = 0.0, 0
        device = next(model.parameters()).device
        for ids in encoded:
            x = torch.tensor([ids], device=device)
            logits = model(x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum")
            total += float(loss)
            count += x.shape[1] - 1
        return {"heldout_loss": total / max(count, 1)}

    return eval_fn


# ----------------------------------------------------------------------------- the stage
def run(cfg: PretrainConfig, parent: Path | None, ctx: StageContext) -> Path:
    """Train one pretraining stage from `parent` (a checkpoint dir with a tokenizer, and a model
    except for S1) into `ctx.out_dir`; resumes a cut run of the same config."""
    out = Path(ctx.out_dir)
    if parent is None:
        raise ConfigError(f"stage {cfg.name}: needs a parent directory holding at least the tokenizer")
    tokenizer = Tokenizer.load(parent)
    model = build_model(cfg, parent, tokenizer)
    docs = tokenized_corpus(cfg, tokenizer, Path(ctx.cache_dir), say=ctx.say)
    loader = PackingLoader(docs, seq_len=cfg.seq_len, batch_size=cfg.batch_size, eot_id=tokenizer.endoftext_id,
                           pad_id=tokenizer.pad_token_id, seed=cfg.seed, document_masking=cfg.document_masking)
    tokens_per_epoch = loader.tokens_per_epoch
    if cfg.copy_warmup_steps:
        # The special tokens come last (Qwen3's layout, `<|endoftext|>` first of them): spans draw
        # from the ordinary tokens only.
        warmup_len = cfg.copy_warmup_seq_len or cfg.seq_len
        loader = CopyWarmupLoader(loader, steps=cfg.copy_warmup_steps, batch_size=cfg.copy_warmup_batch_size,
                                  seq_len=warmup_len, n_ordinary=tokenizer.endoftext_id,
                                  eot_id=tokenizer.endoftext_id, seed=cfg.seed, span_range=cfg.copy_warmup_span)
        ctx.say(f"{cfg.name}: copy warm-up first: {cfg.copy_warmup_steps} steps x {cfg.copy_warmup_batch_size}"
                f" x {warmup_len} of repeated random spans ({cfg.copy_warmup_span[0]}-{cfg.copy_warmup_span[1]} tokens)")
    tcfg = ctx.on_device(cfg.train_config())
    ctx.say(f"{cfg.name}: {cfg.tokens:,} tokens = {cfg.corpus_steps} steps x {cfg.batch_size} x {cfg.seq_len}"
            f" (corpus {cfg.corpus}, {len(docs):,} documents, {tokens_per_epoch:,} tokens/epoch)"
            f", rope_theta {model.config.rope_theta:g}")
    loss_fn = PretrainLoss(document_masking=cfg.document_masking, load_balancing=cfg.load_balancing,
                           lbl_layers=cfg.lbl_layers, lbl_micro_batch=cfg.lbl_micro_batch)
    # The global-scope LBL counts the step's micro-batches first; one micro-batch holds its step itself.
    counts_first = model.config.is_moe and cfg.load_balancing == "global" and tcfg.grad_accum > 1
    eval_fn = heldout_loss_fn(tokenizer, cfg.seq_len, cfg.eval_docs_per_language) \
        if cfg.eval_docs_per_language else None
    summary = train(model, loader, loss_fn, tcfg, out, resume="auto", eval_fn=eval_fn,
                    eval_every=max(1, tcfg.steps // 4), printer=ctx.printer,
                    prepare_step=loss_fn.prepare_step if counts_first else None,
                    run_extra={"stage": cfg.name, "corpus": cfg.corpus, "corpus_offset": cfg.corpus_offset,
                               "n_docs": cfg.n_docs, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size})
    copy_tokenizer(parent, out)
    final_eval = {k.removeprefix("eval/"): v for k, v in summary["eval"].items()}
    write_json_atomic(out / "eval.json", {"stage": cfg.name, "final_loss": summary["loss"], **final_eval,
                                          "tokens_seen": summary["tokens_seen"], "elapsed_s": summary["elapsed_s"]})
    write_lineage(out, make_lineage(cfg.name, cfg, parent))
    return out


def tokens_per_step(cfg: PretrainConfig) -> int:
    return cfg.seq_len * cfg.batch_size * int(cfg.train.get("grad_accum", 1))


__all__ = ["PretrainConfig", "run", "pretrain_loss", "PretrainLoss", "StepRouting", "build_model", "tokenized_corpus",
           "tokens_per_step"]
