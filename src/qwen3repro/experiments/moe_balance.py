"""MoE experiment: micro-batch vs global-batch load balancing (Qwen3 report §2; Qiu et al. 2025).

Qwen3-MoE was trained with the *global-batch* load-balancing loss (LBL) of Qiu et al. 2025
("Demons in the Detail", arXiv 2501.11873): the expert selection frequencies f_i are counted over
every micro-batch of the optimizer step (and every data-parallel rank) instead of each micro-batch
alone. Their finding, and the claim measured here:

    Global-batch LBL reaches a lower global expert-load imbalance than micro-batch LBL at equal or
    lower loss, and the experts specialise more by data domain.

Why the data layout matters. In large-scale training a micro-batch is a handful of long
sequences, usually of one domain (code, math, web). The micro-batch LBL then asks every domain
to spread its tokens uniformly over all experts, which forbids domain specialisation; the global
LBL only asks the sum over the step's micro-batches, which span all domains, to be balanced.
Packed short documents mix several domains in one sequence (the S1 packing loader puts ~3
documents of ~2.5 kinds in a 256-token sequence), which removes the difference between the two
losses. So this experiment builds the batches the mechanism needs:

* **domain-pure micro-batches** — the S1 training documents are split by kind (prose, knowledge,
  parallel, code, arith, problem, passkey: the corpus's "domains"), each kind is packed on its
  own (`PackingLoader`, seeded), and a micro-batch is `micro_batch_size` sequences of one kind;
* **a mixed global batch** — an optimizer step accumulates `micro_batches_per_step` micro-batches
  whose kinds are drawn by systematic sampling in proportion to each kind's share of the training
  tokens, so every step sees the corpus mixture;
* **the two losses, same coefficient** — `losses.load_balancing_loss` with its two scopes. micro:
  the mean over the step's micro-batches of E·Σ_i f_i^j P_i^j (transformers' convention); global:
  f̄ counted over all micro-batches of the step (detached) and P local and differentiable:
  Σ_j E·Σ_i f̄_i P_i^j / N = E·Σ_i f̄_i P̄_i.
* **per-layer LBL** (`lbl_layers = "per_layer"`, the loss's `layers` setting) — each MoE layer's
  loss over its own experts, averaged over layers, as in Switch, Megatron and Qiu et al.
  transformers' `load_balancing_loss_func` (`"pooled"`) pools all layers' rows into one f and P,
  so a surplus on expert i of one layer cancels a deficit on expert i of another although they
  are different experts: at the tiny scale the pooled loss sat at its uniform value (k) while
  every layer stayed ~2.5x imbalanced (max/mean).

The step runs its micro-batches in one forward pass (rows are independent: causal attention, no
batch statistics), which is numerically the same as accumulating their gradients and lets the
global counts be known before the backward without a second forward. The language-model loss is
the token mean over the step, as with token-weighted accumulation.

What is held equal within a pair: corpus, the sequence of micro-batches (same seed), steps, LR
schedule, coefficient and initial weights. Each arm is trained for every seed in `seeds` (a seed
sets initial weights and packing/domain order); results are reported per seed and as the mean.

Measurement, on held-out documents (the S1 stream after the training documents, so none was
trained on), each document run on its own and truncated to `seq_len`. Per-domain quantities are
combined with the *training mixture* weights w_d (each kind's share of the training tokens), so
"global" means the corpus the model was balanced on:

* **loss** — held-out next-token cross-entropy per domain, mixed with w_d (the verdict's loss);
  also the plain token mean and the training CE averaged over the last quarter of the steps
  (both arms see the same batches, so that difference is paired).
* **global load imbalance** — per MoE layer the expert load of the mixture,
  load_e = Σ_d w_d p(e|d), summarised as max/mean (= 1 + MaxVio_global of Wang et al. 2024, the
  measure Qiu et al. report; 1 = balanced) and the coefficient of variation; averaged over layers.
  During training the same max/mean is logged on every step's global batch (`imb_global`), next
  to the mean over micro-batches (`imb_micro`, what the micro-batch loss optimises).
* **domain specialisation** — the mutual information between domain and expert choice,
  I(D; E) = Σ_d w_d KL(p(e|d) ‖ p(e)) per layer in nats, averaged over layers: 0 when every
  domain routes like the whole corpus, log(#domains) at most. It equals the mean divergence of the
  domains' loads from uniform minus the global load's divergence from uniform, so unlike a
  "share of the top-k experts" it does not grow when routing merely concentrates globally. The
  top-k share of Qiu et al.'s figure (floor k/E) is reported too.

The claim is `reproduced` when, on the mean over seeds, all three hold: global imbalance lower,
loss not higher by more than `loss_tolerance`, mutual information higher. Each seed's verdict is
reported as well.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..config import ConfigError, config_hash
from ..data.packing import PackingLoader
from ..data.synthetic import build_corpus, generate_documents
from ..losses import LBL_LAYERS, LBL_SCOPES, load_balancing_loss, masked_cross_entropy
from ..models.qwen3 import Qwen3
from ..models.registry import get_model_config
from ..stages.common import copy_tokenizer, write_json_atomic
from ..tokenizer import Tokenizer
from ..train.loop import TrainConfig, train
from ..train.metrics import MetricsLog

CLAIM = ("Global-batch LBL: lower global expert-load imbalance than micro-batch LBL at equal or lower "
         "loss, and higher expert specialisation by data domain (Qiu et al. 2025, used for Qwen3-MoE).")
MODES = LBL_SCOPES
"""The two arms: the load-balancing loss's two scopes, ("micro", "global")."""


