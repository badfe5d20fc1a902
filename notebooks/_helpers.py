"""Small helpers shared by the course notebooks (not part of the library).

Imported by every notebook as ``import _helpers as H`` (the notebooks run with ``notebooks/`` as
their working directory). Importing it puts the repository root on ``sys.path`` (for
``proofs_check`` and ``experiments``) and sets small matplotlib figures, so the committed
notebooks stay light.

- toy laws: ``toy_q`` (a random law over ``[vocab]^length``), ``toy_mixture`` (``q = sum_k w_k q_k``);
- exact posterior functions for the samplers: ``ar_posterior_fn`` (the next-token table of a law,
  THEORY S5) and ``masked_posterior_fn`` (the exact denoiser of a masked path, THEORY S4/S7);
- ``empirical_law``: the law of sampled sequences over the data states;
- plots: ``show_kappa`` (a schedule as an image, steps x positions), ``show_router`` (router weights
  as a heat map), ``compare_bars`` (laws side by side), ``html_table``;
- ``nonneg``: a KL or a probability with its float rounding noise (``|x| < 1e-12``) shown as 0;
- ``check``: the check cell of an exercise (prints "not answered yet", raises on a wrong answer,
  prints "correct"). The solutions are in ``notebooks/solutions/``; ``tests/test_notebooks.py`` runs
  every notebook with them filled in.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dfm import tabular  # noqa: E402

matplotlib.rcParams.update({
    "figure.figsize": (5.0, 2.4), "figure.dpi": 72, "savefig.dpi": 72,
    "font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7,
})


# ---------------------------------------------------------------------------------------------
# toy laws
# ---------------------------------------------------------------------------------------------
def toy_q(rng: np.random.Generator, vocab: int, length: int) -> np.ndarray:
    """A random law ``q [vocab**length]`` (float64, Dirichlet) over the data states."""
    return tabular.random_distribution(rng, vocab**length, kind="dirichlet")


def toy_mixture(rng: np.random.Generator, vocab: int, length: int, k: int, concentration: float = 0.3):
    """``(w [K], experts [K, D], q [D])`` with ``q = sum_k w_k q_k``; a small Dirichlet
    ``concentration`` makes the experts' laws peaked, so they differ visibly."""
    w = rng.dirichlet(np.ones(k))
    experts = rng.dirichlet(np.full(vocab**length, concentration), size=k)
    return w, experts, w @ experts


def empirical_law(x, vocab: int) -> np.ndarray:
    """Law over the ``vocab**length`` data states of sampled sequences ``x [n, length]``."""
    x = np.asarray(x)
    idx = tabular.state_index(x, vocab, with_mask=False)
    return np.bincount(idx, minlength=vocab ** x.shape[1]) / x.shape[0]


# ---------------------------------------------------------------------------------------------
# exact posterior functions (PosteriorFn for dfm.samplers)
# ---------------------------------------------------------------------------------------------
def ar_posterior_fn(dist, vocab: int, length: int):
    """The exact AR denoiser of ``dist``: at step t it returns the next-token conditional
    ``q(x^t | x^{<t})`` as logits ``[batch, 1, vocab]`` (THEORY S5(b)); a ``PosteriorFn`` for
    ``sample_discrete`` under ``schedules.autoregressive(length)``."""
    conds = tabular.next_token_conditionals(dist, vocab, length)
    table = np.zeros((length, vocab ** (length - 1), vocab))
    for t, c in enumerate(conds):
        table[t, : c.shape[0]] = c
    log_table = jnp.log(jnp.asarray(table, jnp.float32) + 1e-30)

    def fn(x_t, t, positions, state):
        j = jnp.arange(length)
        weights = jnp.where(j < t, vocab ** jnp.maximum(t - 1 - j, 0), 0)   # prefix index, first most significant
        idx = jnp.sum(jnp.where(j < t, x_t, 0) * weights, axis=1)
        return log_table[t][idx][:, None, :], state

    return fn


