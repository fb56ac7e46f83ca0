"""Measures of routing from top-k selection counts: expert-load imbalance (max/mean, CV) and
specialisation by domain (mutual information between domain and expert, top-k share).

Counts are arrays whose last axis is the experts: [D, L, E] per domain and layer, or [N, L, E] per
document. Pure numpy, no model."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


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


def normalise(counts: np.ndarray) -> np.ndarray:
    """Counts as shares along the last axis (an all-zero row stays zero)."""
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
    return np.einsum("d,dle->le", w, normalise(domain_counts))


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
    kl = _kl(normalise(c), mixture_load(c, weights)[None])
    return np.where(c.sum(-1) > 0, kl, np.nan)


def kl_from_uniform(counts: np.ndarray) -> np.ndarray:
    """KL(p ‖ uniform) = log E − H(p) of the distribution along the last axis (0 = uniform)."""
    p = normalise(counts)
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


__all__ = ["max_over_mean", "coefficient_of_variation", "mixture_load", "global_imbalance", "micro_imbalance",
           "topk_share", "kl_from_global", "kl_from_uniform", "mutual_information", "domain_specialisation",
           "normalise"]