# ============================================================================ settings
@dataclass(frozen=True)
class MoEExperimentSettings:
    """The `[experiments.moe]` table of a scale file (unknown keys are an error)."""

    model: str = "tiny-moe"
    tokens: int = 300_000
    """Training tokens per run; steps = tokens // (seq_len · micro_batch_size · micro_batches_per_step)."""
    seq_len: int = 256
    micro_batch_size: int = 2
    """Sequences per micro-batch, all of one domain (the micro-batch loss balances each on its own)."""
    micro_batches_per_step: int = 8
    """Micro-batches accumulated per optimizer step (the global batch the global loss balances)."""
    router_aux_loss_coef: float = 0.01
    """The same for both arms."""
    lbl_layers: str = "per_layer"
    """'per_layer': each MoE layer's LBL over its own experts, averaged over layers (Switch, Megatron,
    Qiu et al.); 'pooled': one f and P over all layers' rows (transformers' `load_balancing_loss_func`)."""
    lr: float = 3e-3
    warmup_steps: int = 10
    corpus: str = "s1"
    n_docs: int = 6000
    """Training documents (each domain's packing loops over its documents if needed)."""
    seed: int = 0
    """Data seed: the corpus and the held-out documents (the same for every run)."""
    seeds: tuple[int, ...] = (0, 1)
    """Run seeds: initial weights and batch order; each seed trains both arms."""
    eval_docs_per_domain: int = 32
    """Held-out documents per document kind for the routing and loss measurements."""
    loss_tolerance: float = 0.01
    """'Equal loss' margin in nats: global may be up to this much worse and still count as equal."""
    log_every: int = 1
    """Metrics rows per step (1: every step, which the training-time imbalance curves use)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(int(x) for x in self.seeds))
        if not self.seeds:
            raise ConfigError("experiments.moe.seeds: at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"experiments.moe.seeds: repeated seed in {self.seeds}")
        for name in ("tokens", "seq_len", "micro_batch_size", "micro_batches_per_step", "n_docs",
                     "eval_docs_per_domain", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"experiments.moe.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lbl_layers not in LBL_LAYERS:
            raise ConfigError(f"experiments.moe.lbl_layers must be one of {LBL_LAYERS}, got {self.lbl_layers!r}")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "MoEExperimentSettings":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"experiments.moe: unknown key(s) {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**dict(d))

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.micro_batches_per_step

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig.from_dict({"lr": self.lr, "warmup_steps": min(self.warmup_steps, self.steps - 1),
                                      "steps": self.steps, "log_every": self.log_every, "ckpt_every": 0,
                                      "seed": seed})

    def run_identity(self, mode: str, seed: int) -> dict[str, Any]:
        """Everything that defines one run; the two arms of a seed differ only in `mode`."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("seeds", "eval_docs_per_domain", "loss_tolerance",
                                                                     "log_every")}
        return {**keep, "load_balancing": mode, "run_seed": seed}


# ============================================================================ domain-pure batches
class DomainBatchLoader:
    """Optimizer-step batches of `micro_batches_per_step` domain-pure micro-batches.

    `domain_docs[d]` is the tokenised documents of domain d (anything `PackingLoader` takes). Each
    domain is packed by its own seeded `PackingLoader` (looping over its documents). Step t draws
    its micro-batches' domains by systematic sampling with weights `shares` (rng seeded by
    (seed, t)): each domain gets floor or ceil of M·share micro-batches, in a shuffled order.

    Yields {"input_ids", "labels": [M·b, L], "domain": [M]}: micro-batch j is rows j·b..(j+1)·b.
    Re-iterable and deterministic: every `iter()` starts from step 0 and yields `steps` batches.
    """

    def __init__(self, domain_docs: Sequence[Any], shares: Sequence[float], *, seq_len: int, micro_batch_size: int,
                 micro_batches_per_step: int, steps: int, eot_id: int, pad_id: int | None, seed: int) -> None:
        if len(domain_docs) != len(shares) or not domain_docs:
            raise ValueError("one share per domain, and at least one domain")
        shares = np.asarray(shares, dtype=np.float64)
        if (shares < 0).any() or shares.sum() <= 0:
            raise ValueError(f"domain shares must be >= 0 with a positive sum, got {shares.tolist()}")
        self.shares = shares / shares.sum()
        self.domain_docs = list(domain_docs)
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.micro_batches_per_step, self.steps = int(micro_batches_per_step), int(steps)
        self.eot_id, self.pad_id, self.seed = eot_id, pad_id, int(seed)

    def step_domains(self, step: int) -> np.ndarray:
        """The domains of step `step`'s micro-batches (systematic sampling by share)."""
        rng = np.random.default_rng([self.seed, step])
        m = self.micro_batches_per_step
        points = (np.arange(m) + rng.random()) / m
        cum = np.cumsum(self.shares)
        cum[-1] = 1.0
        return rng.permutation(np.searchsorted(cum, points, side="right"))

    def _stream(self, d: int) -> Iterator[dict[str, torch.Tensor]]:
        loader = PackingLoader(self.domain_docs[d], seq_len=self.seq_len, batch_size=self.micro_batch_size,
                               eot_id=self.eot_id, pad_id=self.pad_id, seed=self.seed * 1000 + d, drop_last=True)
        if loader.batches_per_epoch(0) < 1:
            raise ConfigError(f"domain {d}: fewer tokens than one micro-batch ({self.micro_batch_size} x {self.seq_len})")
        while True:
            yield from loader

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        streams: dict[int, Iterator[dict[str, torch.Tensor]]] = {}
        for step in range(self.steps):
            doms = self.step_domains(step)
            parts = []
            for d in doms:
                if int(d) not in streams:
                    streams[int(d)] = self._stream(int(d))
                parts.append(next(streams[int(d)]))
            yield {"input_ids": torch.cat([p["input_ids"] for p in parts]),
                   "labels": torch.cat([p["labels"] for p in parts]),
                   "domain": torch.as_tensor(doms, dtype=torch.long)}


