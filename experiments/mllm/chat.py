"""Token layout of a pretrained checkpoint's tokenizer (``init_from``): its chat template and its
processor's image-token expansion, as transformers lays out a prompt.

A tokenizer with a ``chat_template`` (the checkpoint's, or `default_template` when it has none) is
laid out here; our own byte-level BPE (no template) keeps the LLaVA "v1" segments of
`experiments.mllm.text`, which dispatches on `is_templated`.

- Messages: a record's turns become chat messages, ``{"role": "user" | "assistant", "content":
  [{"type": "image"}, ..., {"type": "text", "text": ...}]}``, one image item per ``<image>``
  placeholder (placeholders removed from the text, which is stripped), as the processors' chat
  templates take them (``processor.apply_chat_template``).
- Text -> ids: the rendered text with its image placeholder expanded as the checkpoint's processor
  does, then ``tokenizer(text)`` with its special tokens (BOS for Llama): LLaVA (`LlavaProcessor`)
  repeats ``<image>`` `num_image_tokens` times (`dfm.hf.tokenizers.expand_llava_prompt`); InternVL
  (`InternVLProcessor`, a tokenizer with ``context_image_token``) replaces ``<IMG_CONTEXT>`` by
  ``<img>`` + ``<IMG_CONTEXT>`` x `num_image_tokens` + ``</img>`` (`expand_internvl_prompt`).
  A prompt's ids are therefore the processor's ``input_ids`` for ``apply_chat_template(messages,
  add_generation_prompt=True)``.
- Targets: the tokens of each assistant turn, found by character offsets in the rendered
  conversation (fast tokenizers): those after the prompt with its generation prompt and inside the
  text the template adds for that answer, trailing whitespace excluded (it belongs to the next
  turn's first token in SentencePiece), up to and including the first EOS. When the template does
  not end the turn with EOS (llava-hf's LLaVA-1.5 template does not; LLaVA was trained with
  ``</s>`` after every answer, its ``sep2``) EOS is inserted after the answer, so a generated
  answer ends with EOS as in `experiments.mllm.text`. A prompt's tokens must be the first tokens of
  the conversation (no token across the end of the generation prompt; true for the LLaVA and ChatML
  templates); otherwise a `TemplateError` names the record.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGE_PLACEHOLDER = "<image>"          # in the records (LLaVA / InternVL data format)
LLAVA_IMAGE_TOKEN = "<image>"
INTERNVL_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# LLaVA-1.5's "v1" conversation (the job's own layout, `experiments.mllm.text`), for a LLaVA
# checkpoint without a template: "USER: <image>\nQ ASSISTANT: A</s>USER: ..." (system prompt omitted).
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


def is_templated(tokenizer) -> bool:
    """True for a tokenizer with a chat template (a pretrained checkpoint's)."""
    return bool(getattr(tokenizer, "chat_template", None))


def is_internvl(tokenizer) -> bool:
    """True for an InternVL tokenizer (it names a ``context_image_token``, as `InternVLProcessor` needs)."""
    return bool(getattr(tokenizer, "context_image_token", None))


def default_template(kind: str) -> str:
    """`LLAVA_V1_TEMPLATE` for "llava", `CHATML_TEMPLATE` for "internvl" (ValueError otherwise)."""
    if kind not in ("llava", "internvl"):
        raise ValueError(f"kind: expected 'llava' or 'internvl', got {kind!r}")
    return LLAVA_V1_TEMPLATE if kind == "llava" else CHATML_TEMPLATE


def image_token(tokenizer) -> str:
    """The token the model's image features replace: ``<IMG_CONTEXT>`` (InternVL) or the tokenizer's
    ``image_token`` (LLaVA; ``<image>`` by default)."""
    if is_internvl(tokenizer):
        return str(tokenizer.context_image_token)
    return str(getattr(tokenizer, "image_token", None) or LLAVA_IMAGE_TOKEN)


def image_token_id(tokenizer) -> int:
    """Id of `image_token` (ValueError when the tokenizer lacks it as one token)."""
    token = image_token(tokenizer)
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer: has no {token!r} token")
    return int(tid)


def messages(turns) -> list[dict]:
    """Chat messages of alternating human / gpt turns (`experiments.mllm.formats.Turn`; module doc)."""
    out = []
    for t in turns:
        text = t.text.replace(IMAGE_PLACEHOLDER, "").strip()
        content = [{"type": "image"}] * t.text.count(IMAGE_PLACEHOLDER) + [{"type": "text", "text": text}]
        out.append({"role": "user" if t.role == "human" else "assistant", "content": content})
    return out


def render(tokenizer, msgs: Sequence[dict], generation: bool) -> str:
    """``tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)``."""
    return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=generation)


