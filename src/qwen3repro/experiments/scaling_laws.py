"""Scaling laws for the optimal learning rate and batch size (Qwen3 report §2, at tiny scale).

The report says Qwen3 "develop[ed] scaling laws for optimal hyper-parameters (e.g., learning rate
scheduler, and batch size)" and set "the predicted optimal learning rate and batch size strategy
for each dense or MoE model", but gives no numbers or formulas. This module does the same at tiny
scale:

1. **Sweep.** Learning rate × batch size × model size, each run a short pretraining on the S1
   corpus with a fixed token budget (so a larger batch means fewer steps), the recipes' AdamW and
   warmup-stable-decay schedule (`train.loop.train`), scored by the loss on held-out S1 documents
   (the corpus stream after the training documents).
2. **Optimum per size.** For each (size, batch) the loss is fitted by a parabola in log2(LR); its
   vertex is the optimal LR when the parabola opens upwards and the vertex lies inside the grid,
   otherwise the best grid point is used (`optimum_log_parabola`). The optimal batch of a size is
   found the same way over log2(batch) from each batch's best loss; the size's optimal LR is the
   one at its best batch.
3. **Power laws.** lr_opt = a·N^b and B_opt = c·N^d (N = non-embedding parameters, B in tokens per
   step), fitted by least squares in log space (`fit_power_law`), and evaluated at tiny-student and
   tiny-flagship.

Sizes (`SWEEP_SIZES`) are registry-style configs derived from tiny-student's shape (GQA, head_dim
32, tied embeddings, SwiGLU at 3× width) at three widths/depths, tiny-student itself the largest,
so tiny-flagship (≈2× tiny-student's N) is a short extrapolation.

Caveats, said where the numbers are used: the runs are short (tens of steps), so the optimum
reflects an early-training regime and a fixed token budget that favours small batches; three sizes
over less than a decade of N give exponents with wide error bars (the fit's R² is reported).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..config import ModelConfig
from ..data.packing import PackingLoader
from ..data.synthetic import generate_documents
from ..models.qwen3 import Qwen3
from ..models.registry import count_parameters, get_model_config
from ..stages.common import StageContext, write_json_atomic
from ..stages.pretrain import PretrainConfig, pretrain_loss, tokenized_corpus
from ..tokenizer import Tokenizer
from ..train.loop import TrainConfig, train


# ============================================================================ model sizes
def _derived(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int | None = None) -> ModelConfig:
    """tiny-student's shape at another width/depth (head_dim 32, intermediate 3× hidden, tied)."""
    base = get_model_config("tiny-student")
    changes: dict[str, Any] = dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads)
    if vocab is not None:
        changes["vocab_size"] = vocab
    return base.replace(**changes)