def selection_counts(router_logits: Sequence[torch.Tensor], micro_batches: int, top_k: int) -> torch.Tensor:
    """Top-k selection counts [micro_batches, L, E] from per-layer logits [M·b·S, E] (rows in micro-batch order)."""
    out = []
    for logits in router_logits:
        e = logits.shape[-1]
        sel = torch.topk(logits.detach().float(), top_k, dim=-1).indices.reshape(micro_batches, -1)
        counts = torch.zeros(micro_batches, e).scatter_add_(1, sel, torch.ones_like(sel, dtype=torch.float32))
        out.append(counts)
    return torch.stack(out, 1)


def step_loss(model: Qwen3, batch: Mapping[str, torch.Tensor], *, mode: str, lbl_layers: str = "per_layer"):
    """CE over the step + coef · the load-balancing loss of scope `mode`; both scopes' losses and both
    imbalances are logged.

    The step's rows are `batch["domain"].shape[0]` equal micro-batches in order, all in one forward, so
    the global scope's counts are those of this forward. micro: mean over micro-batches j of
    E·Σ_i f_i^j P_i^j; global: E·Σ_i f̄_i P̄_i with f̄ over all micro-batches (detached). `lbl_layers`
    is the loss's `layers` setting ("per_layer" or "pooled")."""
    cfg = model.config
    m = int(batch["domain"].shape[0])
    x = batch["input_ids"]
    if x.shape[0] % m:
        raise ValueError(f"{x.shape[0]} rows do not split into {m} equal micro-batches")
    out = model(x, output_router_logits=True)
    ce = masked_cross_entropy(out.logits, batch["labels"])
    k = cfg.num_experts_per_tok

    def lbl(scope: str) -> torch.Tensor:
        return load_balancing_loss(out.router_logits, cfg.num_experts, k, scope=scope, layers=lbl_layers,
                                   micro_batches=m)

    with torch.no_grad():
        other = lbl("global" if mode == "micro" else "micro")
    aux = lbl(mode)
    counts = selection_counts(out.router_logits, m, k).numpy()  # [M, L, E]
    metrics = {
        "num_tokens": int((batch["labels"] != -100).sum()), "ce": ce.detach(), "lbl": aux.detach(),
        "lbl_micro": (aux if mode == "micro" else other).detach(),
        "lbl_global": (aux if mode == "global" else other).detach(),
        "imb_global": float(np.nanmean(max_over_mean(counts.sum(0)))),
        "imb_micro": float(np.nanmean(max_over_mean(counts))),
    }
    return ce + cfg.router_aux_loss_coef * aux, metrics


# ============================================================================ routing measures
def max_over_mean(load: np.ndarray) -> np.ndarray:
    """max/mean of expert loads along the last axis (1 = perfectly balanced; = 1 + MaxVio)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(-1)
    return np.where(mean > 0, load.max(-1) / np.where(mean > 0, mean, 1.0), np.nan)


def coefficient_of_variation(load: np.ndarray) -> np.ndarray:
    """std/mean of expert loads along the last axis (0 = perfectly balanced)."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(-1)
    return np.where(mean > 0, load.std(-1) / np.where(mean > 0, mean, 1.0), np.nan)


def _normalise(counts: np.ndarray) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    return c / np.maximum(c.sum(-1, keepdims=True), 1e-300)


