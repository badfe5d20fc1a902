"""Generated samples of the dense model and the expert ensemble, decoded to text.

Both are drawn with fixed keys (the same key for dense and ensemble):
- AR schedule: `dfm.decentral.mixture_generate` (the library's one mixture generation, shared with
  `dfm.DecentralizedModel.generate`) continues the prompt BOS for `eval.sample_length` tokens: the
  autoregressive schedule over the experts' KV caches (THEORY S5), the ensemble mixing the experts
  with the Bayes-filter router (S9), priors = the clusters' shares of the train sequences; dense is
  the mixture of one model.
- masked schedule (the config's discretized kappa schedule, full `seq_len`): `dfm.samplers.sample_discrete`
  from an all-mask source over the denoisers (`posterior_fn_from_denoiser`); the ensemble uses the
  learned router (THEORY S10).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm.decentral import (
    BayesFilterRouter,
    FixedRouter,
    ensemble_init_state,
    ensemble_posterior_fn,
    mixture_generate,
)
from dfm.paths import mask_source
from dfm.samplers import posterior_fn_from_denoiser, sample_discrete
from experiments.engine.rundir import RunDir
from experiments.engine.training import load_stage_model
from experiments.text.config import ExperimentConfig
from experiments.text.data import TextData
from experiments.text.modeling import kappa_schedule, router_factory


def _masked_sampler(graphdefs, router_graphdef, num: int, schedule, vocab: int, temperature: float):
    length = schedule.length

    @jax.jit
    def go(states, router_state, key):
        models = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
        fns = [posterior_fn_from_denoiser(m) for m in models]
        x0 = mask_source((num, length), vocab)
        if router_graphdef is None:
            return sample_discrete(key, fns[0], schedule, x0, temperature=temperature, mask_id=vocab,
                                   check_finite=True)
        router = nnx.merge(router_graphdef, router_state)
        fn = ensemble_posterior_fn(fns, router, mask_id=vocab)
        state = ensemble_init_state(router, [None] * len(models), batch=num, num_moving=length, vocab=vocab)
        return sample_discrete(key, fn, schedule, x0, temperature=temperature, mask_id=vocab, state=state,
                              check_finite=True)

    return go


def generate(config: ExperimentConfig, run: RunDir, data: TextData, models: dict, experts: list,
             priors: np.ndarray) -> dict:
    """``{"dense": [text], "ensemble": [text], "router": str, "seed": int, "temperature": float}``
    (the masked schedule's ensemble loads the run's learned router)."""
    c = config
    num = c.eval.num_samples
    if num == 0:
        return {"dense": [], "ensemble": [], "router": None}
    vocab, bos = data.vocab_size, data.bos_id
    key = jax.random.PRNGKey(c.eval.seed)
    out = {}
    if c.schedule == "ar":
        prompt = np.full((num, 1), bos, np.int32)
        routers = {"dense": FixedRouter(jnp.ones((num, 1), jnp.float32)),
                   "ensemble": BayesFilterRouter.from_priors(priors)}
        for label, names in (("dense", ["dense"]), ("ensemble", experts)):
            out[label] = mixture_generate([models[n] for n in names], prompt, c.eval.sample_length, routers[label],
                                          temperature=c.eval.temperature, key=key)
        router_name = "bayes filter (S9)"
    else:
        schedule = kappa_schedule(c)
        split = {name: nnx.split(models[name]) for name in ["dense", *experts]}
        router_gd, router_state = nnx.split(load_stage_model(run, "router", router_factory(c, vocab)))
        go = _masked_sampler((split["dense"][0],), None, num, schedule, vocab, c.eval.temperature)
        out["dense"] = np.asarray(go((split["dense"][1],), None, key))
        go = _masked_sampler(tuple(split[n][0] for n in experts), router_gd, num, schedule, vocab, c.eval.temperature)
        out["ensemble"] = np.asarray(go(tuple(split[n][1] for n in experts), router_state, key))
        router_name = "learned router (S10)"
    return {label: [data.tokenizer.decode(row.tolist(), skip_special_tokens=False) for row in tokens]
            for label, tokens in out.items()} | {"router": router_name, "seed": c.eval.seed,
                                                 "temperature": c.eval.temperature}
