"""DFM (ours, JAX) vs Meta ``flow_matching`` 1.0.10 (PyTorch CPU): masked mixture path, side by side.

Setup (identical on both sides): vocab 32 + mask (``mask_id = 32``), length 16, batch 256,
kappa = t (ours ``LinearScheduler``, peer ``PolynomialConvexScheduler(n=1)``), and a denoiser MLP
``x_t -> logits [batch, 16, 32]`` with 3 hidden layers of width 256 (SiLU). Its first layer is a
linear map of the one-hot input ``[16 * 33] -> 256``, computed on each side in its fastest exact
form (a sum of gathered rows: ours a fused per-position gather loop with a one-hot matmul
backward, the peer ``F.embedding_bag(mode="sum")``). The initial weights are drawn once in numpy
and copied to both sides.

(a) one AdamW training step (lr 1e-3, weight decay 0.01) with the generalized KL
    (``dfm.losses.generalized_kl`` vs ``MixturePathGeneralizedKL``) and with the masked
    cross-entropy (``dfm.losses.dfm_cross_entropy`` with weight 1 vs ``F.cross_entropy`` on the
    masked coordinates); ``t ~ U[0, 1 - 1e-3)``, ``x_t`` from the path (ours
    ``dfm.paths.sample_masked_path``, peer ``MixtureDiscreteProbPath.sample``). Before timing, one
    step on fixed ``(x_t, t)`` checks that losses and updated weights agree across sides.
(b) sampling with 64 and 256 Euler steps from the all-mask source, with the MLP and with the
    exact posterior of a product distribution ``q`` (per position ``q_i``, Dirichlet(1) draws):
    ``p_{1|t}(x^i | x_t) = q_i`` on masked coordinates. Ours is ``dfm.samplers.sample_euler``
    jitted whole; the peer is ``MixtureDiscreteEulerSolver``. The peer's model wrapper returns the
    posterior over the 33 states with ``delta_{x_t^i}`` on revealed coordinates (the exact masked
    posterior; without it the peer's solver would let revealed tokens jump), as ours only moves
    masked coordinates. Distribution check: total variation of the per-position marginals
    against ``q`` (exact posterior; both sides) and between the two sides (MLP), over 4096
    samples, next to the sampling-noise level.

Run: ``.venv/bin/python benchmarks/bench_dfm_vs_flow_matching.py`` (both thread settings, each in
a subprocess; ``--threads 1`` or ``--threads default`` for one).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "bench_dfm_vs_flow_matching"
VOCAB, MASK, LENGTH, BATCH, HIDDEN = 32, 32, 16, 256, 256
LR, WEIGHT_DECAY, T_EPS = 1e-3, 0.01, 1e-3
CHECK_SAMPLES = 4096
GOALS = {"sample": 5.0, "train": 2.0}


def init_weights(seed: int = 0):
    """numpy float32 weights: ``w_in [16 * 33, H]`` (one-hot rows), 2 hidden ``[H, H]``, ``w_out [H, 16 * 32]``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d_in = LENGTH * (VOCAB + 1)

    def lin(fan_in, fan_out):
        bound = 1.0 / np.sqrt(fan_in)
        return (rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
                rng.uniform(-bound, bound, (fan_out,)).astype(np.float32))

    w = {}
    # the one-hot input has 16 ones: scale like a fan-in of 16 (bound 1/4)
    w["w_in"] = rng.uniform(-0.25, 0.25, (d_in, HIDDEN)).astype(np.float32)
    w["b_in"] = rng.uniform(-0.25, 0.25, (HIDDEN,)).astype(np.float32)
    w["w_h1"], w["b_h1"] = lin(HIDDEN, HIDDEN)
    w["w_h2"], w["b_h2"] = lin(HIDDEN, HIDDEN)
    w["w_out"], w["b_out"] = lin(HIDDEN, LENGTH * VOCAB)
    return w


