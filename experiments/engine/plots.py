"""PNG plots shared by the tasks (matplotlib, Agg backend): the pyplot module, atomic saving, and
the training-loss curves of every stage.

Each figure is written atomically (`dfm.io.atomic_path`: temporary file, then `os.replace`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dfm.io import atomic_path


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save `fig` as a PNG at `path` atomically, then close it."""
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return path


def loss_curves(stages: dict, path: Path, title: str = "", first: str = "base") -> Path:
    """Training loss (nats/token) against the global step; stage-2 runs start after the base.

    Args:
      stages: stage name -> marker info with "history" rows {"step", "loss"}; the stage named
        `first` (the shared stage 1) is drawn in black and the others start after it.
      first: name of the stage-1 stage ("base" in the text job, "stage1" in the multimodal job).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    base_steps = stages.get(first, {}).get("steps", 0)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, info) in enumerate(sorted(stages.items())):
        hist = info.get("history") or []
        if not hist or name == "router":
            continue
        steps = np.array([h["step"] for h in hist]) + (0 if name == first else base_steps)
        loss = np.array([h["loss"] for h in hist])
        style = "--" if name.startswith("random") else "-"
        width = 2.2 if name in (first, "dense") else 1.0
        ax.plot(steps, loss, style, lw=width, label=name, color="black" if name == first else colors[i % len(colors)])
    ax.set_xlabel(f"optimizer step (stage 2 continues after {first})")
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title(title or "training loss")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
