"""The multimodal job's own tokenizer (no ``init_from``): a byte-level BPE trained on the records'
text plus the ``<image>`` special token of LLaVA's v1 layout (`dfm.prompts`)."""
from __future__ import annotations

from collections.abc import Sequence

from dfm.prompts import IMAGE_TOKEN, add_image_token
from experiments.engine.tokenizer import train_tokenizer


def build_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE (`experiments.engine.tokenizer.train_tokenizer`) of `texts` (placeholders
    removed) plus the `<image>` special token (`dfm.prompts.add_image_token`).

    Returns a `transformers.PreTrainedTokenizerFast`; `<image>` gets the id after the BPE vocabulary
    (`len(tokenizer) - 1`) and is never split.
    """
    return add_image_token(train_tokenizer([t.replace(IMAGE_TOKEN, "") for t in texts], vocab_size))