def product_q(seed: int = 1):
    """A product distribution ``q [16, 32]`` (rows Dirichlet(1)) and ``BATCH`` data samples ``x1``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.ones(VOCAB), size=LENGTH)
    x1 = np.stack([rng.choice(VOCAB, size=BATCH, p=q[i]) for i in range(LENGTH)], axis=1)
    return q, x1.astype(np.int64)


def marginals(x, num_states=VOCAB):
    """Empirical per-position marginals ``[length, vocab]`` of samples ``x [n, length]``."""
    import numpy as np

    x = np.asarray(x)
    return np.stack([np.bincount(x[:, i], minlength=num_states)[:num_states] / x.shape[0]
                     for i in range(x.shape[1])])


def tv(p, q):
    """Per-position total variation ``[length]``."""
    import numpy as np

    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(axis=-1)


def noise_tv(q, n, seed=7, reps=50):
    """Mean over positions of E[TV(empirical of n draws, q)] (Monte Carlo): the sampling-noise level."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vals = [np.mean(tv(np.stack([rng.multinomial(n, qi) / n for qi in q]), q)) for _ in range(reps)]
    return float(np.mean(vals))


# ----------------------------------------------------------------------------------------------
# ours (JAX)
# ----------------------------------------------------------------------------------------------
class Ours:
    def __init__(self, weights, q, x1):
        import jax
        import jax.numpy as jnp
        import optax

        from dfm import losses, paths, samplers, schedules

        self.jax, self.jnp = jax, jnp
        self.params = {k: jnp.asarray(v) for k, v in weights.items()}
        self.x1 = jnp.asarray(x1, jnp.int32)
        self.log_q = jnp.log(jnp.asarray(q, jnp.float32))
        self.tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
        sched = schedules.LinearScheduler()

        def rows_sum(w_in, x_t):
            # the barrier keeps XLA from fusing the computation of x_t (path sampling) into each of
            # the 16 gathers, where it is recomputed per gathered element (~3x slower train step)
            x_t = jax.lax.optimization_barrier(x_t)
            acc = jnp.take(w_in, x_t[:, 0], axis=0)
            for i in range(1, LENGTH):
                acc = acc + jnp.take(w_in, x_t[:, i] + i * (VOCAB + 1), axis=0)
            return acc

        @jax.custom_vjp
        def embed_sum(w_in, x_t):
            """``onehot(x_t).reshape(b, 16 * 33) @ w_in``: a per-position gather loop forward (XLA fuses
            it; ``take(...).sum(1)`` is ~4x slower on CPU) and a one-hot matmul backward (XLA's
            scatter-add is ~2x slower)."""
            return rows_sum(w_in, x_t)

        def embed_sum_fwd(w_in, x_t):
            return rows_sum(w_in, x_t), x_t

        def embed_sum_bwd(x_t, g):
            multi_hot = jax.nn.one_hot(x_t, VOCAB + 1, dtype=g.dtype).reshape(x_t.shape[0], -1)
            return multi_hot.T @ g, None

        embed_sum.defvjp(embed_sum_fwd, embed_sum_bwd)

        def mlp(p, x_t):
            h = jax.nn.silu(embed_sum(p["w_in"], x_t) + p["b_in"])
            h = jax.nn.silu(h @ p["w_h1"] + p["b_h1"])
            h = jax.nn.silu(h @ p["w_h2"] + p["b_h2"])
            return (h @ p["w_out"] + p["b_out"]).reshape(x_t.shape[0], LENGTH, VOCAB)

        def loss_det(p, x1, x_t, t, kind):
            logits = mlp(p, x_t)
            if kind == "gkl":
                return losses.generalized_kl(logits, x1, x_t, sched.kappa(t), sched.d_kappa(t), reduction="mean")
            ce = losses.dfm_cross_entropy(logits, x1, x_t, jnp.ones((LENGTH,), logits.dtype), mask_id=MASK)
            return jnp.sum(ce) / (x1.shape[0] * LENGTH)

        def loss_random(p, key, x1, kind):
            k_t, k_x = jax.random.split(key)
            t = jax.random.uniform(k_t, (x1.shape[0],)) * (1.0 - T_EPS)
            x_t = paths.sample_masked_path(k_x, x1, sched.kappa(t)[:, None], MASK)
            return loss_det(p, x1, x_t, t, kind)

        def update(p, opt_state, loss, grads):
            updates, opt_state = self.tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        def train_step(p, opt_state, key, x1, kind):
            key, k_step = jax.random.split(key)
            loss, grads = jax.value_and_grad(loss_random)(p, k_step, x1, kind)
            return (*update(p, opt_state, loss, grads), key)

        def det_step(p, opt_state, x1, x_t, t, kind):
            loss, grads = jax.value_and_grad(loss_det)(p, x1, x_t, t, kind)
            return update(p, opt_state, loss, grads)

        self.mlp = mlp
        self.train_step = jax.jit(train_step, static_argnames="kind", donate_argnums=(0, 1, 2))
        self.det_step = jax.jit(det_step, static_argnames="kind")
        x0 = paths.mask_source((BATCH, LENGTH), MASK)

        def sample(key, p, log_q, num_steps, exact):
            if exact:
                def posterior_fn(x_t, t, positions, state):
                    return jnp.broadcast_to(log_q[positions], (x_t.shape[0], *positions.shape, VOCAB)), state
            else:
                posterior_fn = samplers.posterior_fn_from_denoiser(lambda x: mlp(p, x))
            return samplers.sample_euler(key, posterior_fn, sched, x0, num_steps, mask_id=MASK)

        self.sample = jax.jit(sample, static_argnames=("num_steps", "exact"))

    def check_step(self, x_t, t, kind):
        jnp = self.jnp
        opt_state = self.tx.init(self.params)
        p, _, loss = self.det_step(self.params, opt_state, self.x1, jnp.asarray(x_t, jnp.int32),
                                   jnp.asarray(t, jnp.float32), kind=kind)
        import numpy as np

        return float(loss), {k: np.asarray(v) for k, v in p.items()}

    def train_call(self, kind):
        jax = self.jax
        p = jax.tree.map(lambda a: a.copy(), self.params)
        state = {"p": p, "opt": self.tx.init(p), "key": jax.random.key(0)}
        _, compile_s = common.compile_jitted(self.train_step, state["p"], state["opt"], state["key"], self.x1,
                                             kind=kind)

        def call():
            state["p"], state["opt"], loss, state["key"] = self.train_step(state["p"], state["opt"], state["key"],
                                                                          self.x1, kind=kind)
            return loss

        return call, compile_s

    def sample_call(self, num_steps, exact):
        key = self.jax.random.key(1)
        _, compile_s = common.compile_jitted(self.sample, key, self.params, self.log_q, num_steps=num_steps,
                                             exact=exact)
        return (lambda: self.sample(key, self.params, self.log_q, num_steps=num_steps, exact=exact)), compile_s

    def draw(self, num_steps, exact, n, seed):
        import numpy as np

        keys = self.jax.random.split(self.jax.random.key(seed), n // BATCH)
        return np.concatenate([np.asarray(self.sample(k, self.params, self.log_q, num_steps=num_steps, exact=exact))
                               for k in keys])


# ----------------------------------------------------------------------------------------------
# peer (flow_matching, PyTorch)
# ----------------------------------------------------------------------------------------------
class Peer:
    def __init__(self, weights, q, x1):
        import torch
        import torch.nn.functional as F
        from flow_matching.loss import MixturePathGeneralizedKL
        from flow_matching.path import MixtureDiscreteProbPath
        from flow_matching.path.scheduler import PolynomialConvexScheduler
        from flow_matching.solver import MixtureDiscreteEulerSolver
        from flow_matching.utils import ModelWrapper

        self.torch, self.F = torch, F
        self.weights = weights
        self.x1 = torch.as_tensor(x1)
        self.q = torch.as_tensor(q, dtype=torch.float32)
        self.path = MixtureDiscreteProbPath(PolynomialConvexScheduler(n=1.0))
        self.gkl = MixturePathGeneralizedKL(self.path, reduction="mean")
        self.offsets = torch.arange(LENGTH) * (VOCAB + 1)
        peer = self

        class MLP(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.p = torch.nn.ParameterDict(
                    {k: torch.nn.Parameter(torch.tensor(v)) for k, v in weights.items()})

            def forward(self, x_t):
                p = self.p
                # = onehot(x_t) @ w_in; embedding_bag is torch's fastest form (8x embedding().sum(1))
                h = F.silu(F.embedding_bag(x_t + peer.offsets, p["w_in"], mode="sum") + p["b_in"])
                h = F.silu(h @ p["w_h1"] + p["b_h1"])
                h = F.silu(h @ p["w_h2"] + p["b_h2"])
                return (h @ p["w_out"] + p["b_out"]).view(x_t.shape[0], LENGTH, VOCAB)

        self.MLP = MLP

        def masked_posterior(probs, x):
            """probs [b, L, 32] on masked coordinates, delta_{x^i} on revealed; padded to 33 states."""
            padded = F.pad(probs, (0, 1))
            return torch.where((x == MASK)[..., None], padded, F.one_hot(x, VOCAB + 1).to(probs.dtype))

        class MLPPosterior(ModelWrapper):
            def forward(self, x, t, **extras):
                return masked_posterior(torch.softmax(self.model(x), dim=-1), x)

        class ExactPosterior(ModelWrapper):
            def forward(self, x, t, **extras):
                return masked_posterior(peer.q.expand(x.shape[0], LENGTH, VOCAB), x)

        self.model = MLP()
        self.solvers = {
            False: MixtureDiscreteEulerSolver(MLPPosterior(self.model), self.path, vocabulary_size=VOCAB + 1),
            True: MixtureDiscreteEulerSolver(ExactPosterior(None), self.path, vocabulary_size=VOCAB + 1),
        }

    def loss(self, model, x_t, t, kind):
        torch, F = self.torch, self.F
        logits = model(x_t)
        if kind == "gkl":
            # the peer gathers p_{1|t} at x_t, so it needs a logit for the mask state: -inf (p = 0)
            logits = torch.cat([logits, torch.full_like(logits[..., :1], float("-inf"))], dim=-1)
            return self.gkl(logits, self.x1, x_t, t)
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), self.x1.reshape(-1), reduction="none")
        return (ce * (x_t.reshape(-1) == MASK)).sum() / (x_t.shape[0] * LENGTH)

    def optimizer(self, model):
        return self.torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=WEIGHT_DECAY)

    def check_step(self, x_t, t, kind):
        torch = self.torch
        model = self.MLP()
        opt = self.optimizer(model)
        loss = self.loss(model, torch.as_tensor(x_t), torch.as_tensor(t, dtype=torch.float32), kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach()), {k: v.detach().numpy().copy() for k, v in model.p.items()}

    def train_call(self, kind):
        torch = self.torch
        model = self.MLP()
        opt = self.optimizer(model)
        x0 = torch.full_like(self.x1, MASK)

        def call():
            t = torch.rand(self.x1.shape[0]) * (1.0 - T_EPS)
            x_t = self.path.sample(t=t, x_0=x0, x_1=self.x1).x_t
            loss = self.loss(model, x_t, t, kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        return call

    def sample(self, num_steps, exact):
        torch = self.torch
        x_init = torch.full((BATCH, LENGTH), MASK, dtype=torch.long)
        grid = torch.linspace(0.0, 1.0, num_steps + 1)
        return self.solvers[exact].sample(x_init=x_init, step_size=None, time_grid=grid)

    def sample_call(self, num_steps, exact):
        return lambda: self.sample(num_steps, exact)

    def draw(self, num_steps, exact, n, seed):
        import numpy as np

        self.torch.manual_seed(seed)
        return np.concatenate([self.sample(num_steps, exact).numpy() for _ in range(n // BATCH)])


# ----------------------------------------------------------------------------------------------
def run(args) -> dict:
    import numpy as np

    common.configure_threads(args.threads)
    import jax  # noqa: F401  (imported after the thread flags are set)
    import torch

    common.configure_torch(args.threads)
    torch.manual_seed(0)
    info = common.thread_info(args.threads)
    print("threads:", info, flush=True)

    weights = init_weights(0)
    q, x1 = product_q(1)
    ours, peer = Ours(weights, q, x1), Peer(weights, q, x1)
    repeats = 3 if args.quick else args.repeats
    result = {"benchmark": NAME, "date_utc": common.utc_now(), "threads": info,
              "config": {"vocab": VOCAB, "mask_id": MASK, "length": LENGTH, "batch": BATCH, "hidden": HIDDEN,
                         "hidden_layers": 3, "kappa": "t", "optimizer": f"AdamW lr={LR} wd={WEIGHT_DECAY}"},
              "checks": {}, "timings": [], "distribution": {}}

    # ---- correctness: one deterministic step on fixed (x_t, t), both sides
    rng = np.random.default_rng(3)
    t_fix = rng.uniform(0, 1 - T_EPS, size=BATCH).astype(np.float32)
    x_t_fix = np.where(rng.random((BATCH, LENGTH)) < t_fix[:, None], x1, MASK).astype(np.int64)
    for kind in ("gkl", "ce"):
        lo, po = ours.check_step(x_t_fix, t_fix, kind)
        lp, pp = peer.check_step(x_t_fix, t_fix, kind)
        diff = max(float(np.max(np.abs(po[k] - pp[k]))) for k in po)
        result["checks"][f"train_{kind}"] = {"loss_ours": lo, "loss_peer": lp, "loss_abs_diff": abs(lo - lp),
                                            "param_max_abs_diff_after_1_step": diff}
        print(f"check {kind}: loss ours {lo:.6f} peer {lp:.6f}  |param diff| after one AdamW step {diff:.2e}")

    # ---- (a) training step
    rows = []
    for kind in ("gkl", "ce"):
        call, c_o = ours.train_call(kind)
        t = common.time_interleaved({"ours": call, "peer": peer.train_call(kind)}, repeats=repeats, number=5,
                                    warmup=3)
        rows.append(_row(f"train step ({kind})", t["ours"], t["peer"], c_o, GOALS["train"]))

    # ---- (b) sampling
    for exact in (False, True):
        for steps in (64, 256):
            call, c_o = ours.sample_call(steps, exact)
            t = common.time_interleaved({"ours": call, "peer": peer.sample_call(steps, exact)},
                                        repeats=max(3, repeats // 2), warmup=1)
            rows.append(_row(f"sample {steps} steps ({'exact q' if exact else 'MLP'})", t["ours"], t["peer"], c_o,
                             GOALS["sample"]))
    result["timings"] = rows

    # ---- same distribution
    if args.no_check:
        return _finish(result, rows, args)
    n = 1024 if args.quick else CHECK_SAMPLES
    steps = 64
    floor = noise_tv(q, n)
    xo, xp = ours.draw(steps, True, n, seed=11), peer.draw(steps, True, n, seed=11)
    d = {"samples": n, "steps": steps, "noise_tv_mean": floor,
         "exact_ours_vs_q_tv_mean": float(np.mean(tv(marginals(xo), q))),
         "exact_ours_vs_q_tv_max": float(np.max(tv(marginals(xo), q))),
         "exact_peer_vs_q_tv_mean": float(np.mean(tv(marginals(xp), q))),
         "exact_peer_vs_q_tv_max": float(np.max(tv(marginals(xp), q))),
         "exact_any_mask_left": bool((xo == MASK).any() or (xp == MASK).any())}
    mo, mo2 = marginals(ours.draw(steps, False, n, seed=12)), marginals(ours.draw(steps, False, n, seed=13))
    mp = marginals(peer.draw(steps, False, n, seed=12))
    d.update({"mlp_ours_vs_peer_tv_mean": float(np.mean(tv(mo, mp))),
              "mlp_ours_vs_ours_tv_mean (noise)": float(np.mean(tv(mo, mo2)))})
    result["distribution"] = d
    print("\ndistribution check (per-position marginals, total variation):")
    for k, v in d.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")

    return _finish(result, rows, args)


def _finish(result, rows, args):
    result["summary"] = [{k: r[k] for k in ("case", "ours_ms", "peer_ms", "speedup", "cpu_speedup", "goal", "met",
                                            "ours_compile_s")} for r in rows]
    common.print_rows(f"{NAME}, threads={args.threads}", result["summary"])
    return result


def _row(case, t_ours, t_peer, compile_s, goal):
    speed = common.ratio(t_peer["median_s"], t_ours["median_s"])
    cpu_speed = common.ratio(t_peer["cpu_median_s"], t_ours["cpu_median_s"])
    row = {"case": case, "ours_ms": 1e3 * t_ours["median_s"], "peer_ms": 1e3 * t_peer["median_s"],
           "speedup": speed, "cpu_speedup": cpu_speed, "goal": f">= {goal}x", "met": speed >= goal,
           "ours_compile_s": compile_s, "ours": t_ours, "peer": t_peer}
    print(f"{case:32s} ours {row['ours_ms']:9.3f} ms  peer {row['peer_ms']:9.3f} ms  x{speed:6.2f}  "
          f"(cpu-time x{cpu_speed:6.2f}; compile {compile_s:.2f} s)", flush=True)
    return row


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = common.parser(NAME, __doc__.splitlines()[0]).parse_args(argv)
    if common.main_dispatch(__file__, args, argv):
        return
    common.write_json(args.out, run(args))


if __name__ == "__main__":
    main()
