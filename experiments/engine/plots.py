"""PNG plots shared by the tasks (matplotlib, Agg backend): the pyplot module, atomic saving, and
the training-loss curves of every stage.

Each figure is written atomically (`dfm.io.atomic_path`: temporary file, then `os.replace`).
"""
from __future__ import annotations

from pathlib import Path

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


FAMILIES = ("stage 1", "dense", "experts", "random control", "router")


def stage_family(name: str, first: str = "base") -> str:
    """The panel of a stage in `loss_curves`: "stage 1" (`first`), "dense", "experts" (expert-k),
    "random control" (random-k), "router", or the stage's own name for any other stage."""
    if name == first:
        return "stage 1"
    if name.startswith("expert-"):
        return "experts"
    if name.startswith("random-"):
        return "random control"
    return name


def _validation(info: dict) -> list[tuple[float, float]]:
    rows = [*(info.get("validation") or []), *(r for r in info.get("history") or [] if "val_loss" in r)]
    return sorted({(r["step"], r["val_loss"]) for r in rows if "step" in r and r.get("val_loss") is not None})


def _label(name: str) -> str:
    kind, _, k = name.partition("-")
    return f"{'expert' if kind == 'expert' else 'random expert'} {k}" if kind in ("expert", "random") and k.isdigit() \
        else name


def loss_curves(stages: dict, path: Path, title: str = "", first: str = "base") -> Path:
    """Training loss (nats/token) against each stage's optimizer step, one panel per stage family.

    Panels: stage 1, dense, the K experts overlaid ("expert k" in the legend), the random-partition
    control, the router (its own loss: cross-entropy over clusters), each present only when the
    run has it; the token-loss panels share their y axis. Validation losses (rows with a
    "val_loss", in the marker's "validation" list or in its history) are drawn as dotted lines
    with dots in their stage's colour, and the kept (best-validation) step as a star.

    Args:
      stages: stage name -> marker info with "history" rows {"step", "loss"} (and optionally
        "validation" rows {"step", "val_loss"}).
      first: name of the stage-1 stage ("base" in the text job, "stage1" in the multimodal job).
    """
    plt = pyplot()
    panels: dict[str, list[str]] = {}
    for name in sorted(stages, key=lambda n: (n.rsplit("-", 1)[0], int(n.rsplit("-", 1)[1])
                                              if n.rsplit("-", 1)[-1].isdigit() else 0)):
        if stages[name].get("history") or _validation(stages[name]):
            panels.setdefault(stage_family(name, first), []).append(name)
    order = [f for f in FAMILIES if f in panels] + sorted(f for f in panels if f not in FAMILIES)
    n = max(1, len(order))
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    token_axes = []
    for ax, family in zip(axes.flat, order):
        for i, name in enumerate(panels[family]):
            info = stages[name]
            color = "black" if family in ("stage 1", "dense") else colors[i % len(colors)]
            hist = info.get("history") or []
            if hist:
                ax.plot([h["step"] for h in hist], [h["loss"] for h in hist],
                        "--" if family == "random control" else "-", lw=1.6 if len(panels[family]) == 1 else 1.1,
                        color=color, label=_label(name))
            val = _validation(info)
            if val:
                ax.plot(*zip(*val), "o:", ms=3.5, lw=0.9, color=color, label=f"{_label(name)} (validation)")
                if info.get("kept") == "best" and info.get("best_step") is not None:
                    ax.plot([info["best_step"]], [info["best_val_loss"]], "*", ms=11, color=color,
                            markeredgecolor="black", markeredgewidth=0.6, zorder=5)
        ax.set_title(family if family != "stage 1" else f"stage 1 ({first})", fontsize=9)
        ax.set_xlabel("optimizer step of the stage", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if len(panels[family]) > 1 or _validation(stages[panels[family][0]]):
            ax.legend(fontsize=6, ncol=2 if len(panels[family]) > 6 else 1)
        if family == "router":
            ax.set_ylabel("router loss (nats)", fontsize=8)
        else:
            ax.set_ylabel("loss (nats / token)", fontsize=8)
            token_axes.append(ax)
    for ax in list(axes.flat)[len(order):]:
        ax.set_visible(False)
    if len(token_axes) > 1:                   # one y scale for the token losses: panels compare
        lo = min(ax.get_ylim()[0] for ax in token_axes)
        hi = max(ax.get_ylim()[1] for ax in token_axes)
        for ax in token_axes:
            ax.set_ylim(lo, hi)
    if not order:
        axes[0, 0].text(0.5, 0.5, "no training history", ha="center", va="center")
    fig.suptitle(title or "training loss (lines), validation loss (dots; star: the kept step)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
