"""PNG plots of a run (matplotlib, Agg backend): loss curves, router weights, cluster sizes.

Each figure is written atomically (`dfm.io.atomic_path`: temporary file, then `os.replace`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dfm.io import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        _plt().close(fig)
    return path


def loss_curves(stages: dict, path: Path, title: str = "") -> Path:
    """Training loss (nats/token) against the global step; stage-2 runs start after the base.

    Args:
      stages: stage name -> marker info with "history" rows {"step", "loss"}.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    base_steps = stages.get("base", {}).get("steps", 0)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, info) in enumerate(sorted(stages.items())):
        hist = info.get("history") or []
        if not hist or name == "router":
            continue
        steps = np.array([h["step"] for h in hist]) + (0 if name == "base" else base_steps)
        loss = np.array([h["loss"] for h in hist])
        style = "--" if name.startswith("random") else "-"
        width = 2.2 if name in ("base", "dense") else 1.0
        ax.plot(steps, loss, style, lw=width, label=name, color="black" if name == "base" else colors[i % len(colors)])
    ax.set_xlabel("optimizer step (stage 2 continues after the base)")
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title(title or "training loss")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def router_heatmaps(weights: dict, path: Path) -> Path:
    """One K x K heatmap per router: mean weight on expert j (columns) of test documents whose
    true cluster is i (rows). Rows without documents are blank."""
    plt = _plt()
    names = list(weights)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for i_ax, (ax, name) in enumerate(zip(axes[0], names)):
        rows = weights[name]
        k = len(rows)
        m = np.array([r if r is not None else [np.nan] * k for r in rows], dtype=float)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i in range(k):
            for j in range(k):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] < 0.6 else "black")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert")
        if i_ax == 0:
            ax.set_ylabel("true cluster")
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    return _save(fig, path)


def cluster_sizes(partition_info: dict, path: Path) -> Path:
    """Bars per cluster: train documents, train sequences, random-partition sequences, test documents."""
    plt = _plt()
    series = {
        "train documents": partition_info["documents_per_cluster"],
        "train sequences": partition_info["sequences_per_cluster"],
        "random-partition sequences": partition_info.get("random_sequences_per_cluster"),
        "test documents": partition_info["test_documents_per_cluster"],
    }
    series = {k: v for k, v in series.items() if v is not None}
    fig, axes = plt.subplots(1, len(series), figsize=(3.0 * len(series), 2.8))
    for ax, (name, values) in zip(np.atleast_1d(axes), series.items()):
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cluster")
        ax.set_xticks(range(len(values)))
    return _save(fig, path)
