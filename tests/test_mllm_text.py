"""Multimodal job: conversation template, image-token expansion, question selection."""
import numpy as np
import pytest

from experiments.mllm.evaluate import select_questions
from experiments.mllm.formats import Turn
from experiments.mllm.modeling import frozen_prefixes
from experiments.mllm.text import (IMAGE_TOKEN, TemplateError, build_tokenizer, decode_answer, encode_answer,
                                   encode_conversation, encode_prompt, image_token_id)

TEXTS = ["<image>\nWhat digit is shown?", "7", "Is the digit even or odd?", "odd", "How many shapes are there?", "3"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS * 20, 300)


def test_image_token_is_one_special_token_after_the_bpe(tok):
    img = image_token_id(tok)
    assert img == len(tok) - 1
    assert tok(f"a {IMAGE_TOKEN} b", add_special_tokens=False)["input_ids"].count(img) == 1


def test_conversation_layout_masks_everything_but_the_answers(tok):
    turns = [Turn("human", TEXTS[0]), Turn("gpt", "7"), Turn("human", TEXTS[2]), Turn("gpt", "odd")]
    ids, mask = encode_conversation(tok, turns, 200, num_image_tokens=4)
    img = image_token_id(tok)
    assert ids[0] == tok.bos_token_id and not mask[0]
    assert (ids == img).sum() == 4 and not mask[ids == img].any()
    # the trained tokens are exactly " 7<eos>" and " odd<eos>"
    answer_ids = ids[mask].tolist()
    assert answer_ids == encode_answer(tok, "7").tolist() + encode_answer(tok, "odd").tolist()
    assert tok.decode(ids, skip_special_tokens=False).count("ASSISTANT:") == 2
    # the prompt of turn 1 is the conversation's prefix up to the first answer
    prompt = encode_prompt(tok, TEXTS[0], 4)
    assert ids[: len(prompt)].tolist() == prompt.tolist()


def test_long_conversations_are_cut_at_a_turn_boundary(tok):
    turns = [Turn("human", TEXTS[0]), Turn("gpt", "7"), Turn("human", TEXTS[2]), Turn("gpt", "odd")]
    full, _ = encode_conversation(tok, turns, 200, 4)
    one, mask = encode_conversation(tok, turns, len(full) - 1, 4)
    first, _ = encode_conversation(tok, turns[:2], 200, 4)
    assert one.tolist() == first.tolist() and mask.sum() == len(encode_answer(tok, "7"))
    with pytest.raises(TemplateError, match="record 'r9'.*max_length=5"):
        encode_conversation(tok, turns, 5, 4, record_id="r9")


def test_decode_answer_stops_at_eos(tok):
    gen = np.concatenate([encode_answer(tok, "odd"), encode_answer(tok, "7")])
    assert decode_answer(tok, gen) == "odd"


def test_frozen_prefixes_of_each_stage_setting():
    assert frozen_prefixes("all") == ()
    assert frozen_prefixes("projector") == ("language_model", "vision_tower")
    assert frozen_prefixes("projector+llm") == ("vision_tower",)


def test_select_questions_round_robin_keeps_mme_pairs():
    rows = [{"id": f"d{i}", "question_type": "digit", "pair_id": None} for i in range(5)]
    rows += [{"id": f"m{i}", "question_type": "mme", "pair_id": f"p{i // 2}"} for i in range(6)]
    got = select_questions(rows, 5)
    ids = [r["id"] for r in got]
    assert ids == ["d0", "m0", "m1", "d1", "m2", "m3"][: len(ids)] and len(ids) in (5, 6)
    assert select_questions(rows, 0) == rows


def test_question_set_gathers_question_and_answer_targets(tok):
    from experiments.mllm.evaluate import QuestionSet

    rows = [{"id": "a", "question": "<image>\nWhat digit is shown?", "answer": "7", "image": 0},
            {"id": "b", "question": "<image>\nHow many shapes are there?", "answer": "odd", "image": 0}]
    img = image_token_id(tok)
    qs = QuestionSet(rows, tok, np.zeros((1, 4, 4, 3), np.uint8), num_image_tokens=2, image_id=img)
    n, width = qs.seqs.shape
    lp = np.tile(np.arange(width - 1, dtype=float), (n, 1)) + 1000 * np.arange(n)[:, None]   # value = target index
    q, a = qs.split_log_probs(lp)
    for i, r in enumerate(rows):
        p = encode_prompt(tok, r["question"], 2)
        ans = encode_answer(tok, r["answer"])
        assert qs.seqs[i, : len(p) + len(ans)].tolist() == p.tolist() + ans.tolist()
        # answer token j is target index len(p) - 1 + j (predicted from the position before it)
        want_a = [1000 * i + len(p) - 1 + j for j in range(len(ans))]
        assert a[i, : len(ans)].tolist() == want_a and not a[i, len(ans):].any()
        # question targets: prompt tokens 1..P-1 except the image tokens (indices 0..P-2 in lp)
        want_q = sum(1000 * i + t for t in range(len(p) - 1) if p[t + 1] != img)
        assert q[i] == want_q
    with pytest.raises(ValueError, match="question 'c'.*0 image tokens"):
        QuestionSet([{"id": "c", "question": "no image", "answer": "x", "image": 0}], tok,
                    np.zeros((1, 4, 4, 3), np.uint8), 2, img)
