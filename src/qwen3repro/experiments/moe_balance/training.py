"""Training one arm: the step loss (CE + coef x the micro- or global-scope load-balancing loss, with
both losses and both imbalances logged) and the run of one (scope, seed) pair."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ...config import ConfigError
from ...losses import load_balancing_loss, masked_cross_entropy
from ...models.qwen3 import Qwen3
from ...models.registry import get_model_config
from ...recipes import rope_base
from ...stages.common import copy_tokenizer
from ...tokenizer import Tokenizer
from ...train.loop import train
from .data import DomainBatchLoader
from .routing import max_over_mean
from .settings import MoEExperimentSettings


def selection_counts(router_logits: Sequence[torch.Tensor], micro_batches: int, top_k: int) -> torch.Tensor:
    """Top-k selection counts [micro_batches, L, E] from per-layer logits [M·b·S, E] (rows in micro-batch order)."""
    out = []
    for logits in router_logits:
        e = logits.shape[-1]
        sel = torch.topk(logits.detach().float(), top_k, dim=-1).indices.reshape(micro_batches, -1)
        counts = torch.zeros(micro_batches, e, device=sel.device).scatter_add_(
            1, sel, torch.ones_like(sel, dtype=torch.float32))
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
    counts = selection_counts(out.router_logits, m, k).cpu().numpy()  # [M, L, E], read on the host
    metrics = {
        "num_tokens": int((batch["labels"] != -100).sum()), "ce": ce.detach(), "lbl": aux.detach(),
        "lbl_micro": (aux if mode == "micro" else other).detach(),
        "lbl_global": (aux if mode == "global" else other).detach(),
        "imb_global": float(np.nanmean(max_over_mean(counts.sum(0)))),
        "imb_micro": float(np.nanmean(max_over_mean(counts))),
    }
    return ce + cfg.router_aux_loss_coef * aux, metrics

def train_arm(s: MoEExperimentSettings, mode: str, seed: int, domain_docs: Sequence[Any], shares: Sequence[float],
              tokenizer: Tokenizer, tokenizer_dir: Path, run_dir: Path,
              printer: Callable[[str], None], device: str = "cpu") -> Path:
    """Train one arm for one seed into `run_dir` on `device` (resumes a cut run of the same identity; the
    device is not part of it)."""
    model_cfg = get_model_config(s.model)
    if not model_cfg.is_moe:
        raise ConfigError(f"experiments.moe.model: {s.model} is not a MoE model")
    model_cfg = model_cfg.replace(eos_token_id=tokenizer.endoftext_id, bos_token_id=None, rope_theta=rope_base("s1"),
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

    train(model, loader, loss_fn, s.train_config(seed).replace(device=device), run_dir, resume="auto", printer=quiet,
          run_extra={"experiment": "moe_balance", **s.run_identity(mode, seed)})
    copy_tokenizer(tokenizer_dir, run_dir)
    return run_dir


__all__ = ["selection_counts", "step_loss", "train_arm"]