def expand(tokenizer, text: str, num_image_tokens: int) -> str:
    """`text` with every image token expanded as the checkpoint's processor does (module doc)."""
    from dfm.hf.tokenizers import expand_internvl_prompt, expand_llava_prompt

    if is_internvl(tokenizer):
        start, end = tokenizer.start_image_token, tokenizer.end_image_token
        return expand_internvl_prompt(text, num_image_tokens, placeholder=image_token(tokenizer),
                                      context_token=image_token(tokenizer), start_token=start, end_token=end)
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


def _answer(ids: list[int], eos: int) -> tuple[list[int], list[bool]]:
    """An answer's ids through its first EOS (appended when absent), all targets."""
    ids = ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]
    return ids, [True] * len(ids)


def encode_conversation(tokenizer, turns, max_length: int, num_image_tokens: int,
                        record_id: str = "?") -> tuple[np.ndarray, np.ndarray]:
    """`experiments.mllm.text.encode_conversation` for a templated tokenizer (module doc).

    Returns `(ids [n] int32, loss_mask [n] bool)`, n <= max_length: the processor's ids of the
    rendered conversation through the last question + answer that fits, EOS inserted after an
    answer the template does not end with it, tokens after an answer's EOS within its turn dropped.
    Raises TemplateError (naming the record) when the first turn does not fit or the template's
    prompt and answer do not tokenize apart.
    """
    full, spans = _answer_spans(tokenizer, messages(turns), num_image_tokens, f"record {record_id!r}")
    ids, mask, prev = [], [], 0
    for j, (q, r) in enumerate(spans):
        answer, targets = _answer(full[q:r], tokenizer.eos_token_id)
        if len(ids) + (q - prev) + len(answer) > max_length:
            if j == 0:
                raise TemplateError(f"record {record_id!r}: its first turn needs {q + len(answer)} tokens > "
                                    f"data.max_length={max_length}")
            break
        ids += full[prev:q] + answer
        mask += [False] * (q - prev) + targets
        prev = r
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def encode_prompt(tokenizer, question: str, num_image_tokens: int) -> np.ndarray:
    """`[P]` int32: the processor's ids of the chat template's prompt for `question` (with its
    ``<image>`` placeholder) and the generation prompt."""
    from experiments.mllm.formats import Turn

    text = render(tokenizer, messages([Turn("human", question)]), True)
    return np.asarray(token_ids(tokenizer, text, num_image_tokens), np.int32)


def encode_answer(tokenizer, answer: str) -> np.ndarray:
    """`[A]` int32: the ids the model must produce after a prompt, `answer`'s tokens in the
    template's assistant turn through EOS (appended when the template has none). Laid out after a
    one-word question: the prompt's tokens end at the generation prompt whatever the question."""
    from experiments.mllm.formats import Turn

    msgs = messages([Turn("human", "Question?"), Turn("gpt", answer)])
    ids, [(q, r)] = _answer_spans(tokenizer, msgs, 1, f"answer {answer!r}")
    return np.asarray(_answer(ids[q:r], tokenizer.eos_token_id)[0], np.int32)
