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

Image-text directories (the multimodal job's `<run>/decentralized`: LLaVA-style
`dfm.models.multimodal.MultimodalModel` experts) take `images=` uint8 `[n, H, W, 3]`, one image per
text / prompt (H = W = the towers' `image_size`):

    model.route(texts, images=images)                  # centroid routing of the images' features
    model.score(answers, images=images)                # nats per token of each text given its image
    model.generate(["What digit is shown?"], images=images[:1], max_new_tokens=8)

The conventions are the multimodal job's (experiments/mllm): pixels `(x / 255 - mean) / std` with
CLIP's statistics; routing features = the patch mean (class token dropped) of the tower's hidden
state `vision_feature_layer` (what the partition was built on); the `<image>` placeholder expanded
to `num_image_tokens` copies of the experts' `image_token_id`; prompts in LLaVA's v1 template
`<|bos|>USER: <image>\\n{prompt} ASSISTANT:`. See `route`, `score` and `generate`.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm.decentral.decoding import mixture_decode
from dfm.decentral.routers import BayesFilterRouter, CentroidRouter, FixedRouter
from dfm.models.vision import CLIP_MEAN, CLIP_STD, normalize_pixels

IMAGE_TOKEN = "<image>"
#: how the directory's images are featurized for routing (written by the multimodal job's export)
ROUTING_FILE = "routing_features.json"
class ImagesNotSupported(ValueError, NotImplementedError):
    """`images=` given to a directory of text-only experts (no vision tower)."""


def pixels(images_uint8: Any) -> np.ndarray:
    """`[n, H, W, 3]` uint8 -> float32 NHWC normalized with CLIP's mean / std, the multimodal job's
    normalization for both tower kinds (`dfm.models.vision.normalize_pixels`; the decentralized
    directory does not record the statistics)."""
    return normalize_pixels(images_uint8)


def _texts(texts: Any, name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts \
            or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name}: expected a non-empty list of strings, got {texts!r:.80}")
    return list(texts)


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
    """

    def __init__(self, checkpoint, tokenizer, available: np.ndarray, top_k: int | None = None,
                 routing: dict | None = None, root: str | os.PathLike | None = None):
        self.checkpoint = checkpoint
        self.routing = routing or {"featurizer": "tower"}
        self.root = None if root is None else Path(root)
        self._clip = None
        self.tokenizer = tokenizer
        self.available = np.asarray(available, bool)
        router = checkpoint.router
        if isinstance(router, CentroidRouter) and top_k is not None:
            router = CentroidRouter(router.partition, temperature=router.temperature, top_k=top_k,
                                    threshold=router.threshold)
        self.router = router
        self.top_k = top_k
        first = next(m for m in checkpoint.experts if m is not None)
        self.multimodal = hasattr(first, "language_model")
        # image-text experts: their `MultimodalConfig` (image size, image token id, image tokens, feature layer)
        self.multimodal_config = first.config if self.multimodal else None
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        # the image token the experts' features replace: "<image>" (LLaVA, ours) or "<IMG_CONTEXT>"
        # (InternVL, framed by <img> ... </img>); prompts are written with the "<image>" placeholder
        self.image_token, self._image_frame = IMAGE_TOKEN, ([], [])
        if self.multimodal:
            tid = self.multimodal_config.image_token_id
            token = tokenizer.convert_ids_to_tokens(tid)
            if token is None or tokenizer.convert_tokens_to_ids(token) != tid or tid == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer: has no token with the experts' image_token_id {tid}")
            self.image_token = token
            start, end = getattr(tokenizer, "start_image_token", None), getattr(tokenizer, "end_image_token", None)
            if getattr(tokenizer, "context_image_token", None) and start and end:      # InternVL
                self._image_frame = ([tokenizer.convert_tokens_to_ids(start)], [tokenizer.convert_tokens_to_ids(end)])
        if self.bos_id is None and not self.multimodal:
            raise ValueError("tokenizer: no bos_token (the causal experts read [BOS] + tokens)")
        self._bos = [] if self.bos_id is None else [self.bos_id]   # image-text experts may start without one
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
        model = cls(checkpoint, load_tokenizer(tok_dir), mask, top_k, routing=routing, root=path)
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

    def image_features(self, images: Any, batch_size: int = 64) -> np.ndarray:
        """Routing features `[n, vision_hidden]` float64 of uint8 images `[n, S, S, 3]` (multimodal only).

        The features the multimodal job partitions and routes by (`MultimodalModel.routing_features`
        of `pixels(images)`): the mean over patches (class
        token dropped) of the vision tower's hidden state `vision_feature_layer` — the layer the
        projector reads. The job computes them with the stage-1 tower; stage 2 keeps every
        expert's tower frozen at it (`stage2.train` must be "projector+llm" or "projector",
        experiments/mllm/config.py), so any expert's tower reproduces them: the first available
        expert's tower is used.
        """
        images = self._check_images(images, None)
        if self.routing.get("featurizer") == "clip":
            return self._clip_features(images, batch_size)
        tower_model = self.checkpoint.experts[int(np.flatnonzero(self.available)[0])]
        parts = [np.asarray(_routing_features(tower_model, jnp.asarray(self.pixels(images[s:s + batch_size]))),
                            np.float64)
                 for s in range(0, len(images), batch_size)]
        return np.concatenate(parts)

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

        Raises ValueError for texts that are not a non-empty list of strings, missing / malformed
        images for image-text experts (or a count that differs from the texts'); images for
        text-only experts raise `ImagesNotSupported` (a ValueError and NotImplementedError).
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
        if isinstance(self.router, CentroidRouter):
            if images is not None:
                features = self.image_features(images)
            else:
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

        Image-text experts (`images` uint8 `[n, H, W, 3]`, one per text): each text is scored
        conditioned on its image. The sequence is `[BOS] + ids` (BOS when the tokenizer has one)
        with the text's `<image>` placeholder (at most one) expanded to the image tokens (as in
        `generate`), or, without a placeholder, `[BOS] + image tokens + ids` (the text right after
        the image); the scored tokens (L, `valid`) are the text's own tokens, neither BOS nor image
        tokens (nor InternVL's `<img>` / `</img>`). E.g. the multimodal job's answer
        format: `texts=["USER: <image>\\nWhat digit is shown? ASSISTANT: 7"]` (its question tokens are
        scored too). Weights: `route(texts, images=images)` (centroid: the images' features).

        Raises ValueError for an empty text (no token), a text with several `<image>`
        placeholders, or bad images (`route`); `ImagesNotSupported` for images with text experts.
        """
        from dfm.decentral.mixing import mixture_token_log_probs

        texts = _texts(texts, "texts")
        images = self._check_images(images, len(texts))
        if images is not None:
            x1, valid, lp = self._image_text_log_probs(texts, images)
        else:
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
        scores = mixture_token_log_probs(self._scoring_router(self.route(texts, images=images)), jnp.asarray(lp),
                                         valid=valid, available=self.available)
        return np.asarray(scores.log_probs, np.float64), lp.astype(np.float64), valid

    def _image_tokens(self, ids: np.ndarray, what: str, index: int, prepend: bool) -> tuple[np.ndarray, np.ndarray]:
        """`(BOS + ids with the placeholder expanded [S], is-text-token mask [S])`; without a placeholder
        the image tokens go right after BOS (`prepend`) or a ValueError is raised."""
        c = self.multimodal_config
        img = c.image_token_id
        count = int((ids == img).sum())
        if count > 1:
            raise ValueError(f"{what}: entry {index} has {count} {self.image_token!r} placeholders (one image per "
                             f"entry)")
        if count == 0:
            if not prepend:
                raise ValueError(f"{what}: entry {index} has no {self.image_token!r} placeholder")
            ids = np.concatenate([[img], ids])
        start, end = self._image_frame
        image = [*start, *[img] * c.num_image_tokens, *end]
        expanded = np.asarray([*self._bos, *[u for t in ids for u in (image if t == img else [t])]], np.int32)
        frame = np.isin(expanded, [*start, *end, img])
        return expanded, ~frame & (np.arange(len(expanded)) > 0)

    def _prompt_text(self, prompt: str) -> str:
        """The text of a question about an image, before tokenization: the tokenizer's chat template
        (a pretrained checkpoint's: one user turn with an image and the question, then the generation
        prompt, as `processor.apply_chat_template`) or, without one, the multimodal job's LLaVA v1
        layout ``USER: <image>\\n{prompt} ASSISTANT:``; the image token stays one placeholder here."""
        question = prompt.replace(IMAGE_TOKEN, "").strip()
        if getattr(self.tokenizer, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return text.replace(IMAGE_TOKEN, self.image_token) if self.image_token != IMAGE_TOKEN else text
        question = prompt.strip() if IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}\n{prompt.strip()}"
        return f"USER: {question.strip()} ASSISTANT:"

    def _image_text_log_probs(self, texts: list[str], images: np.ndarray):
        """`(tokens [n, L], valid [n, L], log-probs [K, n, L])` of the texts' own tokens given the images."""
        rows, masks = [], []
        texts = [t.replace(IMAGE_TOKEN, self.image_token) for t in texts]   # the placeholder, as the model's token
        for i, ids in enumerate(self._encode(texts)):
            row, is_text = self._image_tokens(ids, "texts", i, prepend=True)
            if not is_text.any():
                raise ValueError(f"texts: entry {i} has no tokens besides {IMAGE_TOKEN!r}")
            rows.append(row)
            masks.append(is_text)
        n, seq_len = len(rows), max(len(r) for r in rows)
        pad = self.eos_id if self.eos_id is not None else 0
        seqs = np.full((n, seq_len), pad, np.int32)
        for i, r in enumerate(rows):
            seqs[i, :len(r)] = r
        # the scored positions (targets of the teacher-forced rows: seqs[:, 1:]) packed to the left
        length = max(int(m.sum()) for m in masks)
        index, valid = np.zeros((n, length), np.int64), np.zeros((n, length), bool)
        for i, m in enumerate(masks):
            pos = np.flatnonzero(m) - 1
            index[i, :len(pos)], valid[i, :len(pos)] = pos, True
        x1 = np.where(valid, np.take_along_axis(seqs[:, 1:], index, axis=1), pad).astype(np.int32)
        px = jnp.asarray(self.pixels(images))
        lp = np.zeros((self.num_experts, n, length), np.float32)
        for k, model in enumerate(self.checkpoint.experts):
            if self.available[k]:
                full = np.asarray(_image_text_target_log_probs(model, jnp.asarray(seqs), px))   # [n, S-1]
                lp[k] = np.where(valid, np.take_along_axis(full, index, axis=1), 0.0)
        return x1, valid, lp

    def score(self, texts: Sequence[str], *, images=None) -> np.ndarray:
        """Nats per token `[n]` of each text under the routed mixture: `-mean_j log q(x^j | x^{<j})`
        over its tokens (`token_log_probs`; THEORY S8, S9). exp(score) is the text's perplexity.

        Image-text experts: `images` uint8 `[n, H, W, 3]`, one per text; each text is scored given
        its image (`token_log_probs`: `[BOS] + image tokens + text`, or the text's own `<image>`
        placeholder expanded in place), over the text's tokens only.

        Raises ValueError for bad / empty texts or bad images (`token_log_probs`).
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

        Image-text experts (`images` uint8 `[n, H, W, 3]`, one per prompt): each prompt is a
        question about its image, laid out as the multimodal job's (experiments/mllm/text.py
        `encode_prompt`): with a tokenizer that has a chat template (a pretrained LLaVA / InternVL
        checkpoint's), the template's user turn (image, question) and generation prompt, as
        `processor.apply_chat_template`; otherwise `[BOS] + ids("USER: <image>\\n{prompt} ASSISTANT:")`
        (a prompt that already holds one `<image>` placeholder keeps it where it is). The image token
        is expanded as the checkpoint's processor does (LLaVA: `num_image_tokens` copies of `<image>`;
        InternVL: `<img>` + `<IMG_CONTEXT>` x `num_image_tokens` + `</img>`); BOS only when the
        tokenizer has one (Qwen2 has none). Every used expert prefills it with the image
        (`MultimodalModel.prefill`); the same `mixture_decode` continues. Router: the image's
        centroid `route` weights, or the Bayes filter started at the priors (the prompt is no
        evidence: the experts were never trained on question tokens, as in the job's evaluation)
        and updated by every generated token. The answer is stripped of surrounding whitespace
        (the job's `decode_answer`).

        Raises ValueError for bad prompts, `max_new_tokens < 1` or `temperature < 0`, or bad
        images (`route`); `ImagesNotSupported` for images with text experts.
        """
        prompts = _texts(prompts, "prompts")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be an int >= 1, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature!r}")
        images = self._check_images(images, len(prompts))
        if images is not None:
            return self._generate_with_images(prompts, images, max_new_tokens, float(temperature), seed)
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

    def _generate_with_images(self, prompts: list[str], images: np.ndarray, max_new_tokens: int,
                              temperature: float, seed: int) -> list[str]:
        weights = self.route(prompts, images=images)
        layouts = []
        for i, prompt in enumerate(prompts):
            ids = self._encode([self._prompt_text(prompt)])[0]
            layouts.append(self._image_tokens(ids, "prompts", i, prepend=False)[0])
        # one KV-cache length for the call: the decoder compiles once (the prompt length is traced)
        cache_length = max(len(t) for t in layouts) + max_new_tokens
        out = []
        for i, tokens in enumerate(layouts):
            tokens = tokens[None]
            if isinstance(self.router, BayesFilterRouter):
                used = np.flatnonzero(self.available)
                prior = self.checkpoint.priors[used]
                router = BayesFilterRouter.from_priors(prior / prior.sum())
            else:
                used = np.flatnonzero(weights[i] > 0)
                w = weights[i, used]
                router = FixedRouter(jnp.asarray((w / w.sum())[None], jnp.float32))
            models = [self.checkpoint.experts[k] for k in used]
            px = jnp.asarray(self.pixels(images[i:i + 1]))
            starts = [_image_text_prefill(m, jnp.asarray(tokens), px, cache_length) for m in models]
            new = np.asarray(mixture_decode(models, starts, tokens.shape[1], max_new_tokens, router,
                                            temperature=temperature, key=jax.random.PRNGKey(seed)))[0]
            if self.eos_id is not None and (new == self.eos_id).any():
                new = new[:int(np.argmax(new == self.eos_id))]
            out.append(self.tokenizer.decode(new.tolist(), skip_special_tokens=True).strip())
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


@nnx.jit
def _routing_features(model, px):
    return model.routing_features(px)


@nnx.jit
def _image_text_target_log_probs(model, tokens, px):
    """`log p(tokens[:, j+1] | tokens[:, :j+1], image)` `[n, S-1]` float32 of a `MultimodalModel`
    (row i's image tokens take image i)."""
    lp = jax.nn.log_softmax(model(tokens[:, :-1], px).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]


@functools.partial(nnx.jit, static_argnums=(3,))
def _image_text_prefill(model, tokens, px, cache_length):
    """`(cache, log-probs [batch, vocab] of the first new token)` after prefilling prompt + image."""
    cache = model.init_cache(tokens.shape[0], cache_length)
    logits, cache = model.prefill(tokens, px, cache)
    return cache, jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
