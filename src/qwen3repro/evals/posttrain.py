"""Measurements of the reasoning post-training stages: the cold-start models' own outputs
(Filtering, report §4.1) and plots of the reasoning-RL stage's records (§4.2).

**Filtering.** A cold-start model answers held-out queries (`coldstart.pipeline.heldout_queries`:
the task families' evaluation partition, never in any pool) in thinking mode with pinned sampling.
Each output is scored by the verifier (malformed output is wrong) and run through the same six
defect detectors that filtered the training data (`measure_filtering`).

**Reasoning RL.** The stage logs every step to `metrics.jsonl` and screens its candidate queries
into `selection.json`; `plot_grpo_curves` and `plot_selection` draw them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .. import plotting
from ..coldstart.filters import ResponseFilter
from ..coldstart.pipeline import ColdStartConfig, evaluate_outputs, heldout_queries
from ..coldstart.pool import build_pool
from ..data.world import build_world
from ..devices import model_device
from ..generate import SamplingParams, generate
from ..models.qwen3 import Qwen3
from ..rl.rollout import prompt_ids
from ..tokenizer import Tokenizer

# Sampling of the Filtering evaluation: the report's recommended thinking-mode settings
# (Qwen3 model cards: temperature 0.6, top-p 0.95, top-k 20), one sample per query, seeded.
FILTERING_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
FILTERING_SEED = 1234


def _complete(model_dir: Path, queries: Sequence, *, max_new_tokens: int, seed: int,
              batch_size: int = 32, device: str = "cpu") -> list[str]:
    """One thinking-mode completion per query (chat template, generation prompt), decoded; the model on `device`."""
    model = Qwen3.from_pretrained(model_dir, device=device).eval()
    tok = Tokenizer.load(model_dir)
    stop = [tok.token_to_id("<|im_end|>"), tok.endoftext_id]
    # On the model's device: the sampler draws its noise there, and a CPU generator cannot fill a GPU tensor.
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    texts: list[str] = []
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        outs = generate(model, [prompt_ids(tok, q) for q in chunk], FILTERING_SAMPLING, max_new_tokens=max_new_tokens,
                        stop_token_ids=stop, tokenizer=tok, generator=generator)
        texts.extend(tok.decode(o.token_ids) for o in outs)
    return texts


def measure_filtering(dirs: Mapping[str, Path], coldstart_table: Mapping[str, Any], *, n_per_cell: int,
                      max_new_tokens: int, seed: int = FILTERING_SEED, device: str = "cpu") -> dict[str, Any]:
    """Accuracy and defect rates of each cold-start model's own outputs on held-out queries (generated on `device`)."""
    cs = ColdStartConfig.from_dict(coldstart_table)
    pool = build_pool(n_queries=1, n_validation=cs.n_validation, distractor_rate=0.0, seed=cs.seed,
                      families=cs.families or None, world_seed=cs.world_seed)
    detectors = ResponseFilter(cs.filter_thresholds(), validation=pool.validation, world=build_world(cs.world_seed))
    queries = heldout_queries(n_per_cell=n_per_cell, seed=seed, families=cs.families or None)
    results: dict[str, Any] = {}
    for name, d in dirs.items():
        texts = _complete(d, queries, max_new_tokens=max_new_tokens, seed=seed, device=device)
        res = evaluate_outputs(texts, queries, detectors)
        res["examples"] = [{"question": q.question, "output": t} for q, t in list(zip(queries, texts))[:3]]
        results[name] = res
    results["settings"] = {"sampling": FILTERING_SAMPLING.__dict__, "seed": seed, "max_new_tokens": max_new_tokens,
                           "queries": len(queries), "n_per_cell": n_per_cell, "mode": "thinking (chat template)",
                           "heldout": "data.tasks.is_heldout (evaluation partition)"}
    return results


