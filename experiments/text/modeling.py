"""The language models of the experiment: decoder construction, training losses, scoring.

AR schedule (THEORY S5): a causal `dfm.models.Decoder` over ``vocab`` tokens; the input of a
sequence ``x1 [batch, L]`` is ``shift_right(x1, bos)`` and the loss is `dfm.losses.ar_nll`.
Masked schedule (THEORY S4, S5(e)): a bidirectional decoder embedding ``vocab + 1`` states (mask
id = vocab) and predicting ``vocab`` classes, trained with `dfm.losses.dfm_loss` on the discretized
kappa schedule of the config. Losses are reported per token (nats / L).

With ``model.init_from`` (a local HF Llama / Qwen2 directory) the AR decoder is the checkpoint's:
`decoder_config` reads its architecture and `new_model` its weights (`dfm.hf.load_pretrained`).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm import schedules
from dfm.autoregressive import shift_right
from dfm.decentral import LearnedRouter
from dfm.hf import CheckpointError, load_pretrained, read_config
from dfm.hf.configs import decoder_config_from_hf
from dfm.losses import ar_nll, dfm_loss
from dfm.models import Decoder, DecoderConfig
from dfm.train.tiled_loss import causal_lm_loss
from experiments.engine.task import DataError
from experiments.text.config import ExperimentConfig


def init_from_path(config: ExperimentConfig) -> Path | None:
    """``model.init_from`` as an absolute path (relative to the working directory), or None."""
    return Path(config.model.init_from).expanduser().absolute() if config.model.init_from else None


def pretrained_decoder_config(config: ExperimentConfig):
    """`DecoderConfig` of the checkpoint at ``model.init_from`` (`dfm.hf.configs.decoder_config_from_hf`,
    HF LlamaConfig / Qwen2Config fields) with the config's ``[numerics]`` knobs (dtype, param_dtype,
    attention, matmul_precision, remat, scan_layers).

    Raises:
      DataError: ``model.init_from`` is not a directory, its ``config.json`` is missing or invalid,
        not a Llama / Qwen2 model or uses an unsupported feature, or is not a causal LM with one
        logit per token (an exported masked denoiser); the message names the path.
    """
    path, n = init_from_path(config), config.numerics
    if not path.is_dir():
        raise DataError(f"model.init_from: {path} is not a directory (expected a local HF checkpoint directory)")
    try:
        hf, file = read_config(path)
        dc = decoder_config_from_hf(hf, file, dtype=n.dtype, param_dtype=n.param_dtype, attention=n.attention,
                                    matmul_precision=n.matmul_precision)
    except (CheckpointError, ValueError) as exc:
        raise DataError(f"model.init_from: {exc}") from None
    if not dc.causal or dc.num_outputs != dc.vocab_size:
        raise DataError(f"model.init_from: {path} is not a causal LM with one logit per token (causal="
                        f"{dc.causal}, output_size={dc.num_outputs}, vocab_size={dc.vocab_size})")
    return dataclasses.replace(dc, remat=n.remat, scan_layers=n.scan_layers)


def decoder_config(config: ExperimentConfig, vocab: int):
    """`dfm.models.DecoderConfig` of the experiment's language models.

    With ``model.init_from`` it is the checkpoint's (`pretrained_decoder_config`): `vocab` and
    every ``[model]`` size are ignored (the data stage sets ``vocab_size`` to the checkpoint's).
    """
    if config.model.init_from:
        return pretrained_decoder_config(config)
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


def _tracing() -> bool:
    """True inside a JAX trace (e.g. `nnx.eval_shape`), where only the model's structure is used."""
    return isinstance(jnp.zeros(()), jax.core.Tracer)


def new_model(config: ExperimentConfig, vocab: int, seed: int):
    """The model stage 1 starts from, and the template the engine loads every saved stage into
    (`dfm.models.Decoder`).

    Without ``model.init_from``: freshly initialized from ``nnx.Rngs(seed)`` with the ``[model]``
    sizes and `vocab` tokens. With it: the checkpoint's weights, `dfm.hf.load_pretrained(init_from)`
    with the ``[numerics]`` dtypes and knobs (its logits are transformers' for the same tokens);
    `vocab`, `seed` and the ``[model]`` sizes are then ignored. When traced abstractly
    (`nnx.eval_shape`: the engine's template for loading a saved stage, the parameter count) the
    weights are not read; the structure is the same.

    Raises:
      DataError: a checkpoint that cannot be used (`pretrained_decoder_config`), or whose weights
        are missing, truncated or of the wrong shape (naming the file and tensor).
    """
    if not config.model.init_from:
        return Decoder(decoder_config(config, vocab), rngs=nnx.Rngs(seed))
    dc = pretrained_decoder_config(config)
    if _tracing():
        return Decoder(dc, rngs=nnx.Rngs(seed))
    n = config.numerics
    try:
        model = load_pretrained(init_from_path(config), dtype=n.dtype, param_dtype=n.param_dtype,
                                matmul_precision=n.matmul_precision, attention=n.attention, scan_layers=n.scan_layers)
    except (CheckpointError, ValueError) as exc:
        raise DataError(f"model.init_from: {exc}") from None
    if model.config.remat != n.remat:      # a runtime knob that load_pretrained does not take
        model.config = dataclasses.replace(model.config, remat=n.remat)
    return model


def router_config(config: ExperimentConfig, vocab: int):
    """`DecoderConfig` of the learned router's trunk: bidirectional, embeds vocab + 1 states."""
    r = config.router
    return DecoderConfig(vocab_size=vocab + 1, hidden_size=r.hidden_size, intermediate_size=2 * r.hidden_size,
                         num_layers=r.num_layers, num_heads=r.num_heads, causal=False,
                         tie_word_embeddings=True, **config.numerics.model_fields())


def new_router(config: ExperimentConfig, vocab: int, seed: int):
    """A fresh `dfm.decentral.LearnedRouter` over K experts, fed the step t / T (THEORY S10)."""
    return LearnedRouter(router_config(config, vocab), config.partition.num_clusters,
                         num_steps=config.masked.num_steps, rngs=nnx.Rngs(seed))


def router_factory(config: ExperimentConfig, vocab: int):
    """Zero-argument factory of a fresh learned router (seed ``config.seed + 1``), for loading one."""
    return functools.partial(new_router, config, vocab, config.seed + 1)


def kappa_schedule(config: ExperimentConfig):
    """The masked schedule: `dfm.schedules.discretize(scheduler, seq_len, num_steps)`."""
    mc = config.masked
    scheduler = {
        "polynomial": lambda: schedules.PolynomialScheduler(mc.exponent),
        "linear": schedules.LinearScheduler,
        "cosine": schedules.CosineScheduler,
    }[mc.scheduler]()
    return schedules.discretize(scheduler, config.data.seq_len, mc.num_steps)


@functools.lru_cache(maxsize=None)
def ar_loss_fn(bos_id: int, loss_chunk: int = 0):
    """``loss_fn(model, x1 [batch, L], key) -> (mean NLL per token, {"tokens"})`` (THEORY S5(d)).

    `loss_chunk` > 0: the vocabulary-tiled cross-entropy (`dfm.train.tiled_loss.causal_lm_loss`,
    ``[numerics] loss_chunk``); 0: the full logits. Cached per arguments so that every stage reuses
    one jitted training step.
    """
    def loss_fn(model, x1, key):
        del key
        tokens = jnp.asarray(x1.size, jnp.float32)
        if loss_chunk:
            loss, _ = causal_lm_loss(model, shift_right(x1, bos_id), x1, chunk=loss_chunk)
            return loss, {"tokens": tokens}
        nll = ar_nll(model(shift_right(x1, bos_id)), x1)
        return jnp.mean(nll) / x1.shape[1], {"tokens": tokens}

    return loss_fn


@functools.lru_cache(maxsize=None)
def _masked_loss_fn(kappa_bytes: bytes, shape: tuple[int, int], mask_id: int, t_sampling: str):
    schedule = schedules.from_kappa(np.frombuffer(kappa_bytes, dtype=np.float32).reshape(shape))

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
        return ar_loss_fn(bos_id, config.numerics.loss_chunk)
    return masked_loss_fn(kappa_schedule(config), vocab)
