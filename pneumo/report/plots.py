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

from pneumo.report.flags import format_threshold
from pneumo.report.metrics import (
    average_precision,
    binary_metrics,
    calibration,
    pr_curve,
    roc_auc,
    roc_curve,
)


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


# ---------------------------------------------------------------- evaluation charts


def roc_plot(
    y_true: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    out_path: str | os.PathLike,
    threshold: float | None = None,
    title: str = "ROC curve",
) -> Path:
    """ROC curve of a positive score, with its AUC and (optionally) the operating point at `threshold`."""

    fpr, tpr, _ = roc_curve(y_true, score)
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {roc_auc(y_true, score):.3f}")
    if threshold is not None:
        m = binary_metrics(y_true, score, threshold)
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="C3", ms=8,
                label=f"threshold {format_threshold(threshold)}: sens {m['sensitivity']:.3f}, spec {m['specificity']:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


def pr_plot(
    y_true: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    out_path: str | os.PathLike,
    threshold: float | None = None,
    title: str = "Precision-recall curve",
) -> Path:
    """Precision-recall curve with average precision, the prevalence baseline and the operating point."""

    precision, recall, _ = pr_curve(y_true, score)
    prevalence = float(np.mean(np.asarray(y_true) == 1)) if len(y_true) else 0.0
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.axhline(prevalence, ls="--", color="0.6", lw=1, label=f"prevalence {prevalence:.3f}")
    ax.step(recall, precision, where="post", lw=2, label=f"AP = {average_precision(y_true, score):.3f}")
    if threshold is not None:
        m = binary_metrics(y_true, score, threshold)
        ax.plot(m["sensitivity"], m["ppv"], "o", color="C3", ms=8,
                label=f"threshold {format_threshold(threshold)}: recall {m['sensitivity']:.3f}, precision {m['ppv']:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)", ylabel="precision (PPV)",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


def calibration_plot(
    y_true: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    out_path: str | os.PathLike,
    n_bins: int = 10,
    title: str = "Reliability diagram",
) -> Path:
    """Reliability diagram (observed frequency vs mean predicted per bin), ECE in the title,
    and a histogram of the scores underneath."""

    cal = calibration(y_true, score, n_bins=n_bins)
    edges = np.asarray(cal["edges"])
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    observed = np.asarray(cal["observed"], dtype=float)
    mean_pred = np.asarray(cal["mean_predicted"], dtype=float)
    filled = np.asarray(cal["counts"]) > 0
    fig = Figure(figsize=(4.8, 5.6))
    ax = fig.add_axes((0.14, 0.36, 0.8, 0.56))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfectly calibrated")
    ax.bar(centers[filled], observed[filled], width=width[filled] * 0.9, color="C0", alpha=0.35,
           edgecolor="C0", label="observed frequency")
    ax.plot(mean_pred[filled], observed[filled], "o-", color="C0", lw=1.5, label="per bin (mean predicted)")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed positive frequency",
           title=f"{title}\nECE = {cal['ece']:.3f}  (MCE {cal['mce']:.3f}, Brier {cal['brier']:.3f})")
    ax.tick_params(labelbottom=False)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist = fig.add_axes((0.14, 0.09, 0.8, 0.22), sharex=ax)
    hist.bar(centers, cal["counts"], width=width * 0.9, color="0.5")
    hist.set(xlabel="predicted probability (positive score)", ylabel="images")
    hist.set_yscale("symlog", linthresh=10)
    return _save(fig, out_path)


