"""Prompt layouts (`dfm.prompts`: LLaVA v1, chat templates, image-token expansion) as the multimodal
job uses them, and the job's question selection."""
import numpy as np
import pytest

from experiments.mllm.evaluate import select_questions
from experiments.mllm.formats import Turn
from experiments.mllm.modeling import frozen_prefixes
from dfm import prompts
from dfm.prompts import (IMAGE_TOKEN, TemplateError, decode_answer, encode_answer, encode_conversation, encode_prompt,
                         image_text_tokens, image_token_id, question_prompt)
from experiments.mllm.bpe import build_tokenizer

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


def test_user_questions_and_scored_texts_are_laid_out_as_written_by_hand(tok):
    """`question_prompt` puts "<image>\\n" in front of a bare question (the records' layout);
    `image_text_tokens` lays a text out after / around its image with its own tokens marked."""
    img, bos = image_token_id(tok), tok.bos_token_id

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    want = [bos] + ids("USER: ") + [img] * 3 + ids("\nWhat digit is shown? ASSISTANT:")
    assert [bos] + ids("USER: <image>\nWhat digit is shown? ASSISTANT:") != want      # the expansion matters
    assert question_prompt(tok, "What digit is shown?", 3).tolist() == want
    assert question_prompt(tok, " <image>\nWhat digit is shown? ", 3).tolist() == want
    with pytest.raises(ValueError, match=r"^prompts\[4\]: has 2 '<image>' placeholders \(one image per entry\)$"):
        question_prompt(tok, "<image><image> x", 3, "prompts", 4)
    seq, is_text = image_text_tokens(tok, " odd", 2)
    assert seq.tolist() == [bos, img, img] + ids(" odd") and is_text.tolist() == [False] * 3 + [True] * len(ids(" odd"))
    seq, is_text = image_text_tokens(tok, "a <image> b", 2)
    assert seq.tolist() == [bos] + ids("a ") + [img, img] + ids(" b")
    assert seq[is_text].tolist() == ids("a ") + ids(" b")
    with pytest.raises(ValueError, match=r"^texts\[1\]: has no tokens besides '<image>'$"):
        image_text_tokens(tok, "<image>", 2, "texts", 1)


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


# ---------------------------------------------------------------- pretrained checkpoints' layouts
# llava-hf/llava-1.5-7b-hf's chat template (no EOS after an answer: the job appends one, LLaVA's sep2)
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
CHAT = ["<image>\nWhat digit is shown?", "seven", "Is the digit even or odd?", "odd"]


