"""Scaling laws for the optimal learning rate and batch size (Qwen3 report §2, at tiny scale).

The report says Qwen3 "develop[ed] scaling laws for optimal hyper-parameters (e.g., learning rate
scheduler, and batch size)" and set "the predicted optimal learning rate and batch size strategy
for each dense or MoE model", but gives no numbers or formulas. This module does the same at tiny
scale, in the regime the tiny recipes train in:

1. **Runs.** Each run is a short pretraining on the S1 corpus at the recipes' sequence length (256),
   with the recipes' AdamW and a warmup-stable-decay schedule (`train.loop.train`), scored by the
   loss on held-out S1 documents (the corpus stream after the training documents). Its token budget
   is proportional to the model's non-embedding parameters N (`tokens_per_param`, ~1 like S1 of
   the tiny recipes), so every size is measured at the same data-to-model ratio and a larger batch
   means fewer steps.
2. **Search.** Learning rates lie on a factor-2 lattice (`lr_base`·2^k) and batches on powers of
   two (sequences of 256). A full grid per size is unaffordable (the largest size costs minutes per
   run), so each size runs a compass search on the lattice (`search_size`): a point and its four
   neighbours (half and double the batch, half and double the LR); while a neighbour beats the
   point, move there and run its neighbours too. It stops at a point better than all four
   neighbours: the lattice's local optimum with three points on each axis around it. The smallest
   size starts at `first_centre`, each larger one at the previous size's optimum (sizes are ~3x
   apart, so the optimum moves about one lattice step per size). The small sizes, cheap and noisy,
   run several seeds and are searched on the mean over seeds.
3. **Optimum per size** (`size_optimum`). The LR optimum is the vertex of a parabola in log2 LR
   through the best point and its two LR neighbours (at the best batch), the batch optimum likewise
   in log2 batch (at the best LR). Where a neighbour could not be run (one sequence is the smallest
   batch, and at ~1 token per parameter the smallest sizes would want less) the optimum is the best
   lattice point and flagged as a bound.
4. **Power laws.** lr_opt = a·N^b and B_opt = c·N^d (B in tokens per step), fitted by least squares
   in log space on the sizes whose optimum is not a bound (`fit_optima`, `fit_power_law`, with R²
   and the exponent's standard error), and evaluated at tiny-student and tiny-flagship.

Sizes (`SWEEP_SIZES`) are registry-style configs of tiny-student's shape (head_dim 32, tied
embeddings, SwiGLU at 3× width) from ~27k to ~0.79M non-embedding parameters, tiny-student itself
the largest, so tiny-flagship (≈2.1× tiny-student's N) is a short extrapolation.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..config import ModelConfig
from ..data.packing import PackingLoader
from ..data.synthetic import generate_documents
from ..models.qwen3 import Qwen3
from .. import plotting
from ..models.registry import count_parameters, get_model_config
from ..recipes import load_scale, rope_base
from ..files import write_json_atomic
from ..stages.common import StageContext
from ..stages import tokenizer as tokenizer_stage
from ..stages.pretrain import PretrainConfig, pretrain_loss, tokenized_corpus
from ..tokenizer import Tokenizer
from ..train.loop import TrainConfig, TrainingDivergedError, train


# ============================================================================ model sizes
def _derived(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int | None = None) -> ModelConfig:
    """tiny-student's shape at another width/depth (head_dim 32, intermediate 3× hidden, tied)."""
    base = get_model_config("tiny-student")
    changes: dict[str, Any] = dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads)
    if vocab is not None:
        changes["vocab_size"] = vocab
    return base.replace(**changes)


# Non-embedding N: 26,912 / 98,752 / 323,424 / 787,840 (a factor ~3 apart, 29x in all).
SWEEP_SIZES: dict[str, ModelConfig] = {
    "sl-32x2": _derived(32, 2, 1, 1),
    "sl-64x2": _derived(64, 2, 2, 1),
    "sl-96x3": _derived(96, 3, 3, 1),
    "sl-128x4": get_model_config("tiny-student"),  # = tiny-student
}
# For the --quick smoke run: two toy sizes on a 512-token vocabulary.
QUICK_SIZES: dict[str, ModelConfig] = {
    "sl-32x1": _derived(32, 1, 1, 1, vocab=512),
    "sl-48x2": _derived(48, 2, 2, 1, vocab=512),
}
PREDICT_FOR = ("tiny-student", "tiny-flagship")


