"""Continuous schedulers written out in numpy (independent of ``dfm.schedules``) and what THEORY S6 / S7 say
about them: the discrete and Euler rate tables, the per-step bound of S7 and the proven collision bounds.

``SCHEDULERS[name]`` gives kappa, the survival ``S = 1 - kappa`` in closed form (no cancellation near
t = 1), kappa', the largest ``|kappa''|`` on an interval and ``K1 = sup kappa'``; each has a nondecreasing
hazard ``kappa' / (1 - kappa)`` (checked on a grid by the S7 row). Grid: ``t_s = s h``, ``h = 1 / T``.

* discrete rates ``r_s = 1 - S(t_{s+1}) / S(t_s) = (kappa(t_{s+1}) - kappa(t_s)) / (1 - kappa(t_s))``;
* Euler rates ``e_s = min(1, h kappa'(t_s) / S(t_s))`` for s < T - 1 and ``e_{T-1} = 1``;
* THEORY S7, per step: ``|r_s - e_s| <= h^2 max_{[t_s, t_{s+1}]} |kappa''| / (2 S(t_s))`` for s < T - 1,
  0 at the last step (:func:`rate_difference_bound`);
* THEORY S6 / S7, globally (:func:`discrete_collision_bound`, :func:`euler_collision_bound`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from dfm import tabular as tb


@dataclasses.dataclass(frozen=True)
class Scheduler:
    kappa: Callable
    survival: Callable      # 1 - kappa, in closed form
    d_kappa: Callable
    d2_max: Callable        # (a, b) -> max_{[a, b]} |kappa''| (arrays)
    k1: float               # sup_{[0, 1]} kappa'
    library: tuple          # (class name in dfm.schedules, args)


PI = math.pi
SCHEDULERS = {
    "kappa=t": Scheduler(lambda t: t * 1.0, lambda t: 1.0 - t, lambda t: np.ones_like(t * 1.0),
                         lambda a, b: np.zeros_like(a * 1.0), 1.0, ("LinearScheduler", ())),
    "kappa=t^2": Scheduler(lambda t: t**2, lambda t: (1.0 - t) * (1.0 + t), lambda t: 2.0 * t,
                           lambda a, b: np.full_like(a * 1.0, 2.0), 2.0, ("PolynomialScheduler", (2.0,))),
    "kappa=t^3": Scheduler(lambda t: t**3, lambda t: (1.0 - t) * (1.0 + t + t**2), lambda t: 3.0 * t**2,
                           lambda a, b: 6.0 * np.maximum(np.abs(a), np.abs(b)), 3.0, ("PolynomialScheduler", (3.0,))),
    "cosine": Scheduler(lambda t: np.sin(0.5 * PI * t) ** 2, lambda t: np.cos(0.5 * PI * t) ** 2,
                        lambda t: 0.5 * PI * np.sin(PI * t),
                        # kappa'' = (pi^2 / 2) cos(pi t): |cos(pi t)| is monotone on [0, 1/2] and on [1/2, 1]
                        lambda a, b: 0.5 * PI**2 * np.maximum(np.abs(np.cos(PI * a)), np.abs(np.cos(PI * b))),
                        0.5 * PI, ("CosineScheduler", ())),
}


def library_scheduler(name: str):
    """The ``dfm.schedules`` scheduler of the same kappa."""
    from dfm import schedules

    cls, args = SCHEDULERS[name].library
    return getattr(schedules, cls)(*args)


def grid(num_steps: int) -> np.ndarray:
    return np.arange(num_steps + 1, dtype=np.float64) / num_steps


def kappa_table(name: str, num_steps: int, length: int) -> np.ndarray:
    """``kappa(t_s)`` for s = 0..T, the same for every position, endpoints exactly 0 and 1: ``[T + 1, L]``."""
    k = SCHEDULERS[name].kappa(grid(num_steps))
    k[0], k[-1] = 0.0, 1.0
    return np.repeat(k[:, None], length, axis=1)


def discrete_rates(name: str, num_steps: int) -> np.ndarray:
    """``r_s = 1 - S(t_{s+1}) / S(t_s)`` ``[T]`` (the last one is 1)."""
    surv = SCHEDULERS[name].survival(grid(num_steps))
    surv[-1] = 0.0
    return 1.0 - surv[1:] / surv[:-1]


def euler_rates(name: str, num_steps: int) -> np.ndarray:
    """``e_s = min(1, h kappa'(t_s) / S(t_s))`` ``[T]``, the last one set to 1 (every position still masked is
    drawn from the denoiser: flow_matching's ``MixtureDiscreteEulerSolver`` and ``dfm.samplers``)."""
    sch, h, t = SCHEDULERS[name], 1.0 / num_steps, grid(num_steps)[:-1]
    e = np.minimum(1.0, h * sch.d_kappa(t) / sch.survival(t))
    e[-1] = 1.0
    return e


def euler_tables(name: str, num_steps: int, length: int):
    """``(kappa [T + 1, L], d_kappa [T + 1, L], rate [T, L])`` of the Euler scheme (rates of :func:`euler_rates`)."""
    kappa = kappa_table(name, num_steps, length)
    d_kappa = np.repeat(SCHEDULERS[name].d_kappa(grid(num_steps))[:, None], length, axis=1)
    return kappa, d_kappa, np.repeat(euler_rates(name, num_steps)[:, None], length, axis=1)


def rate_difference_bound(name: str, num_steps: int) -> np.ndarray:
    """THEORY S7's per-step bound ``[T]``: ``h^2 max_{[t_s, t_{s+1}]} |kappa''| / (2 (1 - kappa(t_s)))`` for
    s < T - 1, and 0 at s = T - 1 (both rates are 1 there).

    Proof: ``h kappa'(t_s) / S(t_s) - r_s = (S(t_{s+1}) - S(t_s) - h S'(t_s)) / S(t_s)``, a Taylor remainder
    ``h^2 S''(xi) / 2`` over ``S(t_s)``; clipping the Euler rate to [0, 1] only moves it toward r_s in [0, 1]."""
    sch, h, t = SCHEDULERS[name], 1.0 / num_steps, grid(num_steps)[:-1]
    bound = h**2 * sch.d2_max(t, t + h) / (2.0 * sch.survival(t))
    bound[-1] = 0.0
    return bound


def hazard_is_nondecreasing(name: str, points: int = 4001) -> bool:
    """``kappa' / (1 - kappa)`` nondecreasing on a grid of [0, 1) (relative slack 1e-12)."""
    sch = SCHEDULERS[name]
    t = np.linspace(0.0, 1.0, points)[:-1]
    lam = sch.d_kappa(t) / sch.survival(t)
    return bool(np.all(np.diff(lam) >= -1e-12 * np.abs(lam[1:])))


def survival_ratio(name: str, num_steps: int) -> float:
    """``rho_T = max_{1 <= s <= T - 2} S(t_{s-1}) / S(t_s)`` (1 when T < 3)."""
    surv = SCHEDULERS[name].survival(grid(num_steps))
    if num_steps < 3:
        return 1.0
    return float(np.max(surv[0:num_steps - 2] / surv[1:num_steps - 1]))


def discrete_collision_bound(name: str, num_steps: int, length: int) -> float:
    """THEORY S6: ``eps <= C(N, 2) max_s (kappa(t_{s+1}) - kappa(t_s)) <= C(N, 2) h K1`` (the second form)."""
    return math.comb(length, 2) * SCHEDULERS[name].k1 / num_steps


def euler_collision_bound(name: str, num_steps: int, length: int) -> float:
    """THEORY S7: ``eps_Euler <= C(N, 2) max(rho_T, 2) h K1`` for a nondecreasing hazard (proof in docs/theory.md)."""
    return math.comb(length, 2) * max(survival_ratio(name, num_steps), 2.0) * SCHEDULERS[name].k1 / num_steps


# ------------------------------------------------------------------------------------------------------------
# exact laws by the kernel engine (dfm.tabular): the samplers with the exact denoiser, from all-mask
# ------------------------------------------------------------------------------------------------------------
def factorized_sampler_law(q, kappa, vocab: int) -> np.ndarray:
    """Law ``[M]`` of the factorized sampler driven by the exact posteriors of q (THEORY S6), from all-mask."""
    length = kappa.shape[1]
    m = (vocab + 1) ** length
    kernels = (tb.factorized_kernel(tb.coordinate_posteriors(q, kappa, t, vocab), kappa, t, vocab)
               for t in range(kappa.shape[0] - 1))
    return tb.sample_distribution(kernels, tb.point_mass(tb.mask_index(vocab, length), m))


def euler_sampler_law(q, name: str, num_steps: int, vocab: int, length: int) -> np.ndarray:
    """Law ``[M]`` of the Euler scheme with ``u = h u_cont`` and exact posteriors at ``kappa(s h)`` (THEORY S7),
    from the all-mask state (``dfm.tabular.euler_kernel``); the last step reveals every remaining position."""
    kappa, d_kappa, _ = euler_tables(name, num_steps, length)
    h = 1.0 / num_steps
    p = tb.point_mass(tb.mask_index(vocab, length), (vocab + 1) ** length)
    for s in range(num_steps):
        post = tb.coordinate_posteriors(q, kappa, s, vocab)
        if s == num_steps - 1:
            kern = tb.factorized_kernel_from_rate(post, np.ones(length), vocab)
        else:
            kern = tb.euler_kernel(post, kappa[s], d_kappa[s], h, vocab)
        p = kern @ p
    return p


def fit_rate(steps, errors) -> float:
    """Least-squares slope of log(error) against log(T) (a measured rate, not a proof)."""
    x, y = np.log(np.asarray(steps, dtype=float)), np.log(np.asarray(errors, dtype=float))
    return float(np.polyfit(x, y, 1)[0])
