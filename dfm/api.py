"""`DecentralizedModel`: a saved decentralized model (K experts + partition + router + tokenizer)
as one object with `route`, `score` and `generate` on raw text.

    from dfm import DecentralizedModel
    model = DecentralizedModel.load("runs/default/export/decentralized")
    model.route(texts)      # [n, K] router weights
    model.score(texts)      # [n] nats per token under the routed mixture
    model.generate(["import os\\n"], max_new_tokens=32)   # decoded continuations

The directory is the `dfm.hf.save_decentralized` format (docs/checkpoints.md); the router is the
one it records: the centroid router (THEORY S12, S13) over the featurizer's features of the text
(`dfm.decentral.TextFeaturizer`), the Bayes filter (S9) from the stored priors, or uniform
weights. The mixture math is the library's: `mixture_token_log_probs` (S8, S9) for scoring,
`ensemble_posterior_fn` + `dfm.samplers.sample_discrete` under the AR schedule (S5) for generation.

Token conventions (the text job's): a text is its tokenizer ids without special tokens; the causal
experts read `[BOS] + ids` (`dfm.autoregressive.shift_right`), so token 0 is predicted from BOS.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm.decentral.decoding import mixture_decode
from dfm.decentral.routers import BayesFilterRouter, CentroidRouter, FixedRouter

_IMAGES_TODO = ("image-text decentralized models: score / generate with images are not implemented in "
                "DecentralizedModel yet (use experiments.mllm.modeling.mixture_generate / sequence_log_probs)")


def _texts(texts: Any, name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts \
            or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name}: expected a non-empty list of strings, got {texts!r:.80}")
    return list(texts)


class DecentralizedModel:
    """K experts mixed by a router, on raw text (module doc).

    Attributes:
      checkpoint: the `dfm.hf.experts.DecentralizedCheckpoint` loaded from the directory (experts,
        specs, partition, priors, router, featurizer, tokenizer path).
      tokenizer: the shared transformers tokenizer.
      router: the router used (`CentroidRouter` with the stored temperature and `top_k`,
        `BayesFilterRouter`, or None = uniform).
      available: `[K]` bool, the experts used (missing ones and those excluded at `load` are False).
    """

    def __init__(self, checkpoint, tokenizer, available: np.ndarray, top_k: int | None = None):
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer
        self.available = np.asarray(available, bool)
        router = checkpoint.router
        if isinstance(router, CentroidRouter) and top_k is not None:
            router = CentroidRouter(router.partition, temperature=router.temperature, top_k=top_k,
                                    threshold=router.threshold)
        self.router = router
        self.top_k = top_k
        self.multimodal = hasattr(next(m for m in checkpoint.experts if m is not None), "language_model")
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.bos_id is None:
            raise ValueError("tokenizer: no bos_token (the causal experts read [BOS] + tokens)")

    @classmethod
    def load(cls, path: str | os.PathLike, *, top_k: int | None = None, available: Any = None,
             missing_ok: bool = False, dtype: str | None = None,
             matmul_precision: str = "highest") -> "DecentralizedModel":
        """Load a `save_decentralized` directory.

        Args:
          path: the directory (`decentral.json`, experts, partition, featurizer, tokenizer).
          top_k: override the centroid router's top-k (THEORY S13; None: as stored). Also applied
            to the fixed weights of a uniform router; ignored by the Bayes filter.
          available: use only these experts: a `[K]` bool mask or a sequence of expert indices
            (None: all that loaded). The weights are renormalized over them.
          missing_ok: skip expert directories without weights (`load_decentralized`).
          dtype, matmul_precision: the experts' (`dfm.hf.load_pretrained`).

        Raises:
          CheckpointError: the directory is invalid (`load_decentralized`), or has no tokenizer
            (neither `tokenizer/` nor tokenizer files in the first expert's directory).
          ValueError: bad `available`, or none of the `available` experts loaded.
        """
        from dfm.decentral.mixing import available_mask
        from dfm.hf.experts import load_decentralized
        from dfm.hf.safetensors_io import CheckpointError
        from dfm.hf.tokenizers import load_tokenizer

        checkpoint = load_decentralized(path, dtype=dtype, missing_ok=missing_ok,
                                        matmul_precision=matmul_precision)
        k = checkpoint.num_experts
        mask = checkpoint.available.copy()
        chosen = available_mask(available, k)
        if chosen is not None:
            mask &= chosen
        if not mask.any():
            raise ValueError(f"available: none of the chosen experts {available!r} is loaded (K={k}, "
                             f"missing {checkpoint.missing})")
        tok_dir = checkpoint.tokenizer_path
        if tok_dir is None:
            first = Path(path) / "experts" / "expert_00"
            if not (first / "tokenizer.json").is_file() and not (first / "tokenizer_config.json").is_file():
                raise CheckpointError(f"{Path(path) / 'decentral.json'}: no tokenizer (neither 'tokenizer' nor "
                                      f"tokenizer files in {first})")
            tok_dir = first
        return cls(checkpoint, load_tokenizer(tok_dir), mask, top_k)

    @property
    def num_experts(self) -> int:
        """K (experts not available included)."""
        return self.checkpoint.num_experts

    # ------------------------------------------------------------------------------------------
    def _check_images(self, images) -> None:
        if images is not None or self.multimodal:
            raise NotImplementedError(_IMAGES_TODO)

    def route(self, texts: Sequence[str]) -> np.ndarray:
        """Router weights `[n, K]` float64 of `texts` (rows sum to 1; 0 on unavailable experts).

        Centroid router (THEORY S12, S13): `softmax(cosine(features, centroids) / T)` over the
        available experts, then top-k, from the featurizer's features of each whole text; a text
        with no known term (zero features) gets uniform weights over the available experts, as in
        the text job's evaluation. Bayes filter (S9): its prior (the weights before any token;
        `score` and `generate` update it with each token). Uniform: `1 / #available`.

        Raises ValueError for texts that are not a non-empty list of strings.
        """
        texts = _texts(texts, "texts")
        n, mask = len(texts), self.available
        uniform = np.broadcast_to(mask / mask.sum(), (n, self.num_experts)).astype(np.float64)
        if isinstance(self.router, CentroidRouter):
            featurizer = self.checkpoint.featurizer
            if featurizer is None:
                raise ValueError("route: the centroid router needs the directory's featurizer (none saved)")
            features = featurizer.transform(texts)
            has = np.linalg.norm(features, axis=1) > 1e-9
            w = uniform.copy()
            if has.any():
                cos = np.where(mask, np.asarray(self.router.similarities(features[has]), np.float64), -np.inf)
                from dfm.decentral.routers import centroid_weights

                w[has] = np.asarray(centroid_weights(jnp.asarray(cos, jnp.float32), self.router.temperature,
                                                     self.router.top_k, self.router.threshold), np.float64)
        elif isinstance(self.router, BayesFilterRouter):
            w = np.broadcast_to(np.where(mask, self.checkpoint.priors, 0.0), (n, self.num_experts)).astype(np.float64)
        else:
            w = uniform.copy()
            if self.top_k is not None and self.top_k < mask.sum():
                keep = np.flatnonzero(mask)[:self.top_k]
                w = np.zeros_like(w)
                w[:, keep] = 1.0
        return w / w.sum(axis=1, keepdims=True)

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(x, np.int32) for x in ids]

    def _scoring_router(self, weights: np.ndarray):
        if isinstance(self.router, BayesFilterRouter):
            return BayesFilterRouter.from_priors(np.where(self.available, self.checkpoint.priors, 0.0))
        return FixedRouter(jnp.asarray(weights, jnp.float32))

    def token_log_probs(self, texts: Sequence[str], *, images=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Teacher-forced scores of `texts` under the routed mixture (THEORY S8, S9).

        Returns `(mixture [n, L], experts [K, n, L], valid [n, L])`: the mixture's and each
        available expert's log-prob (nats) of every token (`valid` False on padding; rows of
        unavailable experts are 0), L the longest text in tokens. The mixture is
        `dfm.decentral.mixture_token_log_probs` with the router: `FixedRouter(route(texts))` for
        the centroid / uniform routers, the Bayes filter from the priors (updated token by token).

        Raises ValueError for an empty text (no token); NotImplementedError for images.
        """
        from dfm.decentral.mixing import mixture_token_log_probs

        self._check_images(images)
        texts = _texts(texts, "texts")
        ids = self._encode(texts)
        empty = [i for i, x in enumerate(ids) if len(x) == 0]
        if empty:
            raise ValueError(f"texts: entries {empty[:5]} have no tokens")
        length = max(len(x) for x in ids)
        x1 = np.full((len(ids), length), self.eos_id if self.eos_id is not None else 0, np.int32)
        valid = np.zeros((len(ids), length), bool)
        for i, x in enumerate(ids):
            x1[i, :len(x)], valid[i, :len(x)] = x, True
        lp = np.zeros((self.num_experts, len(ids), length), np.float32)
        for k, model in enumerate(self.checkpoint.experts):
            if self.available[k]:
                lp[k] = np.asarray(_teacher_forced(model, jnp.asarray(x1), self.bos_id))
        scores = mixture_token_log_probs(self._scoring_router(self.route(texts)), jnp.asarray(lp), valid=valid,
                                         available=self.available)
        return np.asarray(scores.log_probs, np.float64), lp.astype(np.float64), valid

    def score(self, texts: Sequence[str], *, images=None) -> np.ndarray:
        """Nats per token `[n]` of each text under the routed mixture: `-mean_j log q(x^j | x^{<j})`
        over its tokens (`token_log_probs`; THEORY S8, S9). exp(score) is the text's perplexity.

        Raises ValueError for bad / empty texts; NotImplementedError for images (not yet).
        """
        mix, _, valid = self.token_log_probs(texts, images=images)
        return -np.where(valid, mix, 0.0).sum(axis=1) / valid.sum(axis=1)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 seed: int = 0, *, images=None) -> list[str]:
        """Continue each prompt with the mixture of the experts; returns the decoded continuations.

        Each prompt (`[BOS] + ids`) is prefilled into every used expert's KV cache; the new tokens
        come from `dfm.samplers.sample_discrete` under `dfm.schedules.autoregressive(max_new_tokens)`
        over `ensemble_posterior_fn` of the experts' `prompted_posterior_fn`s (THEORY S5, S8).
        Router: the prompt's fixed `route` weights (centroid / uniform; experts with weight 0 are
        not run), or the Bayes filter (S9) started at the posterior given the prompt
        (`prior_k * p_k(prompt)`, normalized) and updated with every generated token. Greedy when
        `temperature == 0`, else sampling at that temperature with `jax.random.PRNGKey(seed)`.
        The continuation stops at the first EOS (not included); special tokens are skipped.

        Raises ValueError for bad prompts, `max_new_tokens < 1` or `temperature < 0`;
        NotImplementedError for images (not yet).
        """
        self._check_images(images)
        prompts = _texts(prompts, "prompts")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be an int >= 1, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature!r}")
        weights = self.route(prompts)
        out = []
        for i, ids in enumerate(self._encode(prompts)):
            tokens = np.concatenate([[self.bos_id], ids]).astype(np.int32)[None]
            if isinstance(self.router, BayesFilterRouter):
                used = np.flatnonzero(self.available)
            else:
                used = np.flatnonzero(weights[i] > 0)
            cache_length = tokens.shape[1] + max_new_tokens
            models = [self.checkpoint.experts[k] for k in used]
            starts, prompt_ll = [], []
            for m in models:
                cache, logp = _prefill(m, jnp.asarray(tokens), cache_length)
                starts.append((cache, logp[:, -1]))
                prompt_ll.append(float(jnp.take_along_axis(logp[0, :-1], jnp.asarray(tokens[0, 1:])[:, None],
                                                           axis=-1).sum()))
            if isinstance(self.router, BayesFilterRouter):
                log_post = np.log(np.maximum(self.checkpoint.priors[used], 1e-300)) + np.asarray(prompt_ll)
                post = np.exp(log_post - log_post.max())
                router = BayesFilterRouter.from_priors(post / post.sum())
            else:
                w = weights[i, used]
                router = FixedRouter(jnp.asarray((w / w.sum())[None], jnp.float32))
            new = np.asarray(mixture_decode(models, starts, tokens.shape[1], max_new_tokens, router,
                                            temperature=float(temperature), key=jax.random.PRNGKey(seed)))[0]
            if self.eos_id is not None and (new == self.eos_id).any():
                new = new[:int(np.argmax(new == self.eos_id))]
            out.append(self.tokenizer.decode(new.tolist(), skip_special_tokens=True))
        return out


def _teacher_forced(model, x1, bos_id: int):
    """`log p(x1[:, j] | [BOS] + x1[:, :j])` `[n, L]` float32 of a causal `Decoder`."""
    return _teacher_forced_jit(model, x1, bos_id)


@functools.partial(nnx.jit, static_argnums=(2,))
def _teacher_forced_jit(model, x1, bos_id):
    from dfm.autoregressive import shift_right

    logp = jax.nn.log_softmax(model(shift_right(x1, bos_id)).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, x1[..., None], axis=-1)[..., 0]


@functools.partial(nnx.jit, static_argnums=(2,))
def _prefill(model, tokens, cache_length):
    cache = model.init_cache(tokens.shape[0], cache_length)
    logits, cache = model.prefill(tokens, cache)
    return cache, jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