def non_embedding_params(cfg: ModelConfig) -> int:
    return count_parameters(cfg)["non_embedding"]


# ============================================================================ sweep settings
def tiny_s1_seq_len() -> int:
    """S1's row length at the tiny scale (tiny/tiny.toml), whose corpus and model shape the sweep fits."""
    return int(load_scale("tiny")["stages"]["s1"]["seq_len"])


@dataclass(frozen=True)
class SweepSettings:
    """The sizes, lattice, search and budgets of one sweep."""

    sizes: tuple[str, ...] = tuple(SWEEP_SIZES)
    seeds_per_size: tuple[int, ...] = (4, 3, 1, 1)
    """Seeds of every point searched at each size (aligned with `sizes`). Runs of the small sizes
    differ by up to tenths of a nat between seeds and cost seconds, so they are averaged; the large
    ones cost minutes and run one."""
    best_point_seeds: tuple[int, ...] = (4, 3, 2, 1)
    """Seeds run at each size's best point once its search ends: a second seed there measures the
    seed noise of a size that is searched with one."""
    tokens_per_param: float = 1.0
    """Training tokens per non-embedding parameter of every run. The tiny recipes' S1 trains
    tiny-flagship on ~0.7 and tiny-student on ~1.0 corpus tokens per parameter (tiny/tiny.toml)."""
    seq_len: int = field(default_factory=lambda: tiny_s1_seq_len())
    """Training row length: S1's at the tiny scale."""
    corpus_seq_len: int = field(default_factory=lambda: tiny_s1_seq_len())
    """The S1 corpus (and the tokenizer's sample) is generated for S1's rows at the tiny scale: its
    retrieval documents are sized to fit them, whatever row length a sweep trains at."""
    lr_base: float = 1e-3
    lr_exponents: tuple[int, int] = (-3, 6)
    """The LR lattice: lr_base · 2^k for k in this closed range (1.25e-4 .. 6.4e-2)."""
    batch_exponents: tuple[int, int] = (0, 7)
    """The batch lattice: 2^j sequences for j in this closed range (1 .. 128)."""
    min_steps: int = 10
    """Batches that would leave a run fewer optimizer steps than this are not run."""
    first_centre: tuple[int, float] = (1, 8e-3)
    """Start (sequences, LR) of the smallest size's search; later sizes start at the previous optimum."""
    max_moves: int = 4
    """Moves of a size's search at most; a search cut there leaves its optimum flagged as a bound."""
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.2
    """Warmup-stable-decay: linear decay to 0.1·LR over the last fifth, so every run ends annealed,
    like S1 followed by S2's decay."""
    n_docs: int = 8000
    """S1 documents in the training corpus (~0.9M tokens: the largest run sees each once)."""
    eval_sequences: int = 32
    """Held-out packed sequences of `seq_len` (documents after the training range)."""
    tokenizer_vocab: int = 1024
    tokenizer_docs: int = 6000
    quick: bool = False

    def __post_init__(self) -> None:
        for name in ("seeds_per_size", "best_point_seeds"):
            if len(getattr(self, name)) != len(self.sizes):
                raise ValueError(f"{name} {getattr(self, name)} must give one count per size {self.sizes}")
        if any(b < s for b, s in zip(self.best_point_seeds, self.seeds_per_size)):
            raise ValueError("best_point_seeds must be at least seeds_per_size for every size")

    @classmethod
    def quick_settings(cls) -> "SweepSettings":
        return cls(sizes=tuple(QUICK_SIZES), seeds_per_size=(1, 1), best_point_seeds=(1, 2), tokens_per_param=0.1,
                   seq_len=32, first_centre=(2, 8e-3), max_moves=1, min_steps=2, n_docs=200, eval_sequences=4,
                   tokenizer_vocab=512, tokenizer_docs=600, quick=True)

    def model_config(self, size: str) -> ModelConfig:
        return (QUICK_SIZES if self.quick else SWEEP_SIZES)[size]

    def n_params(self, size: str) -> int:
        return non_embedding_params(self.model_config(size))

    def seeds(self, size: str) -> tuple[int, ...]:
        return tuple(range(self.seeds_per_size[self.sizes.index(size)]))

    def tokens(self, size: str) -> int:
        return int(round(self.tokens_per_param * self.n_params(size)))

    def steps(self, size: str, batch: int) -> int:
        return self.tokens(size) // (batch * self.seq_len)

    def lr(self, k: int) -> float:
        return self.lr_base * 2.0 ** k

    def batch_range(self, size: str) -> tuple[int, int]:
        """The batch exponents this size may use: the lattice, capped by the step floor."""
        lo, hi = self.batch_exponents
        while hi > lo and self.steps(size, 2 ** hi) < self.min_steps:
            hi -= 1
        return lo, hi

    def run_name(self, size: str, batch: int, lr: float, seed: int) -> str:
        """A grid point's directory: everything that defines the run, so a resumed sweep with other
        settings never reuses a stale result."""
        return (f"{size}-b{batch}-lr{lr:g}-t{self.tokens(size)}-L{self.seq_len}-w{self.warmup_fraction:g}"
                f"-d{self.decay_fraction:g}-s{seed}")


