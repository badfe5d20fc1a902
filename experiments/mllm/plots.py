"""Figures of the multimodal report: routing heatmaps, partition composition, the example grid.

Written atomically with the helpers of `experiments.plots` (matplotlib, Agg backend).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from experiments.engine.plots import pyplot, save_figure


def _annotated(ax, m: np.ndarray, vmax: float | None = None):
    im = ax.imshow(m, vmin=0, vmax=vmax if vmax is not None else np.nanmax(m), cmap="viridis", aspect="auto")
    hi = np.nanmax(m) if vmax is None else vmax
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                txt = f"{m[i, j]:.2f}" if vmax == 1 else f"{int(m[i, j])}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] < 0.6 * hi else "black")
    return im


def routing_heatmaps(weights: dict, row_labels: list[str], path: Path) -> Path:
    """One heatmap per router: mean weight on expert j (columns) of the test questions of group i
    (rows, e.g. the image source: digits / shapes / photos).

    Args:
      weights: router name -> `[groups, K]` mean weights (rows of NaN where a group is empty).
    """
    plt = pyplot()
    names = list(weights)
    fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names) + 0.8, 0.5 * len(row_labels) + 2.0),
                             squeeze=False)
    im = None
    for i_ax, (ax, name) in enumerate(zip(axes[0], names)):
        m = np.asarray(weights[name], float)
        im = _annotated(ax, m, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(len(row_labels)))
        ax.set_yticklabels(row_labels if i_ax == 0 else [""] * len(row_labels), fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean router weight")
    return save_figure(fig, path)


def composition(counts: dict, path: Path, title: str = "train conversations per cluster") -> Path:
    """Heatmap of counts: rows = groups (e.g. image source), columns = clusters of the partition."""
    plt = pyplot()
    labels = list(counts)
    m = np.asarray([counts[k] for k in labels], float)
    fig, ax = plt.subplots(figsize=(0.9 * m.shape[1] + 2.5, 0.45 * len(labels) + 1.8))
    _annotated(ax, m)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xticks(range(m.shape[1]))
    ax.set_xlabel("cluster (balanced k-means on stage-1 image features)")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def example_grid(images: np.ndarray, rows: list[dict], predictions: dict, path: Path, columns: int = 4) -> Path:
    """A grid of test images, each titled with its question, the reference and every system's answer.

    Args:
      images: `[n, S, S, 3]` uint8, one per row.
      rows: dicts with "question" and "answer".
      predictions: system name -> list of n predicted answers.
    """
    plt = pyplot()
    n = len(rows)
    cols = max(1, min(columns, n))
    nrows = max(1, -(-n // cols))
    lines = 3 + len(predictions)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, (2.2 + 0.16 * lines) * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (ax, row) in enumerate(zip(axes.ravel(), rows)):
        ax.imshow(images[i], interpolation="nearest")
        q = textwrap.shorten(row["question"].replace("<image>", "").strip(), 44)
        text = [f"Q: {q}", f"A: {row['answer']}"]
        for name, preds in predictions.items():
            mark = "✓" if preds[i].strip().lower() == row["answer"].strip().lower() else "✗"
            text.append(f"{mark} {name}: {textwrap.shorten(preds[i] or '∅', 22)}")
        ax.set_title("\n".join(text), fontsize=6.5, loc="left", family="monospace")
    fig.tight_layout()
    return save_figure(fig, path)
