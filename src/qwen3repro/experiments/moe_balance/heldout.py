"""Measuring a trained run on held-out documents: each document routed on its own, the counts grouped
by domain and mixed with the training shares (`routing`), plus the held-out loss and the training
curves' last quarter."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ...data.synthetic import generate_documents
from ...devices import model_device
from ...models.qwen3 import Qwen3
from ...tokenizer import Tokenizer
from ...train.metrics import MetricsLog
from .routing import domain_specialisation, global_imbalance, micro_imbalance, normalise
from .settings import MoEExperimentSettings


def heldout_documents(settings: MoEExperimentSettings) -> list[dict]:
    """`eval_docs_per_domain` documents of every kind from the corpus stream *after* the training
    documents (offset = n_docs), so none was seen in training."""
    need: dict[str, int] = {}
    out: list[dict] = []
    offset, chunk = settings.n_docs, max(200, 40 * settings.eval_docs_per_domain)
    kinds: set[str] | None = None
    while True:
        batch = list(generate_documents(settings.corpus, seed=settings.seed, n_docs=chunk, offset=offset,
                                              seq_len=settings.seq_len))
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
    device = model_device(model)  # the batches are built there; the counts and losses come back as numpy
    n, k, e = len(ids), cfg.num_experts_per_tok, cfg.num_experts
    counts = np.zeros((n, 0, e))
    loss_sum, n_tok = np.zeros(n), np.zeros(n)
    order = sorted(range(n), key=lambda i: len(ids[i]))
    layers_counts: list[np.ndarray] | None = None
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        lens = [len(ids[i]) for i in idx]
        width = max(lens)
        x = torch.zeros((len(idx), width), dtype=torch.long, device=device)
        valid = torch.zeros((len(idx), width), dtype=torch.bool, device=device)
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
            onehot = torch.zeros(len(idx), width, e, device=device).scatter_add_(
                -1, sel, torch.ones_like(sel, dtype=torch.float))
            layers_counts[layer][idx] = (onehot * valid[..., None]).sum(1).cpu().numpy()
        loss_sum[idx] = nll.sum(1).cpu().numpy()
        n_tok[idx] = valid[:, 1:].sum(1).cpu().numpy()
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
                domains: Sequence[str], weights: Sequence[float], device: str = "cpu") -> dict[str, Any]:
    """Loss, imbalance and specialisation of the trained model in `run_dir` (run on `device`) on held-out
    `docs`; per-domain values are mixed with the training shares `weights` of `domains`."""
    model = Qwen3.from_pretrained(run_dir, device=device)
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
        "_routing_share": {"domains": names, "share": normalise(kind_counts).tolist()},
    }


__all__ = ["heldout_documents", "route_documents", "group_counts", "measure_run"]