SWEEP_SIZES: dict[str, ModelConfig] = {
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
@dataclass(frozen=True)
class SweepSettings:
    """The grid and budget of one sweep."""

    sizes: tuple[str, ...] = tuple(SWEEP_SIZES)
    lrs: tuple[float, ...] = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16)
    """Sequences per step (tokens per step = batch · seq_len)."""
    seq_len: int = 128
    tokens: int = 40_960
    """Training tokens per run, the same for every run."""
    warmup_fraction: float = 0.1
    n_docs: int = 3000
    eval_sequences: int = 32
    """Held-out packed sequences of `seq_len` (documents after the training range)."""
    tokenizer_vocab: int = 1024
    tokenizer_docs: int = 6000
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> "SweepSettings":
        return cls(sizes=tuple(QUICK_SIZES), lrs=(2e-3, 8e-3), batch_sizes=(2, 4), seq_len=32, tokens=1024,
                   n_docs=200, eval_sequences=4, tokenizer_vocab=512, tokenizer_docs=600, quick=True)

    def model_config(self, size: str) -> ModelConfig:
        return (QUICK_SIZES if self.quick else SWEEP_SIZES)[size]

    def steps(self, batch: int) -> int:
        return max(1, self.tokens // (batch * self.seq_len))

    def runs(self) -> list[tuple[str, int, float]]:
        return [(s, b, lr) for s in self.sizes for b in self.batch_sizes for lr in self.lrs]

    def run_name(self, size: str, batch: int, lr: float) -> str:
        """A grid point's directory: everything that defines the run, so a resumed sweep with other
        settings never reuses a stale result."""
        return f"{size}-b{batch}-lr{lr:g}-t{self.tokens}-L{self.seq_len}-w{self.warmup_fraction:g}-s{self.seed}"


# ============================================================================ fitting (pure)
def fit_power_law(n: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least squares of log y = log a + b·log n. Returns {"a", "b", "r2"} for y = a·n^b."""
    x, t = np.log(np.asarray(n, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if x.size < 2:
        raise ValueError("a power-law fit needs at least two points")
    design = np.stack([np.ones_like(x), x], axis=1)
    (log_a, b), *_ = np.linalg.lstsq(design, t, rcond=None)
    pred = log_a + b * x
    ss_tot = float(((t - t.mean()) ** 2).sum())
    r2 = 1.0 - float(((t - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {"a": float(math.exp(log_a)), "b": float(b), "r2": r2}


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


def optima(results: Sequence[Mapping[str, Any]], seq_len: int) -> dict[str, dict[str, Any]]:
    """Per size: optimal LR per batch, the optimal batch (tokens/step), and the LR at that batch."""
    out: dict[str, dict[str, Any]] = {}
    for size in sorted({r["size"] for r in results}, key=lambda s: [r["n_params"] for r in results if r["size"] == s][0]):
        rows = [r for r in results if r["size"] == size]
        per_batch = {}
        for b in sorted({r["batch_size"] for r in rows}):
            sub = [r for r in rows if r["batch_size"] == b]
            per_batch[b] = optimum_log_parabola([r["lr"] for r in sub], [r["eval_loss"] for r in sub])
        batches = sorted(per_batch)
        b_opt = optimum_log_parabola(batches, [per_batch[b]["loss"] for b in batches])
        nearest = min(batches, key=lambda b: abs(math.log(b / b_opt["x"])))
        lrs = sorted({r["lr"] for r in rows})
        out[size] = {
            "n_params": rows[0]["n_params"],
            "lr_opt_per_batch": {str(b): per_batch[b] for b in batches},
            "batch_opt_sequences": b_opt["x"],
            "batch_opt_tokens": b_opt["x"] * seq_len,
            "batch_method": b_opt["method"],
            # An optimum on the edge of the grid is only a bound: the true one may lie beyond it.
            "batch_at_grid_edge": b_opt["method"] == "grid" and b_opt["x"] in (batches[0], batches[-1]),
            "lr_opt": per_batch[nearest]["x"],
            "lr_method": per_batch[nearest]["method"],
            "lr_at_grid_edge": per_batch[nearest]["method"] == "grid" and per_batch[nearest]["x"] in (lrs[0], lrs[-1]),
            "best_loss": min(r["eval_loss"] for r in rows if math.isfinite(r["eval_loss"])),
        }
    return out


# ============================================================================ one run
def _eval_batches(tokenizer: Tokenizer, s: SweepSettings) -> torch.Tensor:
    """Held-out packed sequences [n, seq_len+1]: S1 documents after the training range."""
    eot = tokenizer.endoftext_id
    stream: list[int] = []
    need = s.eval_sequences * s.seq_len + 1
    for d in generate_documents("s1", seed=s.seed, n_docs=10 * s.eval_sequences + 100, offset=s.n_docs):
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


def run_one(size: str, batch: int, lr: float, s: SweepSettings, tokenizer: Tokenizer, docs, windows: torch.Tensor,
            run_dir: Path, printer: Callable[[str], None]) -> dict[str, Any]:
    """Train one grid point (or read its finished result) and return its record."""
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = s.model_config(size).replace(eos_token_id=tokenizer.endoftext_id)
    torch.manual_seed(s.seed)
    model = Qwen3(cfg)
    steps = s.steps(batch)
    tcfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, round(s.warmup_fraction * steps)),
                       log_every=max(1, steps), ckpt_every=0, keep_last=1, seed=s.seed)
    loader = PackingLoader(docs, seq_len=s.seq_len, batch_size=batch, eot_id=tokenizer.endoftext_id,
                           pad_id=tokenizer.pad_token_id, seed=s.seed)

    def loss_fn(m, b):
        return pretrain_loss(m, b, document_masking=False, load_balancing="global", lbl_micro_batch=1)

    t0 = time.time()
    try:
        summary = train(model, loader, loss_fn, tcfg, run_dir, resume=None, printer=lambda _m: None)
        loss, train_loss = eval_loss(model, windows), summary["loss"]
    except Exception as e:  # a diverged run is a data point (infinite loss), not a crash of the sweep
        if type(e).__name__ != "TrainingDivergedError":
            raise
        loss, train_loss = float("inf"), float("inf")
    rec = {"size": size, "n_params": non_embedding_params(cfg), "batch_size": batch,
           "batch_tokens": batch * s.seq_len, "lr": lr, "steps": steps, "eval_loss": loss,
           "train_loss": train_loss, "wall_s": time.time() - t0}
    write_json_atomic(done, rec)
    printer(f"  {size:10s} batch {batch:3d} lr {lr:.1e}: held-out loss {loss:.4f} ({rec['wall_s']:.0f}s)")
    return rec


# ============================================================================ plots
def _plot(results: Sequence[Mapping[str, Any]], opt: Mapping[str, Any], fits: Mapping[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(opt)
    batches = sorted({r["batch_size"] for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.5), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes):
        for b in batches:
            sub = sorted((r for r in results if r["size"] == size and r["batch_size"] == b), key=lambda r: r["lr"])
            ax.plot([r["lr"] for r in sub], [r["eval_loss"] for r in sub], "o-", label=f"batch {b}")
        ax.axvline(opt[size]["lr_opt"], color="k", ls="--", lw=0.8)
        ax.set(xscale="log", xlabel="peak LR", title=f"{size} (N={opt[size]['n_params']:,})")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("held-out loss")
    axes[0, -1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss_vs_lr.png", dpi=110)
    plt.close(fig)

    n = np.array([opt[s]["n_params"] for s in sizes], dtype=float)
    grid = np.geomspace(n.min() / 1.5, max(n.max(), max(fits["predictions"][m]["n_params"] for m in fits["predictions"])) * 1.5, 50)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, fkey, label in ((axes[0], "lr_opt", "lr", "optimal LR"),
                                 (axes[1], "batch_opt_tokens", "batch_tokens", "optimal batch (tokens/step)")):
        edge_key = "lr_at_grid_edge" if fkey == "lr" else "batch_at_grid_edge"
        inner = [s for s in sizes if not opt[s][edge_key]]
        edge = [s for s in sizes if opt[s][edge_key]]
        if inner:
            ax.plot([opt[s]["n_params"] for s in inner], [opt[s][key] for s in inner], "o", label="sweep optimum")
        if edge:
            ax.plot([opt[s]["n_params"] for s in edge], [opt[s][key] for s in edge], "o", mfc="none",
                    label="on the grid edge (a bound)")
        f = fits[fkey]
        ax.plot(grid, [power_law(f, g) for g in grid], "-", label=f"{f['a']:.3g}·N^{f['b']:.3f} (R² {f['r2']:.2f})")
        for m, p in fits["predictions"].items():
            ax.plot([p["n_params"]], [p[fkey]], "s", label=f"{m} (predicted)")
        values = [opt[s][key] for s in sizes] + [p[fkey] for p in fits["predictions"].values()]
        ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel=label,
               ylim=(min(values) / 2, max(values) * 2))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "power_law_fits.png", dpi=110)
    plt.close(fig)


# ============================================================================ the sweep
def plan_lines(s: SweepSettings) -> list[str]:
    lines = [f"scaling-law sweep: {len(s.runs())} runs = {len(s.sizes)} sizes x {len(s.batch_sizes)} batches x {len(s.lrs)} LRs,"
             f" {s.tokens:,} tokens each at seq_len {s.seq_len}"]
    for size in s.sizes:
        lines.append(f"  {size:10s} N (non-embedding) {non_embedding_params(s.model_config(size)):>9,}")
    lines.append(f"  batches (sequences) {list(s.batch_sizes)} -> steps {[s.steps(b) for b in s.batch_sizes]}")
    lines.append(f"  LRs {list(s.lrs)}")
    return lines


def run_sweep(out_dir: Path, settings: SweepSettings | None = None, cache_dir: Path | None = None,
              printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the sweep into `out_dir`; write `scaling_laws.json` and the plots; return the result."""
    from ..stages import tokenizer as tokenizer_stage

    s = settings or SweepSettings()
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    out_dir.mkdir(parents=True, exist_ok=True)
    for line in plan_lines(s):
        printer(line)
    t0 = time.time()
    tok_dir = out_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        tokenizer_stage.run(tokenizer_stage.TokenizerConfig(vocab_size=s.tokenizer_vocab, n_docs=s.tokenizer_docs, seed=s.seed),
                            None, StageContext(tok_dir, cache_dir, printer))
    tokenizer = Tokenizer.load(tok_dir)
    corpus_cfg = PretrainConfig(name="scaling-laws", corpus="s1", tokens=s.tokens, seq_len=s.seq_len, batch_size=1,
                                n_docs=s.n_docs, seed=s.seed)
    docs = tokenized_corpus(corpus_cfg, tokenizer, cache_dir)
    windows = _eval_batches(tokenizer, s)
    results = [run_one(size, b, lr, s, tokenizer, docs, windows, out_dir / "runs" / s.run_name(size, b, lr), printer)
               for size, b, lr in s.runs()]
    opt = optima(results, s.seq_len)
    n = [opt[z]["n_params"] for z in opt]
    fits: dict[str, Any] = {"lr": fit_power_law(n, [opt[z]["lr_opt"] for z in opt]),
                            "batch_tokens": fit_power_law(n, [opt[z]["batch_opt_tokens"] for z in opt])}
    fits["predictions"] = {}
    for name in PREDICT_FOR:
        n_model = non_embedding_params(get_model_config(name))
        b_tok = power_law(fits["batch_tokens"], n_model)
        fits["predictions"][name] = {"n_params": n_model, "lr": power_law(fits["lr"], n_model), "batch_tokens": b_tok,
                                     "batch_sequences_at_256": b_tok / 256}
    _plot(results, opt, fits, out_dir)
    result = {
        "settings": asdict(s),
        "fits": {"lr_opt": {**fits["lr"], "formula": "lr_opt = a * N^b"},
                 "batch_opt_tokens": {**fits["batch_tokens"], "formula": "B_opt (tokens/step) = a * N^b"}},
        "predictions": fits["predictions"],
        "optima": opt,
        "runs": results,
        "wall_s": time.time() - t0,
        "optima_at_grid_edge": {"lr": [z for z in opt if opt[z]["lr_at_grid_edge"]],
                                "batch": [z for z in opt if opt[z]["batch_at_grid_edge"]]},
        "caveats": ("short fixed-token runs (tens of steps): the optimum reflects early training and favours small "
                    "batches; few sizes over < 1 decade of N, so exponents are rough; tiny-flagship is an extrapolation"),
        "files": ["scaling_laws.json", "loss_vs_lr.png", "power_law_fits.png"],
    }
    write_json_atomic(out_dir / "scaling_laws.json", result)
    for name, p in fits["predictions"].items():
        printer(f"predicted for {name} (N={p['n_params']:,}): lr {p['lr']:.2e}, batch {p['batch_tokens']:,.0f} tokens/step"
                f" (= {p['batch_sequences_at_256']:.1f} x 256)")
    for key, sizes in result["optima_at_grid_edge"].items():
        if sizes:
            printer(f"warning: the {key} optimum of {', '.join(sizes)} is on the edge of the grid (a bound, not a fit)")
    printer(f"scaling-law sweep done in {result['wall_s']:.0f}s -> {out_dir / 'scaling_laws.json'}")
    return result


__all__ = ["SWEEP_SIZES", "QUICK_SIZES", "SweepSettings", "fit_power_law", "power_law", "optimum_log_parabola",
           "optima", "run_sweep", "plan_lines", "non_embedding_params"]
