"""One way to draw and save a figure: no screen needed, one house style, saved atomically.

    with plotting.figure(out_dir / "curves.png", ncols=2, title="GRPO") as (fig, axes):
        axes[0, 0].plot(steps, reward)
        ...

`axes` is always a 2-D array (`nrows` x `ncols`). On leaving the block the figure gets its title,
a tight layout, and is written to a temporary name and renamed into place, so a reader never sees a
half-written PNG; the figure is then closed (pyplot keeps every open figure alive otherwise).
matplotlib is imported on first use only: the training path never pays for it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from .files import atomic_write

DPI = 110
STYLE = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "axes.titlesize": 10,
}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: str | os.PathLike, *, nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None,
           title: str | None = None, **subplot_kw: Any) -> Iterator[tuple[Any, Any]]:
    """A figure of `nrows` x `ncols` axes, saved to `path` when the block ends without an error."""
    plt = pyplot()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (5.5 * ncols, 3.8 * nrows), squeeze=False,
                                 **subplot_kw)
        try:
            yield fig, axes
            if title:
                fig.suptitle(title)
            fig.tight_layout()
            save(fig, path)
        finally:
            plt.close(fig)


def save(fig, path: str | os.PathLike) -> str:
    """Write `fig` to `path` (PNG) through a temporary file; returns the path as a string."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=Path(path).suffix.lstrip(".") or "png"))
    return str(path)


__all__ = ["DPI", "STYLE", "figure", "pyplot", "save"]
