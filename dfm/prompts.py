"""Prompt layouts of image-text models: where the image tokens, the question and the answer go.

One module for every layout the project reads or writes, so that the multimodal job
(experiments/mllm: data stage, evaluation, validation) and `dfm.DecentralizedModel` lay a
conversation out identically.

- LLaVA-1.5 "v1" (`LLAVA_V1_TEMPLATE`; LLaVA's ``conv_vicuna_v1`` with our BPE's special tokens and
  the system prompt omitted), the layout of the multimodal job's own tokenizer (no chat template)::

      <|bos|>USER: <image>\\nWhat digit is shown? ASSISTANT: 7<|eos|>USER: Is it odd? ASSISTANT: odd<|eos|>

  ``<image>`` is one special token in the text; `expand_image_tokens` repeats it
  `num_image_tokens` times, the positions where `MultimodalModel.embed_inputs` scatters the
  projected image features (as transformers' `LlavaProcessor` does before the model).
- A tokenizer with a chat template (a pretrained checkpoint's, or `default_template`: LLaVA v1 for
  LLaVA, ChatML with one ``<IMG_CONTEXT>`` per image for InternVL, `CHATML_TEMPLATE`) is laid out by
  its template and its processor's image-token expansion: LLaVA (`LlavaProcessor`) repeats
  ``<image>``; InternVL (`InternVLProcessor`, a tokenizer with ``context_image_token``) replaces
  ``<IMG_CONTEXT>`` by ``<img>`` + ``<IMG_CONTEXT>`` x `num_image_tokens` + ``</img>``
  (`dfm.hf.tokenizers.expand_llava_prompt` / `expand_internvl_prompt`). A prompt's ids are then
  the processor's ``input_ids`` of ``apply_chat_template(messages, add_generation_prompt=True)``.

`encode_conversation`, `encode_prompt` and `encode_answer` dispatch on `is_templated(tokenizer)`,
so the data stage, the evaluation and the API use either layout unchanged. Training targets are
the answers and their EOS only (LLaVA masks the human turns and the image). With a template, an
answer's targets are found by character offsets in the rendered conversation (fast tokenizers):
the tokens after the prompt with its generation prompt and inside the text the template adds for
that answer, trailing whitespace excluded, through the first EOS; EOS is inserted after an answer
whose template does not end the turn with it (llava-hf's LLaVA-1.5 template; LLaVA was trained
with ``</s>`` after every answer, its ``sep2``). A prompt's tokens must be the first tokens of the
conversation (true for the LLaVA and ChatML templates), else `TemplateError` names the record.

Turns are objects with ``role`` ("human" | "gpt") and ``text`` (``<image>`` placeholders
included), e.g. `experiments.mllm.formats.Turn`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from dfm.hf.tokenizers import expand_internvl_prompt, expand_llava_prompt

IMAGE_TOKEN = "<image>"              # the placeholder in records, questions and API texts (LLaVA data format)
INTERNVL_CONTEXT_TOKEN = "<IMG_CONTEXT>"
USER, ASSISTANT = "USER:", "ASSISTANT:"

# LLaVA-1.5's "v1" conversation as a chat template: "USER: <image>\nQ ASSISTANT: A</s>USER: ...",
# for a LLaVA checkpoint without a template (the job's own tokenizer uses the same segments).
LLAVA_V1_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# ChatML with one <IMG_CONTEXT> per image (InternVL2.5's Qwen2.5 chat), for an InternVL checkpoint without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}<IMG_CONTEXT>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class TemplateError(ValueError):
    """A conversation cannot be laid out (e.g. its first turn does not fit `max_length`)."""


class _Turn(NamedTuple):
    role: str
    text: str


# ------------------------------------------------------------------------------------------------
# tokenizer kinds and the image token

def is_templated(tokenizer) -> bool:
    """True for a tokenizer with a chat template (a pretrained checkpoint's)."""
    return bool(getattr(tokenizer, "chat_template", None))


def is_internvl(tokenizer) -> bool:
    """True for an InternVL tokenizer (it names a ``context_image_token``, as `InternVLProcessor` needs)."""
    return bool(getattr(tokenizer, "context_image_token", None))


def default_template(kind: str) -> str:
    """`LLAVA_V1_TEMPLATE` for "llava", `CHATML_TEMPLATE` for "internvl" (ValueError naming `kind` otherwise)."""
    if kind not in ("llava", "internvl"):
        raise ValueError(f"kind: expected 'llava' or 'internvl', got {kind!r}")
    return LLAVA_V1_TEMPLATE if kind == "llava" else CHATML_TEMPLATE


def image_token(tokenizer) -> str:
    """The token the model's image features replace: ``<IMG_CONTEXT>`` (InternVL), the tokenizer's
    ``image_token`` (a LLaVA checkpoint's), else ``<image>`` (our BPE's special token)."""
    if is_internvl(tokenizer):
        return str(tokenizer.context_image_token)
    if is_templated(tokenizer):
        return str(getattr(tokenizer, "image_token", None) or IMAGE_TOKEN)
    return IMAGE_TOKEN


def image_token_id(tokenizer) -> int:
    """Id of `image_token(tokenizer)`; ValueError naming the token when the tokenizer lacks it as one token."""
    token = image_token(tokenizer)
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer: has no {token!r} token")
    return int(tid)


def add_image_token(tokenizer):
    """`tokenizer` with ``<image>`` added as a special token (never split; id `len(tokenizer) - 1`
    when new), the LLaVA v1 layout's placeholder. Returns the same tokenizer object."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


# ------------------------------------------------------------------------------------------------
# LLaVA v1 segments (a tokenizer without a chat template)

def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def human_segment(text: str) -> str:
    """The text of one human turn in the v1 layout, up to and including `ASSISTANT:`:
    ``USER: {text} ASSISTANT:`` (`text` stripped, placeholders kept)."""
    return f"{USER} {text.strip()} {ASSISTANT}"


def expand_image_tokens(ids: Sequence[int], image_id: int, num_image_tokens: int) -> list[int]:
    """Repeat every `image_id` in `ids` `num_image_tokens` times (the LLaVA processor's expansion)."""
    out = []
    for t in ids:
        out.extend([t] * num_image_tokens if t == image_id else [t])
    return out


# ------------------------------------------------------------------------------------------------
# chat templates (a pretrained checkpoint's tokenizer)

def messages(turns) -> list[dict]:
    """Chat messages of alternating human / gpt turns: ``{"role": "user" | "assistant", "content":
    [{"type": "image"}, ..., {"type": "text", "text": ...}]}``, one image item per ``<image>``
    placeholder (placeholders removed from the text, which is stripped), as the processors' chat
    templates take them (``processor.apply_chat_template``)."""
    out = []
    for t in turns:
        text = t.text.replace(IMAGE_TOKEN, "").strip()
        content = [{"type": "image"}] * t.text.count(IMAGE_TOKEN) + [{"type": "text", "text": text}]
        out.append({"role": "user" if t.role == "human" else "assistant", "content": content})
    return out


def render(tokenizer, msgs: Sequence[dict], generation: bool) -> str:
    """``tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)``."""
    return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation)


def expand(tokenizer, text: str, num_image_tokens: int) -> str:
    """`text` with every image token expanded as the checkpoint's processor does (module doc)."""
    if is_internvl(tokenizer):
        token = image_token(tokenizer)
        return expand_internvl_prompt(text, num_image_tokens, placeholder=token, context_token=token,
                                      start_token=tokenizer.start_image_token, end_token=tokenizer.end_image_token)
    return expand_llava_prompt(text, num_image_tokens, image_token(tokenizer))


def token_ids(tokenizer, text: str, num_image_tokens: int) -> list[int]:
    """The processor's ``input_ids`` of `text` (image tokens expanded, the tokenizer's special tokens added)."""
    return list(tokenizer(expand(tokenizer, text, num_image_tokens))["input_ids"])


def _tokens(tokenizer, expanded: str) -> tuple[list[int], list[tuple[int, int]]]:
    """ids and character offsets (in `expanded`) of a text whose image tokens are expanded."""
    try:
        enc = tokenizer(expanded, return_offsets_mapping=True)
    except NotImplementedError:
        raise TemplateError("tokenizer: the chat-template layout needs a fast tokenizer (character offsets); "
                            f"{type(tokenizer).__name__} has none") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _answer_spans(tokenizer, msgs: list[dict], num_image_tokens: int, where: str):
    """`(ids, [(q_j, r_j)])` of the rendered conversation: the prompt of turn j ends before token
    q_j (it is the processor's ids of that prompt), its answer is tokens q_j..r_j - 1 (those
    inside the assistant text, trailing whitespace excluded)."""
    full = expand(tokenizer, render(tokenizer, msgs, False), num_image_tokens)
    ids, offsets = _tokens(tokenizer, full)
    ends = [e for _, e in offsets]
    spans = []
    for j in range(0, len(msgs) - 1, 2):
        prompt = expand(tokenizer, render(tokenizer, msgs[: j + 1], True), num_image_tokens)
        through = expand(tokenizer, render(tokenizer, msgs[: j + 2], False), num_image_tokens).rstrip()
        if not (full.startswith(prompt) and full.startswith(through) and len(prompt) <= len(through)):
            raise TemplateError(f"{where} turn {j // 2}: the chat template does not render the prompt as a prefix "
                                "of the conversation")
        p, f = len(prompt), max(len(prompt), len(through))
        if any(s < p < e for s, e in offsets):
            raise TemplateError(f"{where} turn {j // 2}: a token spans the end of the prompt (the template's "
                                "generation prompt merges with the answer)")
        q = sum(e <= p for e in ends)
        if ids[:q] != _tokens(tokenizer, prompt)[0]:
            raise TemplateError(f"{where} turn {j // 2}: the prompt's own tokens are not the conversation's")
        spans.append((q, max(q, sum(e <= f for e in ends))))
    return ids, spans


def _answer(ids: list[int], eos: int) -> list[int]:
    """An answer's ids through its first EOS (appended when absent)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]


def _templated_conversation(tokenizer, turns, max_length: int, num_image_tokens: int, record_id: str):
    full, spans = _answer_spans(tokenizer, messages(turns), num_image_tokens, f"record {record_id!r}")
    ids, mask, prev = [], [], 0
    for j, (q, r) in enumerate(spans):
        answer = _answer(full[q:r], tokenizer.eos_token_id)
        if len(ids) + (q - prev) + len(answer) > max_length:
            if j == 0:
                raise TemplateError(f"record {record_id!r}: its first turn needs {q + len(answer)} tokens > "
                                    f"data.max_length={max_length}")
            break
        ids += full[prev:q] + answer
        mask += [False] * (q - prev) + [True] * len(answer)
        prev = r
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


# ------------------------------------------------------------------------------------------------
# the layouts (both kinds of tokenizer)

def encode_conversation(tokenizer, turns, max_length: int, num_image_tokens: int,
                        record_id: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of a conversation (image tokens expanded), cut at a turn boundary.

    Args:
      turns: alternating human / gpt turns (module doc).
      max_length: at most this many tokens; turns (question + answer) that do not fit are dropped.
      num_image_tokens: image positions per placeholder.
      record_id: named in errors.
    Returns:
      `(ids [n] int32, loss_mask [n] bool)`, n <= max_length: v1 layout: ids start with BOS; with a
      template: the processor's ids of the rendered conversation through the last question +
      answer that fits, EOS inserted after an answer the template does not end with it.
      `loss_mask[j]` is True where token j is part of an answer (or its EOS), a target of the LM loss.
    Raises:
      TemplateError: the first question + answer do not fit in `max_length`, or a template's prompt
        and answer do not tokenize apart (naming the record).
    """
    if is_templated(tokenizer):
        return _templated_conversation(tokenizer, turns, max_length, num_image_tokens, record_id)
    img = image_token_id(tokenizer)
    ids, mask = [tokenizer.bos_token_id], [False]
    for j in range(0, len(turns) - 1, 2):
        q = expand_image_tokens(_ids(tokenizer, human_segment(turns[j].text)), img, num_image_tokens)
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
    """`[P]` int32 ids of the prompt asking `question` (with its ``<image>`` placeholder), image
    tokens expanded: v1: ``<|bos|>USER: {question} ASSISTANT:``; with a template: the processor's
    ids of the template's prompt and generation prompt."""
    if is_templated(tokenizer):
        text = render(tokenizer, messages([_Turn("human", question)]), True)
        return np.asarray(token_ids(tokenizer, text, num_image_tokens), np.int32)
    q = _ids(tokenizer, human_segment(question))
    return np.asarray([tokenizer.bos_token_id] + expand_image_tokens(q, image_token_id(tokenizer), num_image_tokens),
                      np.int32)


def encode_answer(tokenizer, answer: str) -> np.ndarray:
    """`[A]` int32 ids the model must produce after a prompt: v1: `` {answer}<|eos|>``; with a
    template: `answer`'s tokens in the template's assistant turn through EOS (appended when the
    template has none), laid out after a one-word question (the prompt's tokens end at the
    generation prompt whatever the question)."""
    if is_templated(tokenizer):
        msgs = messages([_Turn("human", "Question?"), _Turn("gpt", answer)])
        ids, [(q, r)] = _answer_spans(tokenizer, msgs, 1, f"answer {answer!r}")
        return np.asarray(_answer(ids[q:r], tokenizer.eos_token_id), np.int32)
    return np.asarray(_ids(tokenizer, " " + answer.strip()) + [tokenizer.eos_token_id], np.int32)


def question_prompt(tokenizer, prompt: str, num_image_tokens: int, what: str = "prompts", index: int = 0) -> np.ndarray:
    """`encode_prompt` of a user's question about one image: a prompt without ``<image>`` gets
    ``<image>\\n`` in front (the image before the question, as the job's records).

    Raises:
      ValueError: naming `what[index]`, for a prompt with several ``<image>`` placeholders (one image each).
    """
    count = prompt.count(IMAGE_TOKEN)
    if count > 1:
        raise ValueError(f"{what}[{index}]: has {count} {IMAGE_TOKEN!r} placeholders (one image per entry)")
    question = prompt.strip() if count else f"{IMAGE_TOKEN}\n{prompt.strip()}"
    return encode_prompt(tokenizer, question, num_image_tokens)


def image_text_tokens(tokenizer, text: str, num_image_tokens: int, what: str = "texts",
                      index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A text read after (or around) one image, for scoring it given the image: `(ids [S] int32,
    is_text [S] bool)`. `ids` = `[BOS] +` the text's tokens (no chat template, no other special
    token) with its ``<image>`` placeholder expanded in place as the processor does (InternVL:
    ``<img>`` + context tokens + ``</img>``), or, without a placeholder, the image tokens first;
    BOS only when the tokenizer has one (Qwen2 has none). `is_text` marks the text's own tokens
    (neither BOS nor image tokens nor InternVL's frame, nor the first token, which nothing
    predicts), the targets a score is taken over.

    Raises:
      ValueError: naming `what[index]`: several placeholders, or no token besides the image.
    """
    token = image_token(tokenizer)
    img = image_token_id(tokenizer)
    ids = _ids(tokenizer, text.replace(IMAGE_TOKEN, token))
    count = ids.count(img)
    if count > 1:
        raise ValueError(f"{what}[{index}]: has {count} {IMAGE_TOKEN!r} placeholders (one image per entry)")
    if count == 0:
        ids = [img] + ids
    frame = ([], [])
    if is_internvl(tokenizer):
        frame = ([tokenizer.convert_tokens_to_ids(tokenizer.start_image_token)],
                 [tokenizer.convert_tokens_to_ids(tokenizer.end_image_token)])
    image = [*frame[0], *[img] * num_image_tokens, *frame[1]]
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    expanded = np.asarray([*bos, *[u for t in ids for u in (image if t == img else [t])]], np.int32)
    is_text = ~np.isin(expanded, [*frame[0], *frame[1], img])
    is_text[0] = False                       # BOS, or a first token that nothing predicts
    if not is_text.any():
        raise ValueError(f"{what}[{index}]: has no tokens besides {IMAGE_TOKEN!r}")
    return expanded, is_text


def decode_answer(tokenizer, generated: np.ndarray) -> str:
    """Text of generated ids `[n]` up to the first EOS, special tokens skipped, stripped."""
    gen = list(np.asarray(generated).tolist())
    if tokenizer.eos_token_id in gen:
        gen = gen[: gen.index(tokenizer.eos_token_id)]
    return tokenizer.decode(gen, skip_special_tokens=True).strip()


def pad_rows(rows: Sequence[np.ndarray], length: int, pad_id: int, dtype=np.int32) -> np.ndarray:
    """Stack 1-D token arrays into `[len(rows), length]`, right-padded with `pad_id`."""
    out = np.full((len(rows), length), pad_id, dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
