"""The language models of the experiment: decoder construction, training losses, scoring.

AR schedule (THEORY S5): a causal `dfm.models.Decoder` over ``vocab`` tokens; the input of a
sequence ``x1 [batch, L]`` is ``shift_right(x1, bos)`` and the loss is `dfm.losses.ar_nll`.
Masked schedule (THEORY S4, S5(e)): a bidirectional decoder embedding ``vocab + 1`` states (mask
id = vocab) and predicting ``vocab`` classes, trained with `dfm.losses.dfm_loss` on the discretized
kappa schedule of the config. Losses are reported per token (nats / L).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.text.config import ExperimentConfig


def decoder_config(config: ExperimentConfig, vocab: int):
    """`dfm.models.DecoderConfig` of the experiment's language models."""
    from dfm.models import DecoderConfig

    m = config.model
    masked = config.schedule == "masked"
    return DecoderConfig(
        vocab_size=vocab + 1 if masked else vocab,
        output_size=vocab if masked else None,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads or None,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings,
        causal=not masked,
        **config.numerics.model_fields(),
    )


def new_model(config: ExperimentConfig, vocab: int, seed: int):
    """A freshly initialized `dfm.models.Decoder` (parameters from ``nnx.Rngs(seed)``)."""
    from dfm.models import Decoder

    return Decoder(decoder_config(config, vocab), rngs=nnx.Rngs(seed))


def router_config(config: ExperimentConfig, vocab: int):
    """`DecoderConfig` of the learned router's trunk: bidirectional, embeds vocab + 1 states."""
    from dfm.models import DecoderConfig

    r = config.router
    return DecoderConfig(vocab_size=vocab + 1, hidden_size=r.hidden_size, intermediate_size=2 * r.hidden_size,
                         num_layers=r.num_layers, num_heads=r.num_heads, causal=False,
                         tie_word_embeddings=True, **config.numerics.model_fields())


def new_router(config: ExperimentConfig, vocab: int, seed: int):
    """A fresh `dfm.decentral.LearnedRouter` over K experts, fed the step t / T (THEORY S10)."""
    from dfm.decentral import LearnedRouter

    return LearnedRouter(router_config(config, vocab), config.partition.num_clusters,
                         num_steps=config.masked.num_steps, rngs=nnx.Rngs(seed))


def router_factory(config: ExperimentConfig, vocab: int):
    """Zero-argument factory of a fresh learned router (seed ``config.seed + 1``), for loading one."""
    return functools.partial(new_router, config, vocab, config.seed + 1)


def kappa_schedule(config: ExperimentConfig):
    """The masked schedule: `dfm.schedules.discretize(scheduler, seq_len, num_steps)`."""
    from dfm import schedules

    mc = config.masked
    scheduler = {
        "polynomial": lambda: schedules.PolynomialScheduler(mc.exponent),
        "linear": schedules.LinearScheduler,
        "cosine": schedules.CosineScheduler,
    }[mc.scheduler]()
    return schedules.discretize(scheduler, config.data.seq_len, mc.num_steps)


@functools.lru_cache(maxsize=None)
def ar_loss_fn(bos_id: int):
    """``loss_fn(model, x1 [batch, L], key) -> (mean NLL per token, {"tokens"})`` (THEORY S5(d)).

    Cached per `bos_id` so that every stage reuses one jitted training step.
    """
    from dfm.autoregressive import shift_right
    from dfm.losses import ar_nll

    def loss_fn(model, x1, key):
        del key
        nll = ar_nll(model(shift_right(x1, bos_id)), x1)
        return jnp.mean(nll) / x1.shape[1], {"tokens": jnp.asarray(x1.size, jnp.float32)}

    return loss_fn


@functools.lru_cache(maxsize=None)
def _masked_loss_fn(kappa_bytes: bytes, shape: tuple[int, int], mask_id: int, t_sampling: str):
    from dfm.losses import dfm_loss
    from dfm.schedules import from_kappa

    schedule = from_kappa(np.frombuffer(kappa_bytes, dtype=np.float32).reshape(shape))

    def loss_fn(model, x1, key):
        loss = dfm_loss(key, model, x1, schedule, mask_id=mask_id, t_sampling=t_sampling)
        return jnp.mean(loss) / x1.shape[1], {"tokens": jnp.asarray(x1.size, jnp.float32)}

    return loss_fn


MASKED_T_SAMPLING = "rate_stratified"


def masked_loss_fn(schedule, mask_id: int, t_sampling: str = MASKED_T_SAMPLING):
    """``loss_fn(model, x1, key) -> (DFM loss per token, {"tokens"})`` (THEORY S5(d,e)).

    One random step t per sequence (`dfm.losses.dfm_loss`), an unbiased estimate of the ELBO sum
    over t. The default draws t with probability proportional to the step rate, stratified over
    the batch (``t_sampling="rate_stratified"``): every masked position then carries the same
    weight, and low-masking steps (the ones that teach the use of context) are drawn often. With
    uniform t (``"uniform"``) a masked position weighs ``T / (T - t)`` (up to T = 32 in the
    default config) and few positions per batch are scored at low masking: after 700 steps of the
    default model at batch 16 the denoiser was still at the unigram distribution (CE 5.90 / 5.92
    nats at 10% / 100% masking), against 5.74 / 5.92 with the default estimator.
    """
    kappa = np.asarray(schedule.kappa, dtype=np.float32)
    return _masked_loss_fn(kappa.tobytes(), kappa.shape, mask_id, t_sampling)


def training_loss_fn(config: ExperimentConfig, vocab: int, bos_id: int):
    """The loss of every language-model stage under the config's schedule."""
    if config.schedule == "ar":
        return ar_loss_fn(bos_id)
    return masked_loss_fn(kappa_schedule(config), vocab)


@nnx.jit
def _token_log_probs(model, inputs, targets):
    logits = model(inputs)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def ar_token_log_probs(model, x1: np.ndarray, bos_id: int, batch_size: int) -> np.ndarray:
    """``log p(x1[:, j] | x1[:, :j])`` of a causal model, ``[num, L]`` float64 (THEORY S5).

    Batches of `batch_size` sequences; the last batch is padded (by repetition) to keep one
    compiled shape.
    """
    from dfm.autoregressive import shift_right

    out = []
    for start in range(0, len(x1), batch_size):
        chunk = x1[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        x = jnp.asarray(chunk)
        out.append(np.asarray(_token_log_probs(model, shift_right(x, bos_id), x), np.float64)[:n])
    if not out:
        return np.zeros((0, x1.shape[1]), np.float64)
    return np.concatenate(out)
