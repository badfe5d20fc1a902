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
weights. The computation is the library's, shared with both jobs: teacher-forced log-probs
(`dfm.inference.token_log_probs`) mixed by `dfm.decentral.mixture_token_log_probs` (S8, S9) for
scoring; `dfm.decentral.mixture_generate` (prefill, then the AR schedule S5 over the experts'
mixture) for generation; prompt layouts from `dfm.prompts`.

Token conventions (the text job's): a text is its tokenizer ids without special tokens; the causal
experts read `[BOS] + ids`, so token 0 is predicted from BOS.

Image-text directories (the multimodal job's `<run>/decentralized`: LLaVA-style
`dfm.models.multimodal.MultimodalModel` experts) take `images=` uint8 `[n, H, W, 3]`, one image per
text / prompt (H = W = the towers' `image_size`):

    model.route(texts, images=images)                  # centroid routing of the images' features
    model.score(answers, images=images)                # nats per token of each text given its image
    model.generate(["What digit is shown?"], images=images[:1], max_new_tokens=8)

The conventions are the multimodal job's (experiments/mllm): pixels `(x / 255 - mean) / std`;
routing features = the patch mean (class token dropped) of the tower's hidden state
`vision_feature_layer` (what the partition was built on); prompts laid out by `dfm.prompts`.

Edges (every error names the argument and, for a list, the entry):
- Context: a text, or a prompt plus `max_new_tokens`, longer than the experts' context
  (`context_length`: `max_position_embeddings` of the first expert's ``config.json``) is refused
  with both lengths; there is no sliding window (the experts were never trained on positions
  beyond it, and a windowed score would not be the model's likelihood of the text).
- A call that fails (e.g. out of memory on a batch too large for the device) leaves the object as
  it was: the experts' parameters are inputs of pure jitted functions, never written back (an
  `nnx.jit` call replaces them with its outputs, so one failed asynchronous execution used to
  leave error-carrying parameters behind), and the object caches nothing per call.
- `max_new_tokens`: an int in `[1, context_length]` (bools refused); `temperature`: 0 (greedy) or
  a finite number >= `dfm.decentral.decoding.MIN_TEMPERATURE` (1e-4). Generation compiles in a time
  independent of `max_new_tokens` (a while loop with the length traced; `mixture_decode`).
- Texts must be valid Unicode: a lone surrogate (e.g. ``"\\ud800"``) is refused naming the entry.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dfm.prompts import decode_answer, image_text_tokens, image_token_id, pad_rows, question_prompt
from dfm.decentral.decoding import check_max_new_tokens, check_temperature, mixture_generate
from dfm.decentral.mixing import mixture_token_log_probs
from dfm.decentral.routers import FixedRouter
from dfm.inference import routing_features, token_log_probs
from dfm.models.vision import CLIP_MEAN, CLIP_STD, normalize_pixels

#: how the directory's images are featurized for routing (written by the multimodal job's export)
ROUTING_FILE = "routing_features.json"
#: texts scored per forward pass (padded to the call's longest text)
SCORE_BATCH = 8


class ImagesNotSupported(ValueError, NotImplementedError):
    """`images=` given to a directory of text-only experts (no vision tower)."""


def pixels(images_uint8: Any) -> np.ndarray:
    """`[n, H, W, 3]` uint8 -> float32 NHWC normalized with CLIP's mean / std (`dfm.models.vision.normalize_pixels`)."""
    return normalize_pixels(images_uint8)


def _texts(texts: Any, name: str) -> list[str]:
    """`texts` as a list of valid Unicode strings (ValueError naming `name` / the entry)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts \
            or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name}: expected a non-empty list of strings, got {texts!r:.80}")
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{name}[{i}]: not valid Unicode: lone surrogate {t[err.start]!r} at character "
                             f"{err.start} (decode bytes with errors='replace', or drop it)") from None
    return list(texts)


def _context_length(hf_config: dict) -> int | None:
    """`max_position_embeddings` of an HF config (top level, or its text / LLM sub-config), or None."""
    for sub in (hf_config, hf_config.get("text_config") or {}, hf_config.get("llm_config") or {}):
        value = sub.get("max_position_embeddings")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class DecentralizedModel:
    """K experts mixed by a router, on raw text, or on text with images for multimodal experts (module doc).

    Attributes:
      checkpoint: the `dfm.hf.experts.DecentralizedCheckpoint` loaded from the directory (experts,
        specs, partition, priors, router, featurizer, tokenizer path).
      tokenizer: the shared transformers tokenizer.
      router: the router used (`CentroidRouter` with the stored temperature and `top_k`,
        `BayesFilterRouter`, or None = uniform).
      available: `[K]` bool, the experts used (missing ones and those excluded at `load` are False).
      multimodal: whether the experts are image-text `MultimodalModel`s (then `images=` is required).
      multimodal_config: the experts' `MultimodalConfig` (None for text experts).
      pixel_stats: `(image_mean, image_std)` the image-text experts read their pixels with (`pixels`).
      routing: how images are featurized for routing (``routing_features.json`` of the directory;
        default ``{"featurizer": "tower"}``): the experts' own tower, or ``"clip"`` with the CLIP
        checkpoint copied in ``routing_clip/`` and its preprocessing.
      context_length: positions the experts take (`max_position_embeddings`; None: not recorded,
        no limit is checked).
    """

    def __init__(self, checkpoint, tokenizer, available: np.ndarray, top_k: int | None = None,
                 routing: dict | None = None, root: str | os.PathLike | None = None,
                 context_length: int | None = None):
        self.checkpoint = checkpoint
        self.routing = routing or {"featurizer": "tower"}
        self.root = None if root is None else Path(root)
        self._clip = None
        self.tokenizer = tokenizer
        self.available = np.asarray(available, bool)
        self.router = None if checkpoint.router is None else checkpoint.router.with_top_k(top_k)
        self.top_k = top_k
        self.context_length = context_length
        first = next(m for m in checkpoint.experts if m is not None)
        self.multimodal = hasattr(first, "language_model")
        # image-text experts: their `MultimodalConfig` (image size, image token id, image tokens, feature layer)
        self.multimodal_config = first.config if self.multimodal else None
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.multimodal:
            tid = self.multimodal_config.image_token_id
            try:
                ok = image_token_id(tokenizer) == tid
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"tokenizer: has no token with the experts' image_token_id {tid}")
        elif self.bos_id is None:
            raise ValueError("tokenizer: no bos_token (the causal experts read [BOS] + tokens)")
        self.pixel_stats = (CLIP_MEAN, CLIP_STD)

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
        from dfm.hf.configs import read_config
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
        record = Path(path) / ROUTING_FILE
        routing = None
        if record.is_file():
            try:
                routing = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{record}: unreadable ({err})") from None
            if routing.get("featurizer") not in ("tower", "clip"):
                raise CheckpointError(f"{record}: unknown featurizer {routing.get('featurizer')!r} "
                                      f"(expected 'tower' or 'clip')")
        manifest = json.loads((Path(path) / "decentral.json").read_text(encoding="utf-8"))
        expert_dir = Path(path) / str(manifest["experts"][int(np.flatnonzero(mask)[0])])
        context = _context_length(read_config(expert_dir)[0])
        model = cls(checkpoint, load_tokenizer(tok_dir), mask, top_k, routing=routing, root=path,
                    context_length=context)
        if model.multimodal:
            from dfm.hf.clip_features import image_stats

            model.pixel_stats = image_stats(tok_dir)
        return model

    @property
    def num_experts(self) -> int:
        """K (experts not available included)."""
        return self.checkpoint.num_experts

    # ------------------------------------------------------------------------------------------
    def _check_images(self, images, n: int | None) -> np.ndarray | None:
        """`images` as uint8 `[n, S, S, C]` (None for text experts); errors name `images`."""
        if images is None:
            if self.multimodal:
                raise ValueError("images: this directory's experts are image-text models; pass images=uint8 "
                                 "[n, H, W, 3], one image per text")
            return None
        if not self.multimodal:
            raise ImagesNotSupported("images: image-text input needs a multimodal export (the multimodal job's "
                                     "<run>/decentralized); this directory's experts are text-only")
        v = self.multimodal_config.vision
        arr = np.asarray(images)
        want = (v.image_size, v.image_size, v.num_channels)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != want or len(arr) == 0:
            raise ValueError(f"images: expected uint8 [n, {want[0]}, {want[1]}, {want[2]}] with n >= 1, got "
                             f"{arr.dtype} {arr.shape}")
        if n is not None and len(arr) != n:
            raise ValueError(f"images: one image per text: got {len(arr)} images for {n} texts")
        return arr

    def _check_length(self, what: str, index: int, positions: int, size: str, fix: str) -> None:
        """ValueError naming `what[index]`, its `size` and the context when `positions` exceed `context_length`."""
        if self.context_length is not None and positions > self.context_length:
            raise ValueError(f"{what}[{index}]: {size}, more than the experts' context of {self.context_length} "
                             f"positions (max_position_embeddings); {fix}")

    def image_features(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """Routing features `[n, vision_hidden]` float64 of uint8 images `[n, S, S, 3]` (multimodal only).

        The features the multimodal job partitions and routes by (`dfm.inference.routing_features`
        of `pixels(images)`): the mean over patches (class token dropped) of the vision tower's
        hidden state `vision_feature_layer` — the layer the projector reads. The job computes them
        with the stage-1 tower; stage 2 keeps every expert's tower frozen at it (`stage2.train`
        must be "projector+llm" or "projector", experiments/mllm/config.py), so any expert's tower
        reproduces them: the first available expert's tower is used.
        """
        images = self._check_images(images, None)
        if self.routing.get("featurizer") == "clip":
            return self._clip_features(images, batch_size)
        tower_model = self.checkpoint.experts[int(np.flatnonzero(self.available)[0])]
        return routing_features(tower_model, lambda rows: self.pixels(images[rows]), len(images), batch_size)

    def pixels(self, images_uint8: Any) -> np.ndarray:
        """uint8 `[n, S, S, 3]` -> the experts' float32 NHWC input: `(x / 255 - mean) / std` with the
        statistics of the exported image processor (``preprocessor_config.json`` beside the
        tokenizer, as written for an ``init_from`` checkpoint; `dfm.hf.clip_features.image_stats`),
        CLIP's when there is none (the multimodal job's own models)."""
        return normalize_pixels(images_uint8, *self.pixel_stats)

    def _clip_features(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """CLIP routing features (the partition's, ``routing_features.json`` "clip"): the copied
        checkpoint's `dfm.hf.clip_features.routing_image_embeddings` with the recorded preprocessing."""
        from dfm.hf.clip_features import load_clip_image_encoder, routing_image_embeddings

        pre = self.routing.get("preprocess") or {}
        if self._clip is None:
            where = (self.root or Path(".")) / self.routing.get("checkpoint", "routing_clip")
            self._clip = load_clip_image_encoder(where)
        return routing_image_embeddings(self._clip, images, pre.get("image_mean", CLIP_MEAN),
                                        pre.get("image_std", CLIP_STD), batch_size=batch_size)

    def route(self, texts: Sequence[str] | None, *, images: Any = None) -> np.ndarray:
        """Router weights `[n, K]` float64 of `texts` (rows sum to 1; 0 on unavailable experts).

        Centroid router (THEORY S12, S13): `softmax(cosine(features, centroids) / T)` over the
        available experts, then top-k, from the featurizer's features of each whole text; a text
        with no known term (zero features) gets uniform weights over the available experts, as in
        the text job's evaluation. Bayes filter (S9): its prior (the weights before any token;
        `score` and `generate` update it with each token). Uniform: `1 / #available`.

        Image-text experts (`images` uint8 `[n, H, W, 3]`, one per text; `texts` may be None): the
        centroid router reads `image_features(images)` (the features the partition was built on)
        instead of the texts, which do not enter the weights; the Bayes filter's prior and uniform
        weights are as for text.

        Raises ValueError for texts that are not a non-empty list of valid strings, missing /
        malformed images for image-text experts (or a count that differs from the texts'); images
        for text-only experts raise `ImagesNotSupported` (a ValueError and NotImplementedError).
        """
        if self.multimodal and texts is None and images is not None:
            images = self._check_images(images, None)
            n = len(images)
        else:
            texts = _texts(texts, "texts")
            n = len(texts)
            images = self._check_images(images, n)
        mask = self.available
        uniform = np.broadcast_to(mask / mask.sum(), (n, self.num_experts)).astype(np.float64)
        if self.router is not None and self.router.needs_context:
            if images is not None:
                features = self.image_features(images)
            else:
                featurizer = self.checkpoint.featurizer
                if featurizer is None:
                    raise ValueError("route: the centroid router needs the directory's featurizer (none saved)")
                features = featurizer.transform(texts)
            has = np.linalg.norm(features, axis=1) > 1e-9
            w = uniform.copy()
            if has.any():      # the router over the available experts (top-k among them), scattered back
                used = np.flatnonzero(mask)
                router = self.router if mask.all() else self.router.subset(used)
                w[np.ix_(has, used)] = np.asarray(router.weights(router.init(int(has.sum()), features[has])),
                                                  np.float64)
        elif self.router is not None and self.router.uses_evidence:
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

    def _mixture_router(self, weights: np.ndarray):
        """The router of the mixture: the Bayes filter itself (it reads the tokens), else the fixed
        weights `[n, K]` of `route`."""
        if self.router is not None and self.router.uses_evidence:
            return self.router
        return FixedRouter(jnp.asarray(weights, jnp.float32))

    def _text_rows(self, texts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per text `(tokens [S], is_target [S])` as the experts read it (`token_log_probs`)."""
        if self.multimodal:
            nit = self.multimodal_config.num_image_tokens
            rows = [image_text_tokens(self.tokenizer, t, nit, "texts", i) for i, t in enumerate(texts)]
        else:
            rows = []
            for i, ids in enumerate(self._encode(texts)):
                if len(ids) == 0:
                    raise ValueError(f"texts[{i}]: has no tokens")
                rows.append((np.concatenate([[self.bos_id], ids]).astype(np.int32),
                             np.arange(len(ids) + 1) > 0))
        for i, (seq, _) in enumerate(rows):       # the experts read all but the last token
            size = f"{len(seq) - 1} tokens" if not self.multimodal else f"{len(seq) - 1} positions with its image"
            self._check_length("texts", i, len(seq) - 1, size, "shorten or split it (no sliding window)")
        return [r for r, _ in rows], [m for _, m in rows]

    def token_log_probs(self, texts: Sequence[str], *, images=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Teacher-forced scores of `texts` under the routed mixture (THEORY S8, S9).

        Returns `(mixture [n, L], experts [K, n, L], valid [n, L])`: the mixture's and each
        available expert's log-prob (nats) of every token (`valid` False on padding; rows of
        unavailable experts are 0), L the most tokens of a text. Each expert's are
        `dfm.inference.token_log_probs` of `[BOS] + ids`; the mixture is
        `dfm.decentral.mixture_token_log_probs` with the router: `FixedRouter(route(texts))` for
        the centroid / uniform routers, the Bayes filter from the priors (updated token by token).

        Image-text experts (`images` uint8 `[n, H, W, 3]`, one per text): each text is scored
        conditioned on its image, laid out by `dfm.prompts.image_text_tokens` (`[BOS] + ids` with
        the text's `<image>` placeholder, at most one, expanded to the image tokens, or the image
        tokens first); the scored tokens are the text's own. E.g. the multimodal job's answer
        format: `texts=["USER: <image>\\nWhat digit is shown? ASSISTANT: 7"]` (its question tokens are
        scored too). Weights: `route(texts, images=images)` (centroid: the images' features).

        Raises ValueError naming the entry for an empty text (no token), a text with several
        `<image>` placeholders, a text longer than `context_length` (both lengths given), invalid
        Unicode, or bad images (`route`); `ImagesNotSupported` for images with text experts.
        """
        texts = _texts(texts, "texts")
        images = self._check_images(images, len(texts))
        rows, targets = self._text_rows(texts)
        n, seq_len = len(rows), max(len(r) for r in rows)
        seqs = pad_rows(rows, seq_len, self.eos_id if self.eos_id is not None else 0)
        # the targets (token j + 1 of a row) packed to the left: [n, L]
        length = max(int(m.sum()) for m in targets)
        index, valid = np.zeros((n, length), np.int64), np.zeros((n, length), bool)
        for i, m in enumerate(targets):
            pos = np.flatnonzero(m) - 1
            index[i, :len(pos)], valid[i, :len(pos)] = pos, True
        px = None if images is None else self.pixels(images)
        lp = np.zeros((self.num_experts, n, length))
        for k, model in enumerate(self.checkpoint.experts):
            if self.available[k]:
                full = token_log_probs(model, seqs, pixels=px, batch_size=min(n, SCORE_BATCH))   # [n, S-1]
                lp[k] = np.where(valid, np.take_along_axis(full, index, axis=1), 0.0)
        scores = mixture_token_log_probs(self._mixture_router(self.route(texts, images=images)),
                                         jnp.asarray(lp, jnp.float32), valid=valid, available=self.available)
        return np.asarray(scores.log_probs, np.float64), lp, valid

    def score(self, texts: Sequence[str], *, images=None) -> np.ndarray:
        """Nats per token `[n]` of each text under the routed mixture: `-mean_j log q(x^j | x^{<j})`
        over its tokens (`token_log_probs`; THEORY S8, S9). exp(score) is the text's perplexity.

        Image-text experts: `images` uint8 `[n, H, W, 3]`, one per text; each text is scored given
        its image (`token_log_probs`), over the text's tokens only.

        Raises ValueError for bad / empty / over-long texts or bad images (`token_log_probs`).
        """
        mix, _, valid = self.token_log_probs(texts, images=images)
        return -np.where(valid, mix, 0.0).sum(axis=1) / valid.sum(axis=1)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 seed: int = 0, *, images=None) -> list[str]:
        """Continue each prompt with the mixture of the experts; returns the decoded continuations.

        Each prompt is continued by `dfm.decentral.mixture_generate`: every expert the router can
        weigh prefills it into a KV cache (one cache length per call: the longest prompt +
        `max_new_tokens`), then the AR schedule (THEORY S5) draws `max_new_tokens` tokens from the
        experts' mixture (S8). Router: the prompt's fixed `route` weights (centroid / uniform;
        experts with weight 0 are not run), or the Bayes filter (S9) from the priors, updated with
        every token. Text: `[BOS] + ids`, and the Bayes filter starts at the posterior given the
        prompt (`prior_k * p_k(prompt)`, normalized). Greedy when `temperature == 0`, else sampling
        at that temperature with `jax.random.PRNGKey(seed)`. The continuation stops at the first
        EOS (not included); special tokens are skipped.

        Image-text experts (`images` uint8 `[n, H, W, 3]`, one per prompt): each prompt is a
        question about its image, laid out as the multimodal job's (`dfm.prompts.question_prompt`:
        `<image>\\n` in front unless the prompt holds one placeholder, then the tokenizer's chat
        template, or LLaVA v1's `[BOS] USER: <image>\\n{prompt} ASSISTANT:`, the image token
        expanded as the checkpoint's processor does). Every used expert prefills it with the image;
        the Bayes filter starts at the priors (the prompt is no evidence: the experts were never
        trained on question tokens, as in the job's evaluation). The answer is stripped of
        surrounding whitespace (the job's `dfm.prompts.decode_answer`).

        Raises ValueError naming the argument for bad prompts (naming the entry: invalid Unicode,
        several placeholders, a prompt + `max_new_tokens` longer than `context_length`), a
        `max_new_tokens` that is not an int in `[1, context_length]` (bools refused), a
        `temperature` that is not 0 or a finite number >= 1e-4, or bad images (`route`);
        `ImagesNotSupported` for images with text experts.
        """
        texts = _texts(prompts, "prompts")
        max_new_tokens = check_max_new_tokens(max_new_tokens, self.context_length,
                                              limit_what="the experts' context (max_position_embeddings)")
        temperature = check_temperature(temperature)
        images = self._check_images(images, len(texts))
        if images is None:
            rows = [np.concatenate([[self.bos_id], ids]).astype(np.int32) for ids in self._encode(texts)]
        else:
            nit = self.multimodal_config.num_image_tokens
            rows = [question_prompt(self.tokenizer, p, nit, "prompts", i) for i, p in enumerate(texts)]
        for i, row in enumerate(rows):
            self._check_length("prompts", i, len(row) + max_new_tokens,
                               f"{len(row)} prompt tokens + max_new_tokens={max_new_tokens}",
                               "shorten the prompt or lower max_new_tokens")
        weights = self.route(texts, images=images)
        # one KV-cache length for the call: the decoder compiles once (the prompt length is traced)
        cache_length = max(len(r) for r in rows) + max_new_tokens
        out = []
        for i, row in enumerate(rows):
            router = self._mixture_router(weights[i:i + 1])
            px = None if images is None else self.pixels(images[i:i + 1])
            new = mixture_generate(self.checkpoint.experts, row[None], max_new_tokens, router, pixels=px,
                                   cache_length=cache_length, condition_on_prompt=images is None,
                                   temperature=temperature, key=jax.random.PRNGKey(seed),
                                   available=self.available)[0]
            if images is not None:
                out.append(decode_answer(self.tokenizer, new))
                continue
            if self.eos_id is not None and (new == self.eos_id).any():
                new = new[:int(np.argmax(new == self.eos_id))]
            out.append(self.tokenizer.decode(new.tolist(), skip_special_tokens=True))
        return out