# ============================================================================ fitting (pure)
def fit_power_law(n: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Least squares of log y = log a + b·log n. Returns {"a", "b", "r2", "b_se"} for y = a·n^b
    (b_se: the exponent's standard error, None with only two points)."""
    x, t = np.log(np.asarray(n, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if x.size < 2:
        raise ValueError("a power-law fit needs at least two points")
    design = np.stack([np.ones_like(x), x], axis=1)
    (log_a, b), *_ = np.linalg.lstsq(design, t, rcond=None)
    resid = t - (log_a + b * x)
    ss_res, ss_tot = float((resid ** 2).sum()), float(((t - t.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    sxx = float(((x - x.mean()) ** 2).sum())
    b_se = math.sqrt(ss_res / (x.size - 2) / sxx) if x.size > 2 and sxx > 0 else None
    return {"a": float(math.exp(log_a)), "b": float(b), "r2": r2, "b_se": b_se}


def power_law(fit: Mapping[str, float], n: float) -> float:
    return float(fit["a"] * n ** fit["b"])


def optimum_log_parabola(xs: Sequence[float], losses: Sequence[float]) -> dict[str, Any]:
    """Optimal x for loss(x) on a log2 grid: the vertex of a parabola in log2(x) fitted by least
    squares when it opens upwards and lies within the grid, else the best grid point.

    Non-finite losses (diverged runs) are dropped. Returns {"x", "loss", "method"} with method
    "parabola" or "grid".
    """
    pts = [(float(x), float(l)) for x, l in zip(xs, losses) if math.isfinite(l)]
    if not pts:
        raise ValueError("no finite loss to take an optimum of")
    best_x, best_l = min(pts, key=lambda p: p[1])
    if len(pts) >= 3:
        u = np.log2([p[0] for p in pts])
        c2, c1, c0 = np.polyfit(u, [p[1] for p in pts], 2)
        if c2 > 0:
            u_star = -c1 / (2 * c2)
            if u.min() <= u_star <= u.max():
                return {"x": float(2.0 ** u_star), "loss": float(c0 + c1 * u_star + c2 * u_star ** 2),
                        "method": "parabola"}
    return {"x": best_x, "loss": best_l, "method": "grid"}


def _mean_over_seeds(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[float, int], float]:
    """{(lr, batch): loss} of one size, the loss averaged over the seeds that every point ran (extra
    seeds at one point would shift its mean by the seeds' own offsets); inf if a seed diverged."""
    by_point: dict[tuple[float, int], dict[int, float]] = {}
    for r in rows:
        by_point.setdefault((r["lr"], r["batch_size"]), {})[r.get("seed", 0)] = r["eval_loss"]
    common = set.intersection(*(set(v) for v in by_point.values()))
    out = {}
    for point, by_seed in sorted(by_point.items()):
        losses = [by_seed[sd] for sd in common]
        out[point] = float(np.mean(losses)) if all(math.isfinite(x) for x in losses) else float("inf")
    return out


def _neighbour(point: tuple[float, int], axis: int, factor: float,
               losses: Mapping[tuple[float, int], float]) -> tuple[float, int] | None:
    """The run point `factor` times `point` along `axis` (0: LR, 1: batch), if it was run."""
    for q in losses:
        if q[1 - axis] == point[1 - axis] and math.isclose(q[axis], point[axis] * factor, rel_tol=1e-6):
            return q
    return None


def size_optimum(rows: Sequence[Mapping[str, Any]], seq_len: int) -> dict[str, Any]:
    """Optimal LR and batch of one size from its runs (any seeds), with bound flags and seed spread.

    Around the best point (lowest loss, averaged over the seeds every point ran): the LR optimum is
    the vertex of the parabola in log2 LR through the best point and its two LR neighbours (factor
    2, same batch), the batch optimum the same along the batch. An axis on which a neighbour was
    not run gives the best point itself, flagged as a bound: the optimum may lie beyond it.
    """
    losses = _mean_over_seeds(rows)
    best = min(losses, key=lambda q: losses[q])
    out: dict[str, Any] = {"n_params": rows[0]["n_params"], "tokens": rows[0].get("tokens"),
                           "best_point": {"lr": best[0], "batch_sequences": best[1], "loss": losses[best]}}
    for axis, name in ((0, "lr"), (1, "batch")):
        around = [_neighbour(best, axis, 0.5, losses), best, _neighbour(best, axis, 2.0, losses)]
        bound = None in around
        o = optimum_log_parabola([q[axis] for q in around if q], [losses[q] for q in around if q])
        out[name] = {"opt": best[axis] if bound else o["x"], "method": "bound" if bound else o["method"],
                     "points": {f"{q[axis]:g}": losses[q] for q in around if q}}
    out["lr_opt"] = out["lr"]["opt"]
    out["batch_opt_sequences"] = out["batch"]["opt"]
    out["batch_opt_tokens"] = out["batch"]["opt"] * seq_len
    out["lr_at_grid_edge"] = out["lr"]["method"] == "bound"
    out["batch_at_grid_edge"] = out["batch"]["method"] == "bound"
    out["runs"] = len(rows)
    seeds = sorted({r.get("seed", 0) for r in rows})
    if len(seeds) > 1:
        # The noise the optimum has to live with: how far apart two seeds land at one point, and,
        # where every point ran several seeds, where each seed alone puts the optimum.
        gaps = []
        for point in losses:
            ls = [r["eval_loss"] for r in rows if (r["lr"], r["batch_size"]) == point]
            if len(ls) > 1 and all(math.isfinite(x) for x in ls):
                gaps.append(max(ls) - min(ls))
        out["seed_loss_gap_mean"] = float(np.mean(gaps)) if gaps else None
        out["seed_loss_gap_max"] = float(np.max(gaps)) if gaps else None
        if all(len({r.get("seed", 0) for r in rows if (r["lr"], r["batch_size"]) == q}) > 1 for q in losses):
            out["per_seed"] = {}
            for seed in seeds:
                mine = [r for r in rows if r.get("seed", 0) == seed]
                if {(r["lr"], r["batch_size"]) for r in mine} == set(losses):
                    o = size_optimum(mine, seq_len)
                    out["per_seed"][str(seed)] = {"lr_opt": o["lr_opt"], "batch_opt_sequences": o["batch_opt_sequences"]}
    return out


def optima(results: Sequence[Mapping[str, Any]], seq_len: int) -> dict[str, dict[str, Any]]:
    """`size_optimum` of every size, smallest first."""
    sizes = sorted({r["size"] for r in results}, key=lambda s: next(r["n_params"] for r in results if r["size"] == s))
    return {size: size_optimum([r for r in results if r["size"] == size], seq_len) for size in sizes}


def fit_optima(opt: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Power laws in N for the optimal LR and batch (tokens/step) of the sizes in `opt`.

    Each law is fitted on the sizes whose optimum on that axis is not a grid-edge bound, when at
    least two are; otherwise on all sizes (and the bounds bias it). `sizes` names those used.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, value, edge in (("lr", "lr_opt", "lr_at_grid_edge"), ("batch_tokens", "batch_opt_tokens", "batch_at_grid_edge")):
        used = [z for z, o in opt.items() if not o[edge]]
        if len(used) < 2:
            used = list(opt)
        out[key] = {**fit_power_law([opt[z]["n_params"] for z in used], [opt[z][value] for z in used]),
                    "sizes": used}
    return out


# ============================================================================ one run
def _eval_batches(tokenizer: Tokenizer, s: SweepSettings) -> torch.Tensor:
    """Held-out packed sequences [n, seq_len+1]: S1 documents after the training range."""
    eot = tokenizer.endoftext_id
    stream: list[int] = []
    need = s.eval_sequences * s.seq_len + 1
    for d in generate_documents("s1", seed=0, n_docs=10 * s.eval_sequences + 100, offset=s.n_docs,
                                seq_len=s.corpus_seq_len):
        stream += tokenizer.encode(d["text"]) + [eot]
        if len(stream) >= need:
            break
    windows = [stream[i * s.seq_len: i * s.seq_len + s.seq_len + 1] for i in range(s.eval_sequences)]
    windows = [w for w in windows if len(w) == s.seq_len + 1]
    return torch.tensor(windows)


@torch.no_grad()
def eval_loss(model: Qwen3, windows: torch.Tensor) -> float:
    model.eval()
    logits = model(windows[:, :-1]).logits.float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def run_one(size: str, batch: int, lr: float, seed: int, s: SweepSettings, tokenizer: Tokenizer, docs,
            windows: torch.Tensor, run_dir: Path, printer: Callable[[str], None]) -> dict[str, Any]:
    """Train one grid point (or read its finished result) and return its record."""
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = s.model_config(size).replace(eos_token_id=tokenizer.endoftext_id, rope_theta=rope_base("s1"))  # S1's base
    torch.manual_seed(seed)
    model = Qwen3(cfg)
    steps = s.steps(size, batch)
    tcfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, round(s.warmup_fraction * steps)),
                       decay_fraction=s.decay_fraction, log_every=max(1, steps), ckpt_every=0, keep_last=1,
                       seed=seed)
    loader = PackingLoader(docs, seq_len=s.seq_len, batch_size=batch, eot_id=tokenizer.endoftext_id,
                           pad_id=tokenizer.pad_token_id, seed=seed)

    def loss_fn(m, b):
        return pretrain_loss(m, b, document_masking=False, load_balancing="global", lbl_micro_batch=1)

    t0 = time.time()
    try:
        # "auto": a run cut by an interrupted sweep starts over cleanly (no checkpoint is kept mid-run).
        summary = train(model, loader, loss_fn, tcfg, run_dir, resume="auto", printer=lambda _m: None)
        loss, train_loss = eval_loss(model, windows), summary["loss"]
    except TrainingDivergedError:  # a diverged run is a data point (infinite loss), not a crash of the sweep
        loss, train_loss = float("inf"), float("inf")
    rec = {"size": size, "n_params": non_embedding_params(cfg), "tokens": s.tokens(size), "batch_size": batch,
           "batch_tokens": batch * s.seq_len, "lr": lr, "seed": seed, "steps": steps, "eval_loss": loss,
           "train_loss": train_loss, "wall_s": time.time() - t0}
    write_json_atomic(done, rec)
    # Only the score is kept: the final weights and optimizer state are megabytes per run.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    printer(f"  {size:10s} batch {batch:3d} lr {lr:.1e} seed {seed}: held-out loss {loss:.4f} ({rec['wall_s']:.0f}s)")
    return rec


# ============================================================================ plots
def _plot(results: Sequence[Mapping[str, Any]], opt: Mapping[str, Any], fits: Mapping[str, Any],
          predictions: Mapping[str, Any], out: Path) -> None:
    sizes = list(opt)
    # Each size's searched points: loss against LR (one line per batch) and against batch (one line
    # per LR); the dashed lines mark the optimum.
    with plotting.figure(out / "loss_vs_lr_and_batch.png", nrows=2, ncols=len(sizes),
                         figsize=(3.4 * len(sizes), 6.0)) as (_, axes):
        _plot_searches(axes, sizes, results, opt)
    n = np.array([opt[s]["n_params"] for s in sizes], dtype=float)
    grid = np.geomspace(n.min() / 1.5, max(n.max(), max(p["n_params"] for p in predictions.values())) * 1.5, 50)
    with plotting.figure(out / "power_law_fits.png", ncols=2, figsize=(9, 3.6)) as (_, axes):
        for ax, key, fkey, label in ((axes[0, 0], "lr_opt", "lr", "optimal LR"),
                                     (axes[0, 1], "batch_opt_tokens", "batch_tokens", "optimal batch (tokens/step)")):
            _plot_fit(ax, sizes, opt, fits[fkey], predictions, key, fkey, label, grid)


def _plot_searches(axes, sizes, results, opt) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    for col, size in enumerate(sizes):
        losses = _mean_over_seeds([r for r in results if r["size"] == size])
        for row, (axis, other, xlabel, key) in enumerate(((0, 1, "peak LR", "lr_opt"),
                                                          (1, 0, "batch (sequences)", "batch_opt_sequences"))):
            ax = axes[row, col]
            for v in sorted({q[other] for q in losses}):
                line = sorted((q[axis], losses[q]) for q in losses if q[other] == v and math.isfinite(losses[q]))
                if line:
                    ax.plot(*zip(*line), "o-", ms=3, label=f"{'batch' if other else 'lr'} {v:g}")
            ax.axvline(opt[size][key], color="k", ls="--", lw=0.8)
            ax.set(xscale="log", xlabel=xlabel)
            # Ticks at the lattice values run, plainly written (log axes' default labels overlap here).
            ax.xaxis.set_major_locator(FixedLocator(sorted({q[axis] for q in losses})))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.legend(fontsize=6)
        axes[0, col].set_title(f"{size} (N={opt[size]['n_params']:,})", fontsize=9)
    for row in range(2):
        axes[row, 0].set_ylabel("held-out loss (mean over seeds)")


def _plot_fit(ax, sizes, opt, fit, predictions, key: str, fkey: str, label: str, grid) -> None:
    edge_key = "lr_at_grid_edge" if fkey == "lr" else "batch_at_grid_edge"
    inner = [s for s in sizes if not opt[s][edge_key]]
    edge = [s for s in sizes if opt[s][edge_key]]
    if inner:
        ax.plot([opt[s]["n_params"] for s in inner], [opt[s][key] for s in inner], "o", label="sweep optimum")
    if edge:
        ax.plot([opt[s]["n_params"] for s in edge], [opt[s][key] for s in edge], "o", mfc="none",
                label="a bound (lattice edge), not fitted")
    ax.plot(grid, [power_law(fit, g) for g in grid], "-", label=f"{fit['a']:.3g}·N^{fit['b']:.3f} (R² {fit['r2']:.2f})")
    for m, p in predictions.items():
        ax.plot([p["n_params"]], [p[fkey]], "s", label=f"{m} (predicted)")
    values = [opt[s][key] for s in sizes] + [p[fkey] for p in predictions.values()]
    ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel=label,
           ylim=(min(values) / 2, max(values) * 2))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


# ============================================================================ the sweep
def plan_lines(s: SweepSettings) -> list[str]:
    lo, hi = s.lr_exponents
    lines = [f"scaling-law sweep: {len(s.sizes)} sizes, {s.tokens_per_param:g} training tokens per non-embedding "
             f"parameter, seq_len {s.seq_len}, warmup {s.warmup_fraction:g} / decay {s.decay_fraction:g} of the steps",
             f"  LR lattice {s.lr(lo):g} .. {s.lr(hi):g} (factor 2); batch lattice 2^{s.batch_exponents[0]} .. "
             f"2^{s.batch_exponents[1]} sequences, at least {s.min_steps} steps per run",
             f"  each size: compass search (a point and its 4 lattice neighbours, moving to a better neighbour, "
             f"at most {s.max_moves} moves), the first from batch {s.first_centre[0]}, lr {s.first_centre[1]:g}, "
             f"later ones from the previous size's optimum"]
    for size, extra in zip(s.sizes, s.best_point_seeds):
        b_lo, b_hi = s.batch_range(size)
        steps = {2 ** j: s.steps(size, 2 ** j) for j in range(b_lo, b_hi + 1)}
        lines.append(f"  {size:10s} N (non-embedding) {s.n_params(size):>9,}  tokens/run {s.tokens(size):>9,}  "
                     f"seeds {len(s.seeds(size))} ({extra} at the optimum)  steps by batch {steps}")
    n_min = sum(5 * n + (b - n) for n, b in zip(s.seeds_per_size, s.best_point_seeds))
    lines.append(f"  about {n_min} runs (fewer neighbours at the lattice edge; each move adds up to 3 points)")
    return lines


def _lattice_index(value: float, base: float) -> int:
    return int(round(math.log2(value / base)))


def _start(s: SweepSettings, size: str, opt: Mapping[str, Mapping[str, Any]]) -> tuple[int, int, str]:
    """Lattice indices (batch j, LR k) a size's search starts from, and where they came from."""
    if opt:
        o = list(opt.values())[-1]
        batch, lr, source = o["batch_opt_sequences"], o["lr_opt"], "optimum of the previous size"
    else:
        (batch, lr), source = s.first_centre, "first_centre"
    b_lo, b_hi = s.batch_range(size)
    k_lo, k_hi = s.lr_exponents
    return (min(max(_lattice_index(batch, 1.0), b_lo), b_hi), min(max(_lattice_index(lr, s.lr_base), k_lo), k_hi),
            source)


def search_size(s: SweepSettings, size: str, start: tuple[int, int], run: Callable[[int, int, int], dict[str, Any]],
                printer: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], int]:
    """Compass search of one size on the (batch, LR) lattice from `start` = (j, k).

    `run(j, k, seed)` trains (or reads) batch 2^j sequences at LR lr_base·2^k. Returns the runs and
    the number of moves made.
    """
    b_lo, b_hi = s.batch_range(size)
    k_lo, k_hi = s.lr_exponents
    rows: dict[tuple[int, int, int], dict[str, Any]] = {}

    def mean_loss(point: tuple[int, int]) -> float:
        ls = [rows[(*point, seed)]["eval_loss"] for seed in s.seeds(size)]
        return float(np.mean(ls)) if all(math.isfinite(x) for x in ls) else float("inf")

    point, moves = start, 0
    while True:
        j, k = point
        for q in ((j, k), (j - 1, k), (j + 1, k), (j, k - 1), (j, k + 1)):
            if b_lo <= q[0] <= b_hi and k_lo <= q[1] <= k_hi:
                for seed in s.seeds(size):
                    if (*q, seed) not in rows:
                        rows[(*q, seed)] = run(q[0], q[1], seed)
        best = min(sorted({(a, b) for a, b, _ in rows}), key=mean_loss)
        if best == point or moves >= s.max_moves:
            break
        point, moves = best, moves + 1
        printer(f"{size}: moving to batch {2 ** best[0]}, lr {s.lr(best[1]):g}")
    for seed in range(len(s.seeds(size)), s.best_point_seeds[s.sizes.index(size)]):
        rows[(*best, seed)] = run(best[0], best[1], seed)
    return list(rows.values()), moves


def caveats(s: SweepSettings, opt: Mapping[str, Mapping[str, Any]], fits: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What limits the result, in words, from the numbers of this sweep."""
    out = []
    for key, edge, value, unit in (("lr", "lr_at_grid_edge", "lr_opt", "LR"),
                                   ("batch_tokens", "batch_at_grid_edge", "batch_opt_sequences", "batch")):
        bounds = [z for z in opt if opt[z][edge]]
        if bounds:
            out.append(f"the {unit} optimum of {', '.join(bounds)} is a bound at the lattice edge, not an optimum "
                       f"({', '.join(f'{opt[z][value]:g}' for z in bounds)}{' sequences' if unit == 'batch' else ''})")
        f = fits[key]
        se = "" if f["b_se"] is None else f" +- {f['b_se']:.2f}"
        out.append(f"{unit} law fitted on {len(f['sizes'])} sizes ({', '.join(f['sizes'])}): exponent {f['b']:.3f}{se}, "
                   f"R^2 {f['r2']:.2f}" + (" (two points: R^2 is 1 by construction and says nothing)"
                                          if len(f["sizes"]) == 2 else ""))
    gaps = {z: o for z, o in opt.items() if o.get("seed_loss_gap_mean") is not None}
    if gaps:
        out.append("seed noise, loss gap between seeds at one point (mean / max): "
                   + ", ".join(f"{z} {o['seed_loss_gap_mean']:.3f} / {o['seed_loss_gap_max']:.3f}" for z, o in gaps.items())
                   + " nats")
    margins = {z: min([l - o["best_point"]["loss"] for ax in ("lr", "batch") for l in o[ax]["points"].values()
                       if l > o["best_point"]["loss"]] or [float("nan")]) for z, o in opt.items()}
    out.append("margin of each best point over its closest lattice neighbour: "
               + ", ".join(f"{z} {m:.4f}" for z, m in margins.items())
               + " nats; where this is below the seed noise, the best point is not distinguishable from that neighbour")
    out.append(f"every run trains {s.tokens_per_param:g} tokens per non-embedding parameter; the tiny recipes' S1 trains "
               "tiny-flagship on ~0.7 and tiny-student on ~1.0, so their own optima differ somewhat")
    out.append("LR optimum taken at the best lattice batch, batch optimum at the best lattice LR (no joint fit)")
    out.append("tiny-flagship's prediction extrapolates beyond the largest size run (tiny-student)")
    return out


def run_sweep(out_dir: Path, settings: SweepSettings | None = None, cache_dir: Path | None = None,
              printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep into `out_dir`; write `scaling_laws.json` and the plots; return the result."""
    s = settings or SweepSettings()
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    out_dir.mkdir(parents=True, exist_ok=True)
    for line in plan_lines(s):
        printer(line)
    t0 = time.time()
    tok_dir = out_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tokenizer_stage.run(tokenizer_stage.TokenizerConfig(vocab_size=s.tokenizer_vocab, seq_len=s.corpus_seq_len,
                                                            n_docs=s.tokenizer_docs, seed=0),
                            None, StageContext(tok_dir, cache_dir, printer))
    tokenizer = Tokenizer.load(tok_dir)
    corpus_cfg = PretrainConfig(name="scaling-laws", corpus="s1", tokens=s.corpus_seq_len, seq_len=s.corpus_seq_len,
                                batch_size=1,
                                n_docs=s.n_docs, seed=0)
    docs = tokenized_corpus(corpus_cfg, tokenizer, cache_dir)
    windows = _eval_batches(tokenizer, s)

    results: list[dict[str, Any]] = []
    opt: dict[str, dict[str, Any]] = {}
    for size in s.sizes:  # smallest first: each search starts where the previous size's optimum lies
        j, k, source = _start(s, size, opt)
        printer(f"{size}: search from batch {2 ** j}, lr {s.lr(k):g} ({source})")

        def run(j: int, k: int, seed: int, size: str = size) -> dict[str, Any]:
            return run_one(size, 2 ** j, s.lr(k), seed, s, tokenizer, docs, windows,
                           out_dir / "runs" / s.run_name(size, 2 ** j, s.lr(k), seed), printer)

        rows, moves = search_size(s, size, (j, k), run, printer)
        results += rows
        o = size_optimum(rows, s.seq_len)
        o["search"] = {"start": {"batch_sequences": 2 ** j, "lr": s.lr(k), "from": source}, "moves": moves,
                       "wall_s": sum(r["wall_s"] for r in rows)}
        opt[size] = o
        printer(f"{size}: optimum lr {o['lr_opt']:.2e} ({o['lr']['method']}), batch {o['batch_opt_sequences']:.2f} x "
                f"{s.seq_len} ({o['batch']['method']})")

    fits = fit_optima(opt)
    predictions = {}
    for name in PREDICT_FOR:
        n_model = non_embedding_params(get_model_config(name))
        b_tok = power_law(fits["batch_tokens"], n_model)
        predictions[name] = {"n_params": n_model, "lr": power_law(fits["lr"], n_model), "batch_tokens": b_tok,
                             "batch_sequences": b_tok / s.seq_len}
    _plot(results, opt, fits, predictions, out_dir)
    result = {
        "settings": asdict(s),
        "fits": {"lr_opt": {**fits["lr"], "formula": "lr_opt = a * N^b"},
                 "batch_opt_tokens": {**fits["batch_tokens"], "formula": "B_opt (tokens/step) = a * N^b"}},
        "predictions": predictions,
        "optima": opt,
        "optima_at_grid_edge": {"lr": [z for z in opt if opt[z]["lr_at_grid_edge"]],
                                "batch": [z for z in opt if opt[z]["batch_at_grid_edge"]]},
        "caveats": caveats(s, opt, fits),
        "runs": results,
        # The sum over runs is the sweep's cost even when it was resumed over several sessions;
        # this session's wall time is less when it found runs already done.
        "runs_wall_s": sum(r["wall_s"] for r in results),
        "session_wall_s": time.time() - t0,
        "torch_threads": torch.get_num_threads(),
        "files": ["scaling_laws.json", "loss_vs_lr_and_batch.png", "power_law_fits.png"],
    }
    write_json_atomic(out_dir / "scaling_laws.json", result)
    for name, p in predictions.items():
        printer(f"predicted for {name} (N={p['n_params']:,}): lr {p['lr']:.2e}, batch {p['batch_tokens']:,.0f} "
                f"tokens/step (= {p['batch_sequences']:.1f} x {s.seq_len})")
    for line in result["caveats"]:
        printer(f"caveat: {line}")
    printer(f"scaling-law sweep done: {len(results)} runs, {result['runs_wall_s']:.0f}s of training "
            f"({result['session_wall_s']:.0f}s in this session) -> {out_dir / 'scaling_laws.json'}")
    return result


__all__ = ["SWEEP_SIZES", "QUICK_SIZES", "SweepSettings", "fit_power_law", "power_law", "optimum_log_parabola",
           "size_optimum", "optima", "fit_optima", "search_size", "run_sweep", "plan_lines", "non_embedding_params"]