def confusion_plot(
    matrix: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    out_path: str | os.PathLike,
    title: str = "Confusion matrix",
) -> Path:
    """Confusion matrix (rows true, columns predicted): counts and row percentages in each cell."""
    cm = np.asarray(matrix, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    k = len(classes)
    fig = Figure(figsize=(1.3 * k + 2.4, 1.2 * k + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]:,}\n{100 * frac[i, j]:.1f}%", ha="center", va="center", fontsize=10,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), classes)
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return _save(fig, out_path)


def _history_series(history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Per-epoch history (a list of per-epoch dicts, or a dict of lists) as {key: values}."""
    if isinstance(history, Mapping):
        return {k: [float("nan") if v is None else float(v) for v in vs] for k, vs in history.items()
                if isinstance(vs, Sequence) and not isinstance(vs, str)}
    keys = [k for row in history for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return {k: [float(row[k]) if isinstance(row.get(k), int | float) else float("nan") for row in history]
            for k in dict.fromkeys(keys)}


def training_curves(
    history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]],
    out_path: str | os.PathLike,
    metrics: Sequence[str] = ("loss", "auc", "accuracy"),
    title: str = "Training curves",
    best_epoch: int | None = None,
) -> Path:
    """One panel per metric (loss, AUC, accuracy), train vs val per epoch (`training_figure`)."""
    return _save(training_figure(history, metrics, title, best_epoch), out_path)


def best_val_epoch(series: Mapping[str, Sequence[float]]) -> int | None:
    """The epoch training checkpoints as best: the highest val AUC (the first on ties), else the lowest val loss."""
    n = len(next(iter(series.values()), []))
    epochs = series.get("epoch") or list(range(1, n + 1))
    for key, pick in (("val_auc", np.nanargmax), ("val_loss", np.nanargmin)):
        values = np.asarray(series.get(key, []), dtype=float)
        if values.size and np.isfinite(values).any():
            return int(epochs[int(pick(values))])
    return None


def training_figure(
    history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]],
    metrics: Sequence[str] = ("loss", "auc", "accuracy"),
    title: str = "Training curves",
    best_epoch: int | None = None,
) -> Figure:
    """The training curves' figure: one panel per metric, train vs val per epoch, and one best
    epoch marked on every panel: `best_epoch` (the checkpointed one) or `best_val_epoch`.

    `history` is a list of per-epoch dicts such as `{"epoch": 1, "train_loss": .., "val_loss": ..,
    "val_auc": ..}` (or a dict of lists). Keys `train_<m>` / `val_<m>` (or `<m>` for train) are
    drawn; metrics with no values are skipped.
    """
    series = _history_series(history)
    n = len(next(iter(series.values()), []))
    epochs = series.get("epoch") or list(range(1, n + 1))
    panels = []
    for m in metrics:
        lines = {name: series[key] for name, key in (("train", f"train_{m}"), ("train", m), ("val", f"val_{m}"))
                 if key in series}
        if lines:
            panels.append((m, lines))
    best = best_epoch if best_epoch is not None else best_val_epoch(series)
    fig = Figure(figsize=(4.0 * max(1, len(panels)), 3.6))
    fig.suptitle(title)
    for i, (m, lines) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, values in lines.items():
            ax.plot(epochs[: len(values)], values, "o-" if len(values) < 30 else "-", ms=3, label=name,
                    color="C0" if name == "train" else "C1")
        if best is not None:
            ax.axvline(best, ls=":", color="0.5", lw=1, label=f"best (epoch {best:g}, by val AUC)")
        ax.set(xlabel="epoch", ylabel=m, title=m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not panels:
        fig.text(0.5, 0.5, "no per-epoch history", ha="center", va="center")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- drift


def drift_plot(
    reference_scores: Sequence[float] | np.ndarray,
    run_scores: Sequence[float] | np.ndarray,
    out_path: str | os.PathLike,
    threshold: float | None = None,
    reference_points: np.ndarray | None = None,
    run_points: np.ndarray | None = None,
    title: str = "Drift: this run vs the training data (val split)",
) -> Path:
    """Positive-score histograms (reference vs this run, as densities, with the threshold) and,
    given `float[N, >=2]` PCA coordinates, a scatter of the first two components."""
    ref, run = np.asarray(reference_scores, dtype=float), np.asarray(run_scores, dtype=float)
    scatter = reference_points is not None and run_points is not None and len(run_points) > 0 \
        and np.shape(reference_points)[1] >= 2
    fig = Figure(figsize=(10.0 if scatter else 5.6, 4.2))
    fig.suptitle(title, fontsize=9)
    ax = fig.add_subplot(1, 2 if scatter else 1, 1)
    bins = np.linspace(0, 1, 26)
    ax.hist(ref, bins=bins, density=True, alpha=0.45, color="C0", label=f"reference (val, n={len(ref):,})")
    if len(run):
        ax.hist(run, bins=bins, density=True, alpha=0.45, color="C1", label=f"this run (n={len(run):,})")
    if threshold is not None:
        ax.axvline(threshold, ls="--", color="C3", lw=1, label=f"threshold {format_threshold(threshold)}")
    ax.set(xlim=(0, 1), xlabel="positive score", ylabel="density", title="scores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if scatter:
        ax2 = fig.add_subplot(1, 2, 2)
        rp, qp = np.asarray(reference_points), np.asarray(run_points)
        qp = qp[np.random.default_rng(0).choice(len(qp), 2000, replace=False)] if len(qp) > 2000 else qp
        ax2.scatter(rp[:, 0], rp[:, 1], s=8, alpha=0.5, color="C0", label="reference (val)")
        ax2.scatter(qp[:, 0], qp[:, 1], s=8, alpha=0.5, color="C1", label="this run")
        ax2.set(xlabel="PC 1", ylabel="PC 2", title="image embeddings (PCA of val)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


# ---------------------------------------------------------------- sweeps


def sweep_plot(rows: Sequence[Mapping[str, object]], options: Sequence[str], metric: str,
               out_path: str | os.PathLike, title: str = "metric per option") -> Path:
    """One panel per swept option: each trial's `metric` against its value of that option
    (categorical values side by side, numbers on their axis; log scale when they span > 2 decades).
    Finished trials are filled, trials stopped early are hollow, failed ones are left out."""
    fig = Figure(figsize=(3.6 * max(1, len(options)), 3.4))
    fig.suptitle(title)
    for i, option in enumerate(options):
        ax = fig.add_subplot(1, max(1, len(options)), i + 1)
        shown = [r for r in rows if isinstance(r.get(metric), int | float) and r.get("status") != "error"]
        values = [r.get(option) for r in shown]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) and len(set(values)) > 4
        labels = sorted({str(v) for v in values}, key=lambda s: (len(s), s))
        x = [float(v) if numeric else labels.index(str(v)) for v in values]
        for status, face in (("ok", "C0"), ("stopped", "none")):
            pts = [(xi, r[metric]) for xi, r in zip(x, shown) if r.get("status") == status]
            if pts:
                ax.scatter(*zip(*pts), facecolors=face, edgecolors="C0", s=36, label=status)
        if numeric and values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set(xlabel=option, ylabel=metric)
        ax.grid(alpha=0.3)
        if i == 0 and shown:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)