def _domain_weights(domain_counts: np.ndarray, weights: Sequence[float] | None) -> np.ndarray:
    if weights is None:  # the domains' own shares of the selections
        w = np.asarray(domain_counts, dtype=np.float64).sum((1, 2))
    else:
        w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def mixture_load(domain_counts: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """Global expert load per layer, Σ_d w_d p(e|d). domain_counts [D, L, E] -> [L, E] (sums to 1 per layer).

    weights: each domain's share of the corpus (None: the domains' shares of the counts, i.e. the plain sum)."""
    w = _domain_weights(domain_counts, weights)
    return np.einsum("d,dle->le", w, _normalise(domain_counts))


def global_imbalance(domain_counts: np.ndarray, weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Imbalance of the global (mixture) load. domain_counts: [D, L, E]; max/mean and CV averaged over layers."""
    load = mixture_load(domain_counts, weights)
    mom, cv = max_over_mean(load), coefficient_of_variation(load)
    return {"max_over_mean": float(np.nanmean(mom)), "cv": float(np.nanmean(cv)),
            "max_over_mean_per_layer": mom.tolist(), "cv_per_layer": cv.tolist()}


def micro_imbalance(doc_counts: np.ndarray) -> dict[str, float]:
    """Mean over documents (each its own micro-batch) and layers of max/mean and CV. doc_counts: [N, L, E]."""
    doc_counts = np.asarray(doc_counts, dtype=np.float64)
    return {"max_over_mean": float(np.nanmean(max_over_mean(doc_counts))),
            "cv": float(np.nanmean(coefficient_of_variation(doc_counts)))}


def topk_share(counts: np.ndarray, k: int) -> np.ndarray:
    """Share of the selections (last axis = experts) that go to the k most selected experts.

    Uniform routing gives k/E (the floor); a distribution concentrated on k experts gives 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1)
    top = -np.sort(-counts, axis=-1)[..., :k].sum(-1)
    return np.where(total > 0, top / np.where(total > 0, total, 1.0), np.nan)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / np.where(q > 0, q, 1.0)), 0.0)
    return terms.sum(-1)