def llama_like_tokenizer(template):
    """A tiny SentencePiece-style (Metaspace) BPE with Llama's special tokens, BOS added, `<image>`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers import trainers as bpe

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator(["USER: ASSISTANT:\n"] * 5 + CHAT * 20, bpe.BpeTrainer(
        vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.chat_template = template
    return tok


def llava_processor(tok):
    import transformers

    image = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return transformers.LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=8,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       chat_template=tok.chat_template)


@pytest.mark.parametrize("template", ["llava-hf", "llava-v1"])
def test_llava_layout_is_the_processors_input_ids(template):
    """Prompt ids = `LlavaProcessor`'s `input_ids` of the chat template's prompt (16 px / patch 8:
    4 image tokens); the conversation = the processor's ids of the rendered conversation, plus EOS
    after each answer where the template has none; the targets are the answers and their EOS."""
    tok = llama_like_tokenizer(LLAVA_HF_TEMPLATE if template == "llava-hf" else prompts.LLAVA_V1_TEMPLATE)
    proc = llava_processor(tok)
    image = np.zeros((16, 16, 3), np.uint8)
    msgs = prompts.messages([Turn("human" if i % 2 == 0 else "gpt", t) for i, t in enumerate(CHAT)])
    assert msgs[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What digit is shown?"}]
    prompt_text = proc.apply_chat_template(msgs[:1], add_generation_prompt=True)
    assert prompt_text == "USER: <image>\nWhat digit is shown? ASSISTANT:"
    want = proc(images=[image], text=[prompt_text], return_tensors="np")["input_ids"][0]
    got = encode_prompt(tok, CHAT[0], 4)
    np.testing.assert_array_equal(got, want)
    assert got[0] == tok.bos_token_id and (got == image_token_id(tok)).sum() == 4
    ids, mask = encode_conversation(tok, [Turn("human" if i % 2 == 0 else "gpt", t) for i, t in enumerate(CHAT)],
                                    200, 4)
    full = proc(images=[image], text=[proc.apply_chat_template(msgs)], return_tensors="np")["input_ids"][0]
    eos = np.flatnonzero(ids == tok.eos_token_id)
    if template == "llava-hf":   # EOS inserted after each answer; the template's trailing space dropped
        assert len(eos) == 2
        kept = np.delete(ids, eos)
        np.testing.assert_array_equal(kept, full[: len(kept)])
        assert len(full) == len(kept) + 1 and tok.decode(full[len(kept):]).strip() == ""
    else:                        # the processor's ids exactly
        np.testing.assert_array_equal(ids, full)
    assert tok.decode(ids[mask]).replace(" ", "") == "seven</s>odd</s>"
    assert ids[mask][-1] == tok.eos_token_id and mask[eos].all()
    # evaluation: prompt + answer is the conversation's first turn, the answer its targets
    answer = encode_answer(tok, "seven")
    np.testing.assert_array_equal(np.concatenate([got, answer]), ids[: len(got) + len(answer)])
    assert mask[len(got): len(got) + len(answer)].all() and not mask[: len(got)].any()
    assert decode_answer(tok, np.concatenate([answer, answer])) == "seven"
    with pytest.raises(TemplateError, match="record 'r1'.*max_length=9"):
        encode_conversation(tok, [Turn("human", CHAT[0]), Turn("gpt", "seven")], 9, 4, record_id="r1")


def qwen_like_tokenizer():
    """A tiny byte-level BPE with InternVL's image tokens and ChatML's (`<|im_end|>` = EOS, no BOS)."""
    import transformers

    from experiments.engine.tokenizer import train_tokenizer
    backend = train_tokenizer(CHAT * 10 + ["user assistant\n"] * 5, 300).backend_tokenizer
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
        extra_special_tokens={"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                              "end_image_token": "</img>"})
    tok.add_tokens(["<|im_start|>"], special_tokens=True)
    tok.chat_template = prompts.default_template("internvl")
    return tok


def test_internvl_layout_follows_its_template_and_processor_expansion():
    """InternVL: ChatML with `<IMG_CONTEXT>` per image, expanded to `<img>` + `<IMG_CONTEXT>` x n +
    `</img>` (`InternVLProcessor.replace_image_token`); no BOS; `<|im_end|>` ends (and is the EOS of)
    an answer."""
    tok = qwen_like_tokenizer()
    assert prompts.is_internvl(tok) and image_token_id(tok) == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    text = ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat digit is shown?<|im_end|>\n"
            "<|im_start|>assistant\n")
    np.testing.assert_array_equal(encode_prompt(tok, CHAT[0], 4), tok(text)["input_ids"])
    ids, mask = encode_conversation(tok, [Turn("human", CHAT[0]), Turn("gpt", "seven")], 200, 4)
    np.testing.assert_array_equal(ids, tok(text + "seven<|im_end|>")["input_ids"])   # the last "\n" dropped
    assert tok.decode(ids[mask]) == "seven<|im_end|>" and not mask[: len(ids) - mask.sum()].any()
    np.testing.assert_array_equal(encode_answer(tok, "seven"), ids[mask])


def test_init_from_and_clip_features_config_errors_name_the_key(tmp_path):
    """`partition.features` is "tower" or "clip:<dir>"; stage 2 may train the tower only with CLIP
    features; a bad `init_from` directory is a ConfigError naming `init_from` when the job reads it."""
    import json

    from experiments.engine.config import ConfigError
    from experiments.mllm import modeling
    from experiments.registry import load_job

    _, cfg = load_job("mllm-tiny", overrides=["partition.features=clip:/some/clip", "stage2.train=all"])
    assert cfg.partition.clip_dir == "/some/clip" and cfg.stage2.train == "all"
    assert load_job("mllm-tiny")[1].partition.clip_dir == ""
    for overrides, match in ((["partition.features=clip"], "partition.features: must be 'tower' or 'clip:"),
                             (["partition.features=clip:"], "partition.features: must be"),
                             (["stage2.train=projector+tower"], "stage2.train: the tower must stay frozen")):
        with pytest.raises(ConfigError, match=match):
            load_job("mllm-tiny", overrides=overrides)
    _, cfg = load_job("mllm-tiny", overrides=[f"init_from={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="init_from: .*none' is not a directory"):
        modeling.num_image_tokens(cfg)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _, cfg = load_job("mllm-tiny", overrides=[f"init_from={tmp_path}"])
    with pytest.raises(ConfigError, match="init_from: .*config.json has model_type 'llama'"):
        modeling.num_image_tokens(cfg)
