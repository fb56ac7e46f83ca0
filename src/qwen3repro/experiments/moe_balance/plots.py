"""The experiment's figures, drawn with the project's plotting helper: the per-seed summary of both
arms, the training curves, and each arm's routing share by domain."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ... import plotting
from ...train.metrics import MetricsLog
from .settings import MODES

LINE_STYLES = ("-", "--", ":", "-.")  # one per seed (cycled)


def plot_summary(per_seed: Mapping[str, Mapping[int, Mapping[str, float]]], path: Path) -> None:
    """Per-seed points (a seed's two arms joined) and the mean over seeds, for the two arms."""
    panels = [("heldout_loss", "held-out loss (nats)", "Loss (lower is better)"),
              ("global_imbalance", "max/mean expert load", "Global imbalance (1 = balanced)"),
              ("mutual_information", "I(domain; expert), nats", "Domain specialisation"),
              ("micro_imbalance", "mean per-document max/mean", "Per-document imbalance (reference)")]
    seeds = list(per_seed[MODES[0]])
    offsets = dict(zip(seeds, np.linspace(-0.1, 0.1, len(seeds)) if len(seeds) > 1 else [0.0]))
    title = f"Micro- vs global-batch load balancing: dots = seeds {seeds} (a seed's arms joined), thick lines = mean"
    with plotting.figure(path, ncols=len(panels), figsize=(4.0 * len(panels), 3.6), title=title) as (_fig, axes):
        for ax, (key, ylabel, panel_title) in zip(axes[0], panels):
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
            ax.set(ylabel=ylabel, title=panel_title)
            ax.grid(False, axis="x")  # the x axis is the two arms, not a scale


def plot_training(run_dirs: Mapping[tuple[str, int], Path], path: Path) -> None:
    """Training CE and the two imbalances of every step, per arm and seed."""
    seeds = sorted({s for _, s in run_dirs})
    with plotting.figure(path, ncols=3, figsize=(14, 3.6)) as (_fig, axes):
        ce_ax, global_ax, micro_ax = axes[0]
        for (mode, seed), d in sorted(run_dirs.items()):
            rows = MetricsLog(str(d / "metrics.jsonl")).read()
            steps = [r["step"] for r in rows]
            style = dict(color=f"C{MODES.index(mode)}", ls=LINE_STYLES[seeds.index(seed) % len(LINE_STYLES)],
                         label=f"{mode} LBL, seed {seed}")
            ce_ax.plot(steps, [r.get("ce", r["loss"]) for r in rows], **style)
            global_ax.plot(steps, [r.get("imb_global", np.nan) for r in rows], **style)
            micro_ax.plot(steps, [r.get("imb_micro", np.nan) for r in rows], **style)
        ce_ax.set(xlabel="step", ylabel="training CE", title="Language-model loss")
        global_ax.set(xlabel="step", ylabel="max/mean", title="Imbalance of each step's global batch")
        micro_ax.set(xlabel="step", ylabel="max/mean", title="Imbalance within its micro-batches (mean)")
        ce_ax.legend()


def plot_routing(result: Mapping[str, Any], title: str, path: Path) -> None:
    """Heat maps of each domain's share of selections per expert, one panel per MoE layer."""
    domains = result["_routing_share"]["domains"]
    share = np.asarray(result["_routing_share"]["share"])  # [D, L, E]
    n_layers = share.shape[1]
    vmax = float(share.max()) if share.size else 1.0
    # The last, narrow column holds the colour bar (shared by every layer's panel).
    with plotting.figure(path, ncols=n_layers + 1, figsize=(3.2 * n_layers + 1, 0.35 * len(domains) + 1.8),
                         title=title, gridspec_kw={"width_ratios": [1.0] * n_layers + [0.06]}) as (fig, axes):
        im = None
        for layer in range(n_layers):
            ax = axes[0, layer]
            im = ax.imshow(share[:, layer], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("expert")
            ax.set_yticks(range(len(domains)))
            ax.set_yticklabels(domains if layer == 0 else [])
            ax.grid(False)
        if im is not None:
            fig.colorbar(im, cax=axes[0, -1], label="share of the domain's selections")
        else:
            axes[0, -1].set_axis_off()


__all__ = ["plot_summary", "plot_training", "plot_routing"]
