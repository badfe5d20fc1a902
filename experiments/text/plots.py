"""PNG plots of the text job: router weights by true cluster, cluster sizes (loss curves:
`experiments.engine.plots.loss_curves`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.engine.plots import pyplot, save_figure


def router_heatmaps(weights: dict, path: Path) -> Path:
    """One K x K heatmap per router: mean weight on expert j (columns) of test documents whose
    true cluster is i (rows). Rows without documents are blank."""
    plt = pyplot()
    names = list(weights)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for i_ax, (ax, name) in enumerate(zip(axes[0], names)):
        rows = weights[name]
        k = len(rows)
        width = len(next((r for r in rows if r is not None), [np.nan] * k))
        m = np.array([r if r is not None else [np.nan] * width for r in rows], dtype=float)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i in range(k):
            for j in range(width):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < 0.6 else "black")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        if i_ax == 0:
            ax.set_ylabel("true cluster")
        ax.set_xticks(range(width))
        ax.set_yticks(range(k))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    return save_figure(fig, path)


def cluster_sizes(partition_info: dict, path: Path, evaluated: list[int] | None = None) -> Path:
    """Bars per cluster: train documents, train sequences, random-partition sequences, and the
    evaluated test documents (`evaluated`, those the report's tables score: with a context chunk and
    at least one scored chunk; default all test documents of the partition)."""
    plt = pyplot()
    series = {
        "train documents": partition_info["documents_per_cluster"],
        "train sequences": partition_info["sequences_per_cluster"],
        "random-partition sequences": partition_info.get("random_sequences_per_cluster"),
        "evaluated test documents" if evaluated is not None else "test documents":
            evaluated if evaluated is not None else partition_info["test_documents_per_cluster"],
    }
    series = {k: v for k, v in series.items() if v is not None}
    fig, axes = plt.subplots(1, len(series), figsize=(3.0 * len(series), 2.8))
    for ax, (name, values) in zip(np.atleast_1d(axes), series.items()):
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cluster")
        ax.set_xticks(range(len(values)))
    return save_figure(fig, path)
