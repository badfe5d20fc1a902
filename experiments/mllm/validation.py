"""Validation batches of the multimodal job: the reference answers of the validation questions.

Model selection during training (`experiments.engine.validation`) uses the training loss
(`modeling.llava_loss`: cross-entropy of the answer tokens given the image and the question) on
the validation questions of the model's validation images, teacher-forced with their reference
answer (the first turn of each validation record, as `evaluate.QuestionSet` lays it out). Only the
validation split is read.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from experiments.mllm.data import MultimodalData
from experiments.mllm.evaluate import QuestionSet

#: validation questions per model selection at most (evenly spaced over the selected ones)
MAX_VALIDATION_QUESTIONS = 512


def validation_batches(data: MultimodalData, units: np.ndarray | None, batch_size: int):
    """Batches ``{"tokens": [b, L] int32, "mask": [b, L] bool (True = answer token), "pixels":
    [b, S, S, 3] float32}`` of the validation questions on the validation images `units` (None =
    all), at most `MAX_VALIDATION_QUESTIONS` (evenly spaced), as a sequence that builds each batch
    when it is read; [] when there are none."""
    rows = data.questions["val"]
    if units is not None:
        wanted = set(np.asarray(units).tolist())
        rows = [r for r in rows if r["image"] in wanted]
    if not rows:
        return []
    if len(rows) > MAX_VALIDATION_QUESTIONS:
        rows = [rows[i] for i in np.linspace(0, len(rows) - 1, MAX_VALIDATION_QUESTIONS).round().astype(int)]
    return _Batches(QuestionSet(rows, data.tokenizer, data.arrays["images_val"], data.summary["num_image_tokens"],
                                data.image_token_id, data.pixel_stats), batch_size)


class _Batches:
    """The batches of a `QuestionSet`, built on access (pixels are normalized per batch, so the
    validation set stays uint8 in host memory between validations)."""

    def __init__(self, qs: QuestionSet, batch_size: int):
        self.qs, self.batch_size = qs, batch_size
        pos = np.arange(qs.seqs.shape[1])[None]
        self.mask = (pos >= qs.prompt_len[:, None]) & (pos < (qs.prompt_len + qs.answer_len)[:, None])

    def __len__(self) -> int:
        return (len(self.qs.rows) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        idx = np.arange(i * self.batch_size, min((i + 1) * self.batch_size, len(self.qs.rows)))
        return {"tokens": jnp.asarray(self.qs.seqs[idx], jnp.int32), "mask": jnp.asarray(self.mask[idx]),
                "pixels": jnp.asarray(self.qs.pixels(idx))}
