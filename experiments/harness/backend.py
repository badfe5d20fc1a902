"""The numbers behind the harness models: evaluation-harness requests answered with a
`dfm.DecentralizedModel` (no harness is imported here; `lm_eval_model` / `lmms_eval_model` wrap it).

Three request types, as lm-evaluation-harness defines them (lmms-eval's are the same with an image):

- ``loglikelihood(context, continuation)`` -> ``(log p(continuation | context), is_greedy)``: the
  pair is split as the harness's causal models split it (trailing whitespace of the context moves
  to the continuation; the continuation's tokens are the tail of the tokens of ``context +
  continuation`` past the context's own), ``context + continuation`` is scored by
  `DecentralizedModel.token_log_probs` (the experts' teacher-forced log-probs of ``[BOS] + ids``)
  and the continuation's mixture log-probs are summed. The mixture (THEORY S8) routes as
  generation does: the centroid / uniform weights of the *context* (`route([context])`; with
  ``routing="text"`` the weights of the whole text, i.e. exactly `score`'s mixture), the Bayes
  filter (S9) from the priors through every token of the context. ``is_greedy``: every
  continuation token is the argmax of the mixture's next-token distribution given what precedes
  it (what greedy `generate` picks), from the experts' full log-softmax at those positions.
- ``loglikelihood_rolling(text)`` -> the sum of the log-probs of all of the text's tokens (token 0
  predicted from BOS) under the mixture `score` uses: exactly ``-score(text) * tokens``. A text
  longer than the experts' context (`DecentralizedModel.score` refuses it) is scored in disjoint
  windows as the harness's HF model does: each window predicts the next ``context_length`` tokens
  from as many preceding tokens as fit (``[BOS]`` first only in the first window); the Bayes
  filter's state carries over from window to window, so every token is evidence once.
- ``generate_until(context, gen_kwargs)``: `DecentralizedModel.generate` (greedy unless
  ``do_sample`` with a temperature > 0; ``max_gen_toks`` / ``max_new_tokens`` capped at what fits
  in the experts' context after the prompt), the text cut at the first of the ``until`` strings
  (generation itself runs the full number of tokens, or to EOS).

Image-text exports: every request carries exactly one image (uint8 `[S, S, 3]`, `pil_to_uint8`);
a loglikelihood context is laid out as the question of the multimodal job's prompt
(`dfm.prompts`: ``USER: <image>\\n{context} ASSISTANT:`` or the tokenizer's chat template, the
image first unless the context holds the ``<image>`` placeholder) with the continuation after it
(one space between them in the v1 layout when the continuation starts with none), and generation
uses `generate(..., images=)` on the context as the question.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dfm import DecentralizedModel
from dfm.decentral.mixing import mixture_token_log_probs
from dfm.decentral.routers import FixedRouter
from dfm.hf.clip_features import resize_bicubic
from dfm.inference import token_log_probs
from dfm.prompts import (IMAGE_TOKEN, human_segment, image_text_tokens, is_templated, messages, question_prompt,
                         render)

#: lm-evaluation-harness's default ``max_gen_toks``
DEFAULT_MAX_GEN_TOKS = 256


class _Turn(NamedTuple):
    role: str
    text: str


def load_model(pretrained: str, *, top_k: int | None = None, available: Any = None, dtype: str | None = None,
               matmul_precision: str = "highest"):
    """`DecentralizedModel.load(pretrained, ...)`; `available` may also be a string of expert indices
    separated by ``|`` or spaces (a harness's ``model_args`` splits on commas)."""

    if isinstance(available, str):
        available = [int(x) for x in available.replace("|", " ").split()]
    elif isinstance(available, (int, np.integer)) and not isinstance(available, bool):
        available = [int(available)]
    return DecentralizedModel.load(pretrained, top_k=top_k, available=available, dtype=dtype,
                                   matmul_precision=matmul_precision)


def batch_size(value: Any, default: int = 8) -> int:
    """An int from the harness's ``batch_size`` (``"auto"`` / ``"auto:N"`` / None: `default`)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    return int(value)


def open_model(pretrained: str, *, multimodal: bool, unused: dict, known: str, top_k: int | None = None,
               available: Any = None, dtype: str | None = None, matmul_precision: str = "highest"):
    """The adapters' common set-up: refuse unknown ``model_args`` (`unused`, naming the `known` ones),
    `load_model`, and refuse an export of the other kind (image-text experts for the text harness and
    the reverse).

    Raises:
      ValueError: an unknown model argument, or an export of the other kind (naming its harness).
    """
    if unused:
        raise ValueError(f"model_args: unknown {sorted(unused)} (known: {known})")
    model = load_model(str(pretrained), top_k=top_k, available=available, dtype=dtype,
                       matmul_precision=matmul_precision)
    if model.multimodal != multimodal:
        raise ValueError(f"pretrained: {pretrained} holds image-text experts; evaluate them with lmms-eval "
                         "(experiments.harness.lmms_eval_model)" if model.multimodal else
                         f"pretrained: {pretrained} holds text experts; evaluate them with lm-evaluation-harness "
                         "(experiments.harness.lm_eval_model)")
    return model


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of `context` moved to `continuation` (the harness's `_encode_pair`)."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of the `until` strings (empty strings ignored)."""
    ends = [text.find(s) for s in until if s and s in text]
    return text[:min(ends)] if ends else text


def pil_to_uint8(image: Any, size: int) -> np.ndarray:
    """A PIL image (or uint8 / float array `[H, W, 3|4|1]`) as uint8 `[size, size, 3]`: RGB, the
    central square crop, resized bicubic (`dfm.hf.clip_features.resize_bicubic`)."""
    from PIL import Image


    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image).astype(np.uint8).squeeze())
    arr = np.asarray(image.convert("RGB"), np.uint8)
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    arr = arr[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(arr)
    return resize_bicubic(arr[None], size)[0]


@functools.partial(jax.jit, static_argnums=0)
def _log_softmax(graphdef, state, tokens, px):
    model = nnx.merge(graphdef, state)
    logits = model(tokens) if px is None else model(tokens, px)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


class Backend:
    """Harness requests on one `DecentralizedModel` (module doc).

    Args:
      model: the loaded `DecentralizedModel`.
      batch_size: texts per `token_log_probs` / `generate` call.
      routing: "context" (centroid / uniform weights of the loglikelihood context, as generation
        routes) or "text" (of context + continuation: `score`'s mixture). Image-text experts route
        by the image either way; the Bayes filter reads the tokens either way.
      max_length: positions per window of `loglikelihood_rolling` (default the experts' context).
      seed: `generate`'s seed when sampling.
      greedy: compute `is_greedy` (one more forward pass per request); False reports False.
    """

    def __init__(self, model, *, batch_size: int = 8, routing: str = "context", max_length: int | None = None,
                 seed: int = 0, greedy: bool = True):
        if routing not in ("context", "text"):
            raise ValueError(f"routing: expected 'context' or 'text', got {routing!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        self.model = model
        self.batch_size = int(batch_size)
        self.routing = routing
        self.max_length = max_length if max_length is not None else model.context_length
        self.seed = int(seed)
        self.greedy = bool(greedy)
        self.tokenizer = model.tokenizer

    # ------------------------------------------------------------------ layouts
    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _mm_prompt(self, context: str) -> str:
        """The question layout of an image-text loglikelihood context (module doc)."""

        question = context.strip() if IMAGE_TOKEN in context else f"{IMAGE_TOKEN}\n{context.strip()}"
        if is_templated(self.tokenizer):
            return render(self.tokenizer, messages([_Turn("human", question)]), True)
        return human_segment(question)

    def _sequence(self, text: str) -> np.ndarray:
        """The tokens the experts read for `text` (`[BOS] + ids`, image tokens expanded)."""
        if self.model.multimodal:

            return image_text_tokens(self.tokenizer, text, self.model.multimodal_config.num_image_tokens)[0]
        return np.asarray([self.model.bos_id] + self._ids(text), np.int32)

    def _pair(self, context: str, continuation: str) -> tuple[str, str, int]:
        """`(routing text, scored text, continuation tokens)` of one loglikelihood request."""
        if self.model.multimodal:

            prompt = self._mm_prompt(context)
            spaced = not continuation[:1] or continuation[:1].isspace() or is_templated(self.tokenizer)
            sep = "" if spaced else " "        # v1 layout: "ASSISTANT: answer"
            whole = prompt + sep + continuation
            return whole, whole, max(0, len(self._sequence(whole)) - len(self._sequence(prompt)))
        context, continuation = split_pair(context, continuation)
        whole = context + continuation
        n_ctx = len(self._ids(context)) if context else 0
        return (context if self.routing == "context" else whole), whole, max(0, len(self._ids(whole)) - n_ctx)

    # ------------------------------------------------------------------ mixture
    def _router(self, weights: np.ndarray):
        """The Bayes filter itself (it reads the tokens), else the fixed weights `[n, K]`."""

        router = self.model.router
        if router is not None and router.uses_evidence:
            return router
        return FixedRouter(jnp.asarray(weights, jnp.float32))

    def _mixture(self, route_texts: list[str], lp: np.ndarray, valid: np.ndarray, images=None):
        """Mixture log-probs `[n, L]` and weights `[n, L, K]` of the experts' `lp [K, n, L]`."""

        weights = self.model.route(route_texts, images=images)
        res = mixture_token_log_probs(self._router(weights), jnp.asarray(lp, jnp.float32), valid=valid,
                                      available=self.model.available)
        return np.asarray(res.log_probs, np.float64), np.asarray(res.weights, np.float64)

    def _is_greedy(self, seq: np.ndarray, n_cont: int, weights: np.ndarray, image=None) -> bool:
        """Whether each of the last `n_cont` tokens of `seq` is the argmax of the mixture (weights
        `[n_cont, K]` before each) of the experts' next-token log-probs."""
        if n_cont == 0:
            return True
        size = len(seq) - 1
        if self.model.context_length is not None:      # pad to a multiple of 32 (fewer compilations)
            size = min(max(size, -(-size // 32) * 32), max(size, self.model.context_length))
        tokens = np.full((1, size), seq[-1], np.int32)     # padding after the rows read: a text token
        tokens[0, :len(seq) - 1] = seq[:-1]
        px = None if image is None else jnp.asarray(self.model.pixels(image[None]))
        rows = np.arange(len(seq) - 1 - n_cont, len(seq) - 1)
        mix = None
        for k, expert in enumerate(self.model.checkpoint.experts):
            if not self.model.available[k] or not (weights[:, k] > 0).any():
                continue
            graphdef, state = nnx.split(expert)
            lp = np.asarray(_log_softmax(graphdef, state, jnp.asarray(tokens), px)[0, rows], np.float64)
            term = np.log(np.maximum(weights[:, k:k + 1], 1e-300)) + lp
            mix = term if mix is None else np.logaddexp(mix, term)
        return bool((mix.argmax(axis=1) == seq[len(seq) - n_cont:]).all())

    # ------------------------------------------------------------------ requests
    def loglikelihood(self, pairs: Sequence[tuple[str, str]], images: Sequence[np.ndarray] | None = None
                      ) -> list[tuple[float, bool]]:
        """`(log p(continuation | context), is_greedy)` per `(context, continuation)` (module doc);
        `images`: one uint8 `[S, S, 3]` per pair for image-text experts."""
        laid = [self._pair(c, x) for c, x in pairs]
        order = sorted(range(len(laid)), key=lambda i: -len(laid[i][1]))
        out: list[tuple[float, bool] | None] = [None] * len(laid)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ims = None if images is None else np.stack([images[i] for i in idx])
            _, lp, valid = self.model.token_log_probs([laid[i][1] for i in idx], images=ims)
            mix, w = self._mixture([laid[i][0] for i in idx], lp, valid, ims)
            for row, i in enumerate(idx):
                n_cont, v = laid[i][2], int(valid[row].sum())
                ll = float(mix[row, v - n_cont:v].sum())
                greedy = self.greedy and self._is_greedy(self._sequence(laid[i][1]), n_cont,
                                                         w[row, v - n_cont:v], None if ims is None else ims[row])
                out[i] = (ll, greedy)
        return out

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Sum of the log-probs of every token of each text (module doc); 0 for a text without tokens."""
        if self.model.multimodal:
            raise NotImplementedError("loglikelihood_rolling: image-text experts score a text given its image "
                                      "(loglikelihood); there is no image-free likelihood")
        out = [0.0] * len(texts)
        lengths = [len(self._ids(t)) for t in texts]
        short = [i for i, n in enumerate(lengths) if n and (self.max_length is None or n <= self.max_length)]
        short.sort(key=lambda i: -lengths[i])
        for start in range(0, len(short), self.batch_size):
            idx = short[start:start + self.batch_size]
            mix, _, valid = self.model.token_log_probs([texts[i] for i in idx])
            for row, i in enumerate(idx):
                out[i] = float(np.where(valid[row], mix[row], 0.0).sum())
        for i, n in enumerate(lengths):
            if self.max_length is not None and n > self.max_length:
                out[i] = self._windowed(texts[i])
        return out

    def _windowed(self, text: str) -> float:
        """Disjoint-window log-likelihood of a text longer than `max_length` (module doc)."""

        model, size = self.model, int(self.max_length)
        full = np.asarray([model.bos_id] + self._ids(text), np.int32)
        n = len(full) - 1
        router = self._router(model.route([text]))
        state, total, start = None, 0.0, 0
        while start < n:
            end = min(start + size, n)
            first = max(0, end - size)
            row = full[first:end + 1][None]              # reads full[first:end], predicts ids[first:end]
            lp = np.zeros((model.num_experts, 1, end - first))
            for k, expert in enumerate(model.checkpoint.experts):
                if model.available[k]:
                    lp[k] = token_log_probs(expert, row)
            valid = (np.arange(first, end) >= start)[None]
            res = mixture_token_log_probs(router, jnp.asarray(lp, jnp.float32), valid=valid, state=state,
                                          available=model.available)
            total += float(np.asarray(res.log_probs, np.float64)[valid].sum())
            state, start = res.final_state, end
        return total

    def generate_until(self, requests: Sequence[tuple[str, dict]], images: Sequence[np.ndarray] | None = None
                       ) -> list[str]:
        """Continuation of each `(context, gen_kwargs)` cut at its ``until`` strings (module doc)."""
        plans = []
        for i, (context, kwargs) in enumerate(requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            steps = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", DEFAULT_MAX_GEN_TOKS)))
            temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0) or 0.0)
            if not kwargs.get("do_sample", False):
                temperature = 0.0
            if self.model.context_length is not None:
                steps = max(1, min(steps, self.model.context_length - self._prompt_length(context)))
            plans.append((steps, temperature, until))
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple[int, float], list[int]] = {}
        for i, (steps, temperature, _) in enumerate(plans):
            groups.setdefault((steps, temperature), []).append(i)
        for (steps, temperature), members in groups.items():
            members.sort(key=lambda i: -len(requests[i][0]))
            for start in range(0, len(members), self.batch_size):
                idx = members[start:start + self.batch_size]
                ims = None if images is None else np.stack([images[i] for i in idx])
                texts = self.model.generate([requests[i][0] for i in idx], max_new_tokens=steps,
                                            temperature=temperature, seed=self.seed, images=ims)
                for i, text in zip(idx, texts):
                    out[i] = cut_at(text, plans[i][2])
        return out

    def _prompt_length(self, context: str) -> int:
        """Positions of the prompt `generate` builds for `context`."""
        if self.model.multimodal:

            return len(question_prompt(self.tokenizer, context, self.model.multimodal_config.num_image_tokens))
        return 1 + len(self._ids(context))
