"""The suite's plots: retrieval heatmaps (length × depth), accuracy vs length, loss by position."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ... import plotting


def slug(name: str) -> str:
    """A condition's name as a file-name part ("S3+YaRN+DCA" -> "s3_yarn_dca")."""
    return name.replace("+", "_").lower()


def heatmap_file(variant: str, condition: str) -> str:
    return f"retrieval_heatmap_{variant}_{slug(condition)}.png"


def accuracy_file(variant: str) -> str:
    return f"accuracy_vs_length_{variant}.png"


LOSS_FILE = "loss_by_position.png"


def _nan(values):
    return [float("nan") if v is None else v for v in values]


def write_plots(results: Mapping[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """Retrieval heatmaps (length × depth) per variant and condition, accuracy vs length per variant
    (one line per condition) and loss-by-position curves; returns the file names written."""
    out = Path(out_dir)
    trained = results["settings"]["trained_length"]
    written: list[str] = []

    for variant, grids in results["retrieval"].items():
        for cond, g in grids.items():
            acc = [_nan(row) for row in g["accuracy"]]
            edges = g["depth_bin_edges"]
            name = heatmap_file(variant, cond)
            size = (1.2 + 1.1 * len(edges), 1.2 + 0.5 * len(g["lengths"]))
            with plotting.figure(out / name, figsize=size) as (fig, axes):
                ax = axes[0, 0]
                im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
                ax.grid(False)
                for r, row in enumerate(acc):
                    for c, a in enumerate(row):
                        if a == a:  # not NaN
                            ax.text(c, r, f"{a:.2f}", ha="center", va="center", fontsize=8)
                ax.set_xticks(range(len(edges) - 1), [f"{edges[i]:.1f}-{edges[i + 1]:.1f}" for i in range(len(edges) - 1)])
                ax.set_yticks(range(len(g["lengths"])), [f"{n}{' *' if n > trained else ''}" for n in g["lengths"]])
                ax.set_xlabel("needle depth")
                ax.set_ylabel("length (* beyond trained)")
                ax.set_title(f"{cond}: {variant} retrieval")
                fig.colorbar(im, ax=ax, label="exact match")
            written.append(name)

        name = accuracy_file(variant)
        with plotting.figure(out / name, figsize=(6, 4)) as (fig, axes):
            ax = axes[0, 0]
            for cond, g in grids.items():
                ax.plot(g["lengths"], _nan(g["accuracy_by_length"]), marker="o", label=cond)
                if variant == "order":
                    ax.plot(g["lengths"], _nan(g["distractor_rate_by_length"]), linestyle=":",
                            color=ax.lines[-1].get_color(), alpha=0.7)
            ax.axvline(trained, color="grey", linestyle="--", linewidth=1, label="trained length")
            ax.set_xscale("log", base=2)
            lengths = sorted({n for g in grids.values() for n in g["lengths"]})
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("length (tokens)")
            ax.set_ylabel("exact match" + (" (dotted: returned the distractor)" if variant == "order" else ""))
            ax.set_title(f"{variant} retrieval vs length")
            ax.legend()
        written.append(name)

    if results.get("loss_by_position"):
        with plotting.figure(out / LOSS_FILE, figsize=(7, 4)) as (fig, axes):
            ax = axes[0, 0]
            for cond, lp in results["loss_by_position"].items():
                # Buckets with under half the typical count (the ragged ends of documents) are left out.
                full = max(lp["count"])
                keep = [i for i, c in enumerate(lp["count"]) if c >= full / 2 and lp["mean_nll"][i] is not None]
                ax.plot([lp["bucket_start"][i] + lp["bucket_size"] / 2 for i in keep],
                        [lp["mean_nll"][i] for i in keep], label=cond)
            ax.axvline(trained, color="grey", linestyle="--", linewidth=1, label="trained length")
            ax.set_xlabel("position (tokens)")
            ax.set_ylabel("mean NLL (nats)")
            ax.set_title("loss by position on held-out long documents")
            ax.legend()
        written.append(LOSS_FILE)
    return written


__all__ = ["LOSS_FILE", "accuracy_file", "heatmap_file", "slug", "write_plots"]
