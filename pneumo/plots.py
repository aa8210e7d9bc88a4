"""PNG charts, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

A flat set of functions; each takes plain data, writes one PNG and returns its path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, out_path: str | os.PathLike) -> Path:
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def sample_grid(
    images: Mapping[str, Sequence[np.ndarray]],
    out_path: str | os.PathLike,
    captions: Mapping[str, Sequence[str]] | None = None,
    title: str | None = None,
) -> Path:
    """One row per class of grayscale `uint8[H, W]` images (e.g. what the model sees)."""
    rows = [label for label, imgs in images.items() if len(imgs)]
    cols = max((len(images[r]) for r in rows), default=1)
    fig = Figure(figsize=(2.2 * cols + 0.6, 2.3 * max(1, len(rows)) + (0.4 if title else 0)))
    if title:
        fig.suptitle(title)
    for i, label in enumerate(rows):
        for j in range(cols):
            ax = fig.add_subplot(len(rows), cols, i * cols + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images[label]):
                ax.axis("off")
                continue
            ax.imshow(np.asarray(images[label][j]), cmap="gray", vmin=0, vmax=255)
            if j == 0:
                ax.set_ylabel(label, fontsize=11)
            caption = (captions or {}).get(label, [])
            if j < len(caption):
                ax.set_title(caption[j], fontsize=7)
    if not rows:
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
    fig.tight_layout()
    return _save(fig, out_path)


def class_balance(
    counts: Mapping[str, Mapping[str, int]],
    out_path: str | os.PathLike,
    title: str = "Images per split and class",
    labels: Sequence[str] | None = None,
) -> Path:
    """Grouped bar chart of `{split: {label: count}}` (bars in `labels` order), each labelled with its count."""
    splits = list(counts)
    labels = list(labels) if labels else sorted({label for c in counts.values() for label in c})
    fig = Figure(figsize=(max(4.0, 1.6 * len(splits) * max(1, len(labels)) ** 0.5 + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(splits))
    for k, label in enumerate(labels):
        values = [counts[s].get(label, 0) for s in splits]
        bars = ax.bar(x + (k - (len(labels) - 1) / 2) * width, values, width, label=label)
        ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8)
    ax.set_xticks(x, splits)
    ax.set_ylabel("images")
    ax.set_title(title)
    if labels:
        ax.legend()
    ax.margins(y=0.15)
    fig.tight_layout()
    return _save(fig, out_path)