def plot_filtering(res: Mapping[str, Any], path: Path) -> str:
    """Accuracy and defect rates of the filtered and unfiltered cold-start models' outputs."""
    names = ["filtered", "unfiltered"]
    defects = sorted(res["filtered"]["defect_rates"])
    width = 0.38
    labels = ["accuracy", "any defect"] + defects
    with plotting.figure(path, figsize=(8, 3.5)) as (fig, axes):
        ax = axes[0, 0]
        for i, name in enumerate(names):
            r = res[name]
            values = [r["accuracy"], r["any_defect_rate"]] + [r["defect_rates"][d] for d in defects]
            ax.bar([x + (i - 0.5) * width for x in range(len(labels))], values, width, label=f"cold start ({name})")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("share of held-out outputs")
        ax.set_title("Filtering claim: the cold-start models' own outputs")
        ax.legend()
    return str(path)


def plot_selection(selection: Mapping[str, Any], path: Path) -> str | None:
    """The cold-start model's pass rate on the RL candidates by sub-domain and difficulty, with the
    learnable band (0 < rate < ceiling): what query selection had to choose from."""
    rows = selection.get("by_domain_difficulty") or []
    if not rows:
        return None
    labels = [f"{r['domain']}/{r['difficulty']}" for r in rows]
    with plotting.figure(path, figsize=(max(6, 0.5 * len(rows)), 3.5)) as (fig, axes):
        ax = axes[0, 0]
        ax.bar(range(len(rows)), [r["mean_pass_rate"] for r in rows], color="tab:blue", label="mean pass rate")
        ax.plot(range(len(rows)), [r["learnable"] / max(r["candidates"], 1) for r in rows], "o", color="tab:green",
                label="share learnable")
        ax.axhline(selection.get("ceiling", 1.0), color="tab:red", ls="--", label="ceiling (too easy above)")
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"RL query selection: cold-start pass rate (k={selection.get('k')}), "
                     f"{selection.get('n_selected', 0)}/{selection.get('n_candidates', 0)} selected")
        ax.legend()
    return str(path)


def plot_grpo_curves(records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "GRPO",
                     entropy_floor: float | None = None) -> str | None:
    """Reward, entropy, response length, clip fraction, KL, zero-variance share, held-out pass@k and the
    entropy coefficient by step, from the stage's `metrics.jsonl` records; `entropy_floor` (a share
    of the first step's entropy) is drawn on the entropy panel. None when nothing was logged."""
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval/pass@1" in r]
    if not steps and not evals:
        return None
    panels = [("reward", "reward"), ("entropy", "entropy (nats/token)"), ("response_length", "response length"),
              ("clip_fraction", "clip fraction"), ("kl", "KL to start (k3)"),
              ("zero_variance_share", "zero-variance groups")]
    with plotting.figure(path, nrows=2, ncols=4, figsize=(16, 6.5), title=title) as (fig, axes):
        for ax, (key, label) in zip(axes.flat, panels):
            xs = [r["step"] for r in steps if isinstance(r.get(key), (int, float))]
            ax.plot(xs, [r[key] for r in steps if isinstance(r.get(key), (int, float))], lw=1.2)
            ax.set_title(label)
            ax.set_xlabel("step")
            if key == "entropy" and xs and entropy_floor is not None:
                start = steps[0].get("entropy")
                if isinstance(start, (int, float)):
                    ax.axhline(entropy_floor * start, color="red", ls="--", lw=0.8,
                               label=f"{entropy_floor:g} of start")
                    ax.legend(fontsize=7)
        ax = axes.flat[6]
        for key in sorted({k for r in evals for k in r if k.startswith("eval/pass@") and "/" not in k[5:]}):
            ax.plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key[5:])
        ax.set_title("held-out")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax = axes.flat[7]
        ax.plot([r["step"] for r in steps], [r.get("entropy_coef", 0.0) for r in steps])
        ax.set_title("entropy coefficient")
        ax.set_xlabel("step")
    return str(path)


__all__ = ["FILTERING_SAMPLING", "FILTERING_SEED", "measure_filtering", "plot_filtering", "plot_grpo_curves",
           "plot_selection"]
