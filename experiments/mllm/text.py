"""Conversation template, tokenizer and token layout of the multimodal job (LLaVA-1.5 style).

Template (LLaVA's "v1" conversation, with our BPE's special tokens)::

    <|bos|>USER: <image>\\nWhat digit is shown? ASSISTANT: 7<|eos|>USER: Is it even or odd? ASSISTANT: odd<|eos|>

The `<image>` placeholder is one special token in the text; `expand_image_tokens` repeats it
`num_image_tokens` times, the positions where `MultimodalModel.embed_inputs` scatters the
projected image features (as the HF LLaVA processor does before the model). Only the answer tokens
and their `<|eos|>` are trained on (LLaVA masks the human turns and the image).

A pretrained checkpoint's tokenizer (``init_from``; it has a chat template) is laid out by its
template and its processor's image-token expansion instead (`experiments.mllm.chat`):
`image_token_id`, `encode_conversation`, `encode_prompt` and `encode_answer` dispatch on
`chat.is_templated(tokenizer)`, so the data stage and the evaluation use either layout unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiments.engine.tokenizer import train_tokenizer
from experiments.mllm import chat
from experiments.mllm.chat import TemplateError  # raised by both layouts

IMAGE_TOKEN = "<image>"
USER, ASSISTANT = "USER:", "ASSISTANT:"


def build_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE (`experiments.tokenizer.train_tokenizer`) plus the `<image>` special token.

    Returns a `transformers.PreTrainedTokenizerFast`; `<image>` gets the id after the BPE vocabulary
    (`len(tokenizer) - 1`) and is never split.
    """
    tok = train_tokenizer([t.replace(IMAGE_TOKEN, "") for t in texts], vocab_size)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def image_token_id(tokenizer) -> int:
    """Id of `<image>` in `tokenizer` (ValueError if the tokenizer lacks it); for a templated
    (pretrained) tokenizer the token its model's image features replace (`chat.image_token_id`)."""
    if chat.is_templated(tokenizer):
        return chat.image_token_id(tokenizer)
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer: has no {IMAGE_TOKEN!r} token")
    return int(tid)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def human_segment(text: str, first: bool) -> str:
    """The text of one human turn, up to and including `ASSISTANT:`."""
    return f"{USER} {text.strip()} {ASSISTANT}"


def encode_conversation(tokenizer, turns, max_length: int, num_image_tokens: int,
                        record_id: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of a conversation (image tokens expanded), cut at a turn boundary.

    Args:
      turns: alternating `Turn(role="human"|"gpt", text)` (see `experiments.mllm.formats`).
      max_length: at most this many tokens; turns (question + answer) that do not fit are dropped.
      num_image_tokens: copies of `<image>` per placeholder.
    Returns:
      `(ids [n] int32, loss_mask [n] bool)`, n <= max_length: ids start with BOS; `loss_mask[j]` is
      True where token j is part of an answer (or its EOS), i.e. a target of the LM loss.
    Raises:
      TemplateError: the first question + answer do not fit in `max_length` (names the record).

    A templated (pretrained) tokenizer is laid out by `chat.encode_conversation` (same contract).
    """
    if chat.is_templated(tokenizer):
        return chat.encode_conversation(tokenizer, turns, max_length, num_image_tokens, record_id)
    img = image_token_id(tokenizer)
    ids, mask = [tokenizer.bos_token_id], [False]
    for j in range(0, len(turns) - 1, 2):
        q = expand_image_tokens(_ids(tokenizer, human_segment(turns[j].text, j == 0)), img, num_image_tokens)
        a = _ids(tokenizer, " " + turns[j + 1].text.strip()) + [tokenizer.eos_token_id]
        if len(ids) + len(q) + len(a) > max_length:
            if j == 0:
                raise TemplateError(
                    f"record {record_id!r}: its first turn needs {1 + len(q) + len(a)} tokens > "
                    f"data.max_length={max_length}")
            break
        ids += q + a
        mask += [False] * len(q) + [True] * len(a)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def encode_prompt(tokenizer, question: str, num_image_tokens: int) -> np.ndarray:
    """`[P]` int32 ids of `<|bos|>USER: {question} ASSISTANT:` with `<image>` expanded (a templated
    tokenizer: the processor's ids of its chat template's prompt, `chat.encode_prompt`)."""
    if chat.is_templated(tokenizer):
        return chat.encode_prompt(tokenizer, question, num_image_tokens)
    q = _ids(tokenizer, human_segment(question, True))
    return np.asarray([tokenizer.bos_token_id] + expand_image_tokens(q, image_token_id(tokenizer), num_image_tokens),
                      np.int32)


def encode_answer(tokenizer, answer: str) -> np.ndarray:
    """`[A]` int32 ids of ` {answer}<|eos|>` (the tokens the model must produce after the prompt;
    a templated tokenizer: its assistant turn up to EOS, `chat.encode_answer`)."""
    if chat.is_templated(tokenizer):
        return chat.encode_answer(tokenizer, answer)
    return np.asarray(_ids(tokenizer, " " + answer.strip()) + [tokenizer.eos_token_id], np.int32)


def expand_image_tokens(ids: list[int], image_id: int, num_image_tokens: int) -> list[int]:
    """Repeat every `image_id` in `ids` `num_image_tokens` times (the LLaVA processor's expansion)."""
    out = []
    for t in ids:
        out.extend([t] * num_image_tokens if t == image_id else [t])
    return out


def decode_answer(tokenizer, generated: np.ndarray) -> str:
    """Text of generated ids `[n]` up to the first EOS, stripped."""
    gen = list(np.asarray(generated).tolist())
    if tokenizer.eos_token_id in gen:
        gen = gen[: gen.index(tokenizer.eos_token_id)]
    return tokenizer.decode(gen, skip_special_tokens=True).strip()


def pad_rows(rows: Sequence[np.ndarray], length: int, pad_id: int, dtype=np.int32) -> np.ndarray:
    """Stack 1-D arrays into `[len(rows), length]`, right-padded with `pad_id`."""
    out = np.full((len(rows), length), pad_id, dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