def masked_posterior_fn(dist, vocab: int, length: int):
    """The exact denoiser ``p_{1|t}(x_1^i | x_t)`` of a masked path whose positions share one kappa
    (then it does not depend on t: it is ``q`` conditioned on the revealed tokens). Logits
    ``[batch, length, vocab]`` for every position; a ``PosteriorFn`` for ``sample_euler`` / ``sample_discrete``."""
    kappa = np.array([np.zeros(length), np.full(length, 0.5), np.ones(length)])
    post = tabular.coordinate_posteriors(dist, kappa, 1, vocab)          # [(vocab+1)^L, L, vocab]
    log_table = jnp.log(jnp.asarray(post, jnp.float32) + 1e-30)
    radix = jnp.asarray((vocab + 1) ** np.arange(length - 1, -1, -1))

    def fn(x_t, t, positions, state):
        logits = log_table[jnp.sum(x_t * radix, axis=1)]
        if positions is not None:
            logits = logits[:, positions]
        return logits, state

    return fn


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def show_kappa(schedule, title: str = "", ax=None):
    """Draw a schedule's table ``kappa[t, i]`` as an image: rows are steps t = 0..T, columns positions."""
    kappa = np.asarray(getattr(schedule, "kappa", schedule), dtype=np.float64)
    if ax is None:
        _, ax = plt.subplots(figsize=(2.2, 2.2))
    im = ax.imshow(kappa, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("position i")
    ax.set_ylabel("step t")
    ax.set_title(title or f"kappa {kappa.shape[0] - 1} x {kappa.shape[1]}")
    return im


def show_kappas(schedules: dict, suptitle: str = ""):
    """Several ``show_kappa`` panels in one row, with one colour bar."""
    fig, axes = plt.subplots(1, len(schedules), figsize=(1.9 * len(schedules) + 0.6, 2.5), squeeze=False)
    for ax, (name, s) in zip(axes[0], schedules.items()):
        im = show_kappa(s, name, ax)
        if ax is not axes[0, 0]:
            ax.set_ylabel("")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="kappa")
    if suptitle:
        fig.suptitle(suptitle, y=1.02)
    plt.show()


def show_router(weights, title: str = "router weights", ylabels=None, xlabel: str = "expert k", ylabel: str = "",
                ax=None, annotate: bool = True):
    """Router weights ``[rows, K]`` as a heat map (rows: texts, steps or states; columns: experts)."""
    w = np.asarray(weights, dtype=np.float64)
    show = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(0.6 * w.shape[1] + 1.6, 0.28 * w.shape[0] + 1.0))
    ax.imshow(w, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(w.shape[1]))
    ax.set_yticks(range(w.shape[0]))
    if ylabels is not None:
        ax.set_yticklabels(ylabels)
    if annotate and w.size <= 120:
        for (r, c), v in np.ndenumerate(w):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.6 else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if show:
        plt.show()


def compare_bars(laws: dict, xlabel: str = "state", title: str = ""):
    """Bar plot of several laws over the same states, side by side."""
    n = len(laws)
    width = 0.8 / n
    _, ax = plt.subplots(figsize=(5.5, 2.2))
    for j, (name, p) in enumerate(laws.items()):
        p = np.asarray(p)
        ax.bar(np.arange(p.size) + (j - (n - 1) / 2) * width, p, width, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probability")
    if title:
        ax.set_title(title)
    ax.legend()
    plt.show()


def html_table(rows, header=None):
    """An HTML table (no pandas) for ``IPython.display.display``."""
    from IPython.display import HTML

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = "".join(f"<th>{h}</th>" for h in header) if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


# ---------------------------------------------------------------------------------------------
# numbers and exercises
# ---------------------------------------------------------------------------------------------
def nonneg(x, tol: float = 1e-12) -> float:
    """A quantity that is >= 0 in exact arithmetic (a KL, a probability): float rounding noise below
    ``tol`` in absolute value is returned as 0.0 (e.g. ``-2.4e-16`` for a KL that is exactly 0)."""
    x = float(x)
    return 0.0 if abs(x) < tol else x


def check(name: str, answer, expected, *, atol: float = 1e-9, hint: str = "") -> None:
    """The check cell of an exercise: ``answer`` (``None``: not answered yet) against ``expected``
    (a number, an array or any value compared with ``==``). Prints "<name>: correct", or raises
    ``AssertionError`` with ``hint`` for a wrong answer."""
    if answer is None:
        print(f"{name}: not answered yet (write your answer in the cell above, run it, then this cell)")
        return
    if isinstance(expected, (bool, str, tuple)) or expected is None:
        ok = answer == expected
    else:
        a, e = np.asarray(answer, dtype=np.float64), np.asarray(expected, dtype=np.float64)
        ok = a.shape == e.shape and bool(np.allclose(a, e, rtol=0.0, atol=atol))
    if not ok:
        raise AssertionError(f"{name}: not quite. {hint}".strip())
    print(f"{name}: correct")