def kl_from_global(domain_counts: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """KL(p(e|d,layer) ‖ p(e|layer)) in nats, p(e) the mixture load. [D, L, E] -> [D, L]."""
    c = np.asarray(domain_counts, dtype=np.float64)
    kl = _kl(_normalise(c), mixture_load(c, weights)[None])
    return np.where(c.sum(-1) > 0, kl, np.nan)


def kl_from_uniform(counts: np.ndarray) -> np.ndarray:
    """KL(p ‖ uniform) = log E − H(p) of the distribution along the last axis (0 = uniform)."""
    p = _normalise(counts)
    return _kl(p, np.full_like(p, 1.0 / p.shape[-1]))


def mutual_information(domain_counts: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """I(domain; expert) per layer in nats = Σ_d w_d KL(p(e|d) ‖ Σ_d' w_d' p(e|d')). [D, L, E] -> [L]."""
    w = _domain_weights(domain_counts, weights)
    return np.einsum("d,dl->l", w, np.nan_to_num(kl_from_global(domain_counts, weights)))


def domain_specialisation(domain_counts: np.ndarray, k: int, domains: Sequence[str] | None = None,
                          weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Specialisation of experts by domain. domain_counts: [D, L, E] top-k selections per domain.

    mutual_information: I(domain; expert) averaged over layers (0 = no domain prefers other experts
    than the corpus does; at most log D). It decomposes as domain_concentration (Σ_d w_d KL(p(e|d) ‖
    uniform)) minus global_concentration (KL(p(e) ‖ uniform)). top_k_share: per domain and layer the
    share of the domain's selections on its k most used experts (Qiu et al.'s figure), floor k/E.
    kl_per_domain: KL of each domain's routing from the global routing.
    """
    c = np.asarray(domain_counts, dtype=np.float64)
    w = _domain_weights(c, weights)
    share = topk_share(c, k)                 # [D, L]
    kl = kl_from_global(c, weights)          # [D, L]
    mi = mutual_information(c, weights)      # [L]
    names = list(domains) if domains is not None else [str(i) for i in range(c.shape[0])]
    return {
        "mutual_information": float(np.nanmean(mi)),
        "mutual_information_per_layer": mi.tolist(),
        "mutual_information_max": float(np.log(c.shape[0])),
        "domain_concentration": float(np.nanmean(np.einsum("d,dl->l", w, kl_from_uniform(c)))),
        "global_concentration": float(np.nanmean(kl_from_uniform(mixture_load(c, weights)))),
        "top_k_share": float(np.nanmean(np.nanmean(share, 1))),
        "top_k_share_floor": k / c.shape[-1],
        "top_k_share_per_domain": {d: float(np.nanmean(s)) for d, s in zip(names, share)},
        "kl_per_domain": {d: float(np.nanmean(v)) for d, v in zip(names, kl)},
    }


# ============================================================================ held-out routing
def heldout_documents(settings: MoEExperimentSettings) -> list[dict]:
    """`eval_docs_per_domain` documents of every kind from the corpus stream *after* the training
    documents (offset = n_docs), so none was seen in training."""
    need: dict[str, int] = {}
    out: list[dict] = []
    offset, chunk = settings.n_docs, max(200, 40 * settings.eval_docs_per_domain)
    kinds: set[str] | None = None
    while True:
        batch = list(generate_documents(settings.corpus, seed=settings.seed, n_docs=chunk, offset=offset))
        offset += chunk
        if kinds is None:
            kinds = {d["kind"] for d in batch}
        for d in batch:
            if need.get(d["kind"], 0) < settings.eval_docs_per_domain:
                need[d["kind"]] = need.get(d["kind"], 0) + 1
                out.append(d)
        if all(need.get(k, 0) >= settings.eval_docs_per_domain for k in kinds) or offset > settings.n_docs + 50 * chunk:
            return out


@torch.no_grad()
def route_documents(model: Qwen3, ids: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run each document alone (right-padded within a batch; causal, so padding never reaches a
    real token). Returns (selection counts [N, L, E], CE loss sums [N], predicted tokens [N])."""
    cfg = model.config
    model.eval()
    n, k, e = len(ids), cfg.num_experts_per_tok, cfg.num_experts
    counts = np.zeros((n, 0, e))
    loss_sum, n_tok = np.zeros(n), np.zeros(n)
    order = sorted(range(n), key=lambda i: len(ids[i]))
    layers_counts: list[np.ndarray] | None = None
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        lens = [len(ids[i]) for i in idx]
        width = max(lens)
        x = torch.zeros((len(idx), width), dtype=torch.long)
        valid = torch.zeros((len(idx), width), dtype=torch.bool)
        for row, i in enumerate(idx):
            x[row, :lens[row]] = torch.tensor(ids[i])
            valid[row, :lens[row]] = True
        out = model(x, output_router_logits=True)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, x[:, 1:, None])[..., 0] * valid[:, 1:]
        if layers_counts is None:
            layers_counts = [np.zeros((n, e)) for _ in out.router_logits]
        for layer, logits in enumerate(out.router_logits):
            sel = torch.topk(logits.float(), k, dim=-1).indices.view(len(idx), width, k)
            onehot = torch.zeros(len(idx), width, e).scatter_add_(-1, sel, torch.ones_like(sel, dtype=torch.float))
            layers_counts[layer][idx] = (onehot * valid[..., None]).sum(1).numpy()
        loss_sum[idx] = nll.sum(1).numpy()
        n_tok[idx] = valid[:, 1:].sum(1).numpy()
    if layers_counts is not None:
        counts = np.stack(layers_counts, axis=1)  # [N, L, E]
    return counts, loss_sum, n_tok


def group_counts(doc_counts: np.ndarray, labels: Sequence[str], names: Sequence[str] | None = None
                 ) -> tuple[list[str], np.ndarray]:
    """Sum per-document counts [N, L, E] by label -> (labels, [D, L, E]); `names` fixes the order."""
    names = list(names) if names is not None else sorted(set(labels))
    out = np.zeros((len(names), *doc_counts.shape[1:]))
    for i, lab in enumerate(labels):
        if lab in names:
            out[names.index(lab)] += doc_counts[i]
    return names, out


def measure_run(run_dir: Path, docs: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, seq_len: int,
                domains: Sequence[str], weights: Sequence[float]) -> dict[str, Any]:
    """Loss, imbalance and specialisation of the trained model in `run_dir` on held-out `docs`;
    per-domain values are mixed with the training shares `weights` of `domains`."""
    model = Qwen3.from_pretrained(run_dir)
    k = model.config.num_experts_per_tok
    eot = tokenizer.endoftext_id
    ids = [(tokenizer.encode(d["text"]) + [eot])[: seq_len + 1] for d in docs]
    doc_counts, loss_sum, n_tok = route_documents(model, ids)
    kinds = [d["kind"] for d in docs]
    names, kind_counts = group_counts(doc_counts, kinds, domains)
    per_domain_loss = {}
    for name in names:
        sel = [i for i, kd in enumerate(kinds) if kd == name]
        per_domain_loss[name] = float(loss_sum[sel].sum() / max(n_tok[sel].sum(), 1))
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    rows = MetricsLog(str(Path(run_dir) / "metrics.jsonl")).read()
    tail = [r for r in rows if r["step"] > 0.75 * rows[-1]["step"]] if rows else []

    def tail_mean(key: str) -> float | None:
        vals = [r[key] for r in tail if key in r]
        return float(np.mean(vals)) if vals else None

    return {
        "heldout_loss": float(sum(wi * per_domain_loss[n] for wi, n in zip(w, names))),
        "heldout_loss_token_mean": float(loss_sum.sum() / max(n_tok.sum(), 1)),
        "heldout_loss_per_domain": per_domain_loss,
        "train_ce_last_quarter": tail_mean("ce"),
        "train_imbalance_global_last_quarter": tail_mean("imb_global"),
        "train_imbalance_micro_last_quarter": tail_mean("imb_micro"),
        "global_imbalance": global_imbalance(kind_counts, w),
        "micro_imbalance": micro_imbalance(doc_counts),
        "specialisation": domain_specialisation(kind_counts, k, names, w),
        "heldout_documents": len(docs),
        "heldout_tokens": int(n_tok.sum()),
        "_routing_share": {"domains": names, "share": _normalise(kind_counts).tolist()},
    }


# ============================================================================ training
def training_domains(s: MoEExperimentSettings, tokenizer: Tokenizer, cache_dir: Path) -> tuple[list[str], list[Any], list[float]]:
    """The training documents split by kind: (kinds, tokenised documents per kind, token share per kind)."""
    ds = build_corpus(s.corpus, seed=s.seed, n_docs=s.n_docs, offset=0, cache_dir=cache_dir)
    kinds = list(ds["kind"])
    backend = tokenizer.backend
    encoded = [enc.ids for enc in backend.encode_batch(list(ds["text"]), add_special_tokens=False)]
    names = sorted(set(kinds))
    per_kind = [[np.asarray(ids, dtype=np.int64) for ids, kd in zip(encoded, kinds) if kd == name] for name in names]
    tokens = np.array([sum(len(x) + 1 for x in docs) for docs in per_kind], dtype=np.float64)
    keep = [i for i, t in enumerate(tokens) if t >= s.seq_len * s.micro_batch_size + 1]
    names = [names[i] for i in keep]
    per_kind = [per_kind[i] for i in keep]
    tokens = tokens[keep]
    return names, per_kind, (tokens / tokens.sum()).tolist()


def train_arm(s: MoEExperimentSettings, mode: str, seed: int, domain_docs: Sequence[Any], shares: Sequence[float],
              tokenizer: Tokenizer, tokenizer_dir: Path, run_dir: Path,
              printer: Callable[[str], None]) -> Path:
    """Train one arm for one seed into `run_dir` (resumes a cut run of the same identity)."""
    model_cfg = get_model_config(s.model)
    if not model_cfg.is_moe:
        raise ConfigError(f"experiments.moe.model: {s.model} is not a MoE model")
    model_cfg = model_cfg.replace(eos_token_id=tokenizer.endoftext_id, bos_token_id=None,
                                  max_position_embeddings=max(model_cfg.max_position_embeddings, s.seq_len),
                                  router_aux_loss_coef=float(s.router_aux_loss_coef))
    torch.manual_seed(seed)
    model = Qwen3(model_cfg)
    loader = DomainBatchLoader(domain_docs, shares, seq_len=s.seq_len, micro_batch_size=s.micro_batch_size,
                               micro_batches_per_step=s.micro_batches_per_step, steps=s.steps,
                               eot_id=tokenizer.endoftext_id, pad_id=tokenizer.pad_token_id, seed=seed)

    def loss_fn(m, batch):
        return step_loss(m, batch, mode=mode, lbl_layers=s.lbl_layers)

    def quiet(line: str) -> None:  # metrics every step, progress lines only at the quarters
        hit = re.match(r"step\s+(\d+)/", line)
        if hit and int(hit.group(1)) % max(1, s.steps // 4) and int(hit.group(1)) != s.steps:
            return
        printer(f"  {mode}-batch LBL, seed {seed}: {line}" if hit else line)

    train(model, loader, loss_fn, s.train_config(seed), run_dir, resume="auto", printer=quiet,
          run_extra={"experiment": "moe_balance", **s.run_identity(mode, seed)})
    copy_tokenizer(tokenizer_dir, run_dir)
    return run_dir


# ============================================================================ verdict
PART_NAMES = ("lower_global_imbalance", "equal_or_lower_loss", "higher_specialisation")


def claim_parts(micro: Mapping[str, Any], glob: Mapping[str, Any], loss_tolerance: float) -> dict[str, bool]:
    return {
        "lower_global_imbalance": glob["global_imbalance"]["max_over_mean"] < micro["global_imbalance"]["max_over_mean"],
        "equal_or_lower_loss": glob["heldout_loss"] <= micro["heldout_loss"] + loss_tolerance,
        "higher_specialisation": glob["specialisation"]["mutual_information"] > micro["specialisation"]["mutual_information"],
    }


SUMMARY_KEYS = {
    "heldout_loss": ("heldout_loss",),
    "train_ce_last_quarter": ("train_ce_last_quarter",),
    "global_imbalance": ("global_imbalance", "max_over_mean"),
    "global_imbalance_cv": ("global_imbalance", "cv"),
    "train_imbalance_global": ("train_imbalance_global_last_quarter",),
    "train_imbalance_micro": ("train_imbalance_micro_last_quarter",),
    "micro_imbalance": ("micro_imbalance", "max_over_mean"),
    "mutual_information": ("specialisation", "mutual_information"),
    "top_k_share": ("specialisation", "top_k_share"),
    "domain_concentration": ("specialisation", "domain_concentration"),
    "global_concentration": ("specialisation", "global_concentration"),
}


def summarise(result: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline numbers of one run, flat."""
    out: dict[str, float | None] = {}
    for name, path in SUMMARY_KEYS.items():
        v: Any = result
        for p in path:
            v = v.get(p) if isinstance(v, Mapping) else None
        out[name] = None if v is None else float(v)
    return out


def mean_summary(rows: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if r[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def judge(micro: Mapping[str, Any], glob: Mapping[str, Any], loss_tolerance: float,
          per_seed: Mapping[int, Mapping[str, bool]] | None = None) -> tuple[bool, dict[str, bool], str]:
    """The claim's three parts on (mean) summaries, and a diagnosis in words naming the numbers.

    micro/glob: `summarise`-style dicts (or full results; both are read through `summarise`)."""
    m = micro if "mutual_information" in micro else summarise(micro)
    g = glob if "mutual_information" in glob else summarise(glob)
    parts = {"lower_global_imbalance": g["global_imbalance"] < m["global_imbalance"],
             "equal_or_lower_loss": g["heldout_loss"] <= m["heldout_loss"] + loss_tolerance,
             "higher_specialisation": g["mutual_information"] > m["mutual_information"]}
    ok = all(parts.values())
    lines = [
        f"global imbalance (max/mean expert load of the training mixture, held out): micro {m['global_imbalance']:.3f}, "
        f"global {g['global_imbalance']:.3f} -> {'lower' if parts['lower_global_imbalance'] else 'NOT lower'} with global LBL",
        f"held-out loss (training mixture): micro {m['heldout_loss']:.4f}, global {g['heldout_loss']:.4f} "
        f"(tolerance {loss_tolerance}) -> {'equal or lower' if parts['equal_or_lower_loss'] else 'higher'} with global LBL",
        f"specialisation, I(domain; expert) in nats: micro {m['mutual_information']:.4f}, global "
        f"{g['mutual_information']:.4f} -> {'higher' if parts['higher_specialisation'] else 'NOT higher'} with global LBL",
    ]
    if m.get("top_k_share") is not None and g.get("top_k_share") is not None:
        lines.append(f"top-k share per domain (Qiu et al.'s figure): micro {m['top_k_share']:.3f}, global {g['top_k_share']:.3f}")
    if m.get("train_imbalance_global") is not None and g.get("train_imbalance_global") is not None:
        lines.append(f"during training (last quarter), max/mean of each step's global batch: micro "
                     f"{m['train_imbalance_global']:.3f}, global {g['train_imbalance_global']:.3f}; mean over its "
                     f"domain-pure micro-batches: micro {m['train_imbalance_micro']:.3f}, global {g['train_imbalance_micro']:.3f}")
    if per_seed:
        for part in PART_NAMES:
            votes = [bool(p[part]) for p in per_seed.values()]
            if len(set(votes)) > 1:
                lines.append(f"seeds disagree on {part}: holds for seed(s) "
                             f"{[sd for sd, p in per_seed.items() if p[part]]} only")
    if not ok:
        reasons = []
        if not parts["lower_global_imbalance"]:
            reasons.append("imbalance: the micro-batch loss balances every domain separately, which also balances "
                           "their mixture; the global loss only asks for the mixture, and here it ends no lower")
        if not parts["equal_or_lower_loss"]:
            reasons.append("loss: global LBL is worse by more than the tolerance")
        if not parts["higher_specialisation"]:
            reasons.append("specialisation: domains do not route more differently from each other with global LBL")
        lines.append("not reproduced: " + " | ".join(reasons))
    return ok, parts, "\n".join(lines)


# ============================================================================ plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_summary(per_seed: Mapping[str, Mapping[int, Mapping[str, float]]], path: Path) -> None:
    """Per-seed points (a seed's two arms joined) and the mean over seeds, for the two arms."""
    plt = _plt()
    panels = [("heldout_loss", "held-out loss (nats)", "Loss (lower is better)"),
              ("global_imbalance", "max/mean expert load", "Global imbalance (1 = balanced)"),
              ("mutual_information", "I(domain; expert), nats", "Domain specialisation"),
              ("micro_imbalance", "mean per-document max/mean", "Per-document imbalance (reference)")]
    seeds = list(per_seed[MODES[0]])
    offsets = dict(zip(seeds, np.linspace(-0.1, 0.1, len(seeds)) if len(seeds) > 1 else [0.0]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for sd in seeds:
            pts = [(j + offsets[sd], per_seed[mode].get(sd, {}).get(key)) for j, mode in enumerate(MODES)]
            pts = [(x, y) for x, y in pts if y is not None]
            if len(pts) == 2:
                ax.plot([x for x, _ in pts], [y for _, y in pts], color="gray", lw=0.8, zorder=1)
            for x, y in pts:
                ax.scatter([x], [y], color=f"C{int(round(x))}", edgecolor="k", zorder=3)
        for j, mode in enumerate(MODES):
            vals = [r[key] for r in per_seed[mode].values() if r.get(key) is not None]
            if vals:
                ax.hlines(float(np.mean(vals)), j - 0.25, j + 0.25, color=f"C{j}", lw=3, zorder=2,
                          label=f"{mode} LBL, mean")
        ax.set_xlim(-0.5, len(MODES) - 0.5)
        ax.set_xticks(range(len(MODES)))
        ax.set_xticklabels([f"{m} LBL" for m in MODES])
        ax.set(ylabel=ylabel, title=title)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Micro- vs global-batch load balancing: dots = seeds {seeds} (a seed's arms joined), thick lines = mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_training(run_dirs: Mapping[tuple[str, int], Path], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for (mode, seed), d in sorted(run_dirs.items()):
        rows = MetricsLog(str(d / "metrics.jsonl")).read()
        steps = [r["step"] for r in rows]
        style = dict(color=f"C{MODES.index(mode)}", ls=["-", "--", ":", "-."][list(sorted({s for _, s in run_dirs})).index(seed) % 4],
                     label=f"{mode} LBL, seed {seed}")
        axes[0].plot(steps, [r.get("ce", r["loss"]) for r in rows], **style)
        axes[1].plot(steps, [r.get("imb_global", np.nan) for r in rows], **style)
        axes[2].plot(steps, [r.get("imb_micro", np.nan) for r in rows], **style)
    axes[0].set(xlabel="step", ylabel="training CE", title="Language-model loss")
    axes[1].set(xlabel="step", ylabel="max/mean", title="Imbalance of each step's global batch")
    axes[2].set(xlabel="step", ylabel="max/mean", title="Imbalance within its micro-batches (mean)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_routing(result: Mapping[str, Any], title: str, path: Path) -> None:
    plt = _plt()
    domains = result["_routing_share"]["domains"]
    share = np.asarray(result["_routing_share"]["share"])  # [D, L, E]
    n_layers = share.shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(3.2 * n_layers + 1, 0.35 * len(domains) + 1.8), squeeze=False)
    vmax = float(share.max()) if share.size else 1.0
    im = None
    for layer in range(n_layers):
        ax = axes[0, layer]
        im = ax.imshow(share[:, layer], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if layer == 0 else [])
    if im is not None:
        fig.colorbar(im, ax=axes[0, :].tolist(), label="share of the domain's selections")
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ============================================================================ entry point
def run_moe_experiment(settings: Mapping[str, Any] | MoEExperimentSettings, tokenizer_dir: Path, out_dir: Path,
                       cache_dir: Path, printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the MoE with micro- and global-batch LBL for every seed, measure, write `moe_balance.json` and plots.

    settings: the scale file's `[experiments.moe]` table (`MoEExperimentSettings` fields).
    tokenizer_dir: a directory holding the tokenizer (and no model). Runs resume when cut.
    Returns {"claim", "micro", "global" (mean summaries), "per_seed" ({mode: {seed: summary}}),
    "reproduced", "parts", "parts_per_seed", "diagnosis", "domains", "settings", "steps", "wall_s", "files"}.
    """
    s = settings if isinstance(settings, MoEExperimentSettings) else MoEExperimentSettings.from_mapping(settings)
    out_dir, cache_dir, tokenizer_dir = Path(out_dir), Path(cache_dir), Path(tokenizer_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.load(tokenizer_dir)
    t0 = time.time()
    names, domain_docs, shares = training_domains(s, tokenizer, cache_dir)
    printer(f"moe experiment: {s.model}, {s.steps} steps x {s.micro_batches_per_step} domain-pure micro-batches x "
            f"{s.micro_batch_size} x {s.seq_len}, aux coef {s.router_aux_loss_coef} ({s.lbl_layers} LBL), seeds {list(s.seeds)}; domains "
            + ", ".join(f"{n} {100 * w:.0f}%" for n, w in zip(names, shares)))
    run_dirs: dict[tuple[str, int], Path] = {}
    wall: dict[tuple[str, int], float] = {}
    for seed in s.seeds:
        for mode in MODES:
            run_dir = out_dir / f"{mode}-seed{seed}-{config_hash(s.run_identity(mode, seed))[:8]}"
            t = time.time()
            run_dirs[mode, seed] = train_arm(s, mode, seed, domain_docs, shares, tokenizer, tokenizer_dir, run_dir, printer)
            wall[mode, seed] = time.time() - t
    docs = heldout_documents(s)
    printer(f"moe experiment: measuring routing on {len(docs)} held-out documents")
    results = {key: measure_run(d, docs, tokenizer, s.seq_len, names, shares) for key, d in run_dirs.items()}
    per_seed = {mode: {seed: summarise(results[mode, seed]) for seed in s.seeds} for mode in MODES}
    parts_per_seed = {seed: claim_parts(results["micro", seed], results["global", seed], s.loss_tolerance)
                      for seed in s.seeds}
    micro_mean, glob_mean = mean_summary(list(per_seed["micro"].values())), mean_summary(list(per_seed["global"].values()))
    ok, parts, diagnosis = judge(micro_mean, glob_mean, s.loss_tolerance, parts_per_seed)

    _plot_summary(per_seed, out_dir / "moe_summary.png")
    _plot_training(run_dirs, out_dir / "moe_training.png")
    first = s.seeds[0]
    for mode in MODES:
        r = results[mode, first]
        _plot_routing(r, f"Routing share by domain, {mode}-batch LBL, seed {first} "
                         f"(I(domain; expert) {r['specialisation']['mutual_information']:.3f} nats)",
                      out_dir / f"moe_routing_{mode}.png")
    files = ["moe_balance.json", "moe_summary.png", "moe_training.png", "moe_routing_micro.png", "moe_routing_global.png"]
    summary = {
        "claim": CLAIM,
        "micro": micro_mean,
        "global": glob_mean,
        "per_seed": per_seed,
        "reproduced": ok,
        "parts": parts,
        "parts_per_seed": parts_per_seed,
        "diagnosis": diagnosis,
        "domains": dict(zip(names, shares)),
        "details": {f"{mode}-seed{seed}": {**{k: v for k, v in results[mode, seed].items() if not k.startswith("_")},
                                           "train_wall_s": wall[mode, seed]} for mode, seed in results},
        "settings": asdict(s),
        "steps": s.steps,
        "wall_s": time.time() - t0,
        "files": files,
    }
    write_json_atomic(out_dir / "moe_balance.json", summary)
    printer("moe experiment: " + ("REPRODUCED" if ok else "NOT reproduced") + "\n" + diagnosis)
    return summary


__all__ = ["CLAIM", "MODES", "MoEExperimentSettings", "DomainBatchLoader", "run_moe_experiment", "step_loss",
           "selection_counts", "global_imbalance", "micro_imbalance", "mixture_load", "topk_share", "kl_from_global",
           "kl_from_uniform", "mutual_information", "domain_specialisation", "max_over_mean",
           "coefficient_of_variation", "claim_parts", "summarise", "mean_summary", "judge", "heldout_documents",
           "route_documents", "measure_run", "training_domains", "train_arm"]
