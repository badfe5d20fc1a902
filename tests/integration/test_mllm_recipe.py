"""The multimodal job from a pretrained checkpoint, end to end (torch CPU, `peer` extra):
``dfm run --config mllm-tiny init_from=<LLaVA dir> partition.features=clip:<CLIP dir> ...`` on a tiny
random LLaVA (CLIP + Llama, a byte-level BPE with BOS, llava-hf's chat template, `LlavaProcessor`)
and a tiny random `CLIPVisionModelWithProjection`, both written by transformers' `save_pretrained`,
and a few dozen LLaVA-JSONL records with PNG images. Checked against transformers: the run's prompts
are the processor's `input_ids`, stage 1 starts from the checkpoint's logits, the partition / routing
features are `get_image_features` normalised, and the exported dense model and experts load in
`LlavaForConditionalGeneration` with our logits. The same job from a tiny random InternVL (InternViT +
Qwen2, ChatML tokenizer with `<img>` / `<IMG_CONTEXT>`): prompt layout, starting logits, CLIP routing,
and exports that load in `InternVLForConditionalGeneration` with our logits.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.integration, pytest.mark.peer, pytest.mark.slow]

from experiments.cli import main
from experiments.engine.pipeline import open_run
from experiments.engine.training import load_stage_model
from experiments.registry import load_job

LLAVA_HF_TEMPLATE = (   # llava-hf/llava-1.5-7b-hf's (no EOS after an answer)
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
TEXTS = ["USER: What colour is it? ASSISTANT: red", "Is it bright? yes no blue"]


def _tokenizer():
    import transformers
    from tokenizers import processors

    from experiments.engine.tokenizer import train_tokenizer

    backend = train_tokenizer(TEXTS * 20, 300).backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                                extra_special_tokens={"image_token": "<image>"})


def _llava(directory):
    """Tiny LLaVA: CLIP 16 px / patch 8 (4 image tokens, layer -2) + 1-layer Llama; processor beside it."""
    import transformers

    from dfm.hf.parity_tools import randomize_

    tok = _tokenizer()
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=len(tok) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 1e4})
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                                      image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    randomize_(model, 0, std=0.05)
    model.save_pretrained(directory)
    image = transformers.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    transformers.LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=8, num_additional_image_tokens=1,
                                vision_feature_select_strategy="default",
                                chat_template=LLAVA_HF_TEMPLATE).save_pretrained(directory)
    return model


def _clip(directory):
    """Tiny CLIP with projection, 32 px / patch 16 (the run's 16 px images are resized up to it)."""
    import transformers

    from dfm.hf.parity_tools import randomize_

    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16, projection_dim=8)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    randomize_(model, 1, std=0.2)
    model.save_pretrained(directory)
    return model


def _records(root):
    """16 / 4 / 4 records of 24 px reddish or bluish squares; a third of them with a second turn."""
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4), ("test", 4)):
        lines = []
        for i in range(n):
            colour = ("red", "blue")[i % 2]
            px = rng.integers(0, 90, (24, 24, 3), dtype=np.uint8)
            px[..., 0 if colour == "red" else 2] += 160
            Image.fromarray(px).save(root / f"{split}{i}.png")
            conv = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": colour}]
            if i % 3 == 0:
                conv += [{"from": "human", "value": "Is it bright?"}, {"from": "gpt", "value": "no"}]
            lines.append(json.dumps({"id": f"{split}-{i}", "image": f"{split}{i}.png", "conversations": conv}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def _job(overrides, out) -> dict:
    """The finished run `out` of mllm-tiny with `overrides`: its task, config, data, and a loader of
    each stage's model."""
    task, config = load_job("mllm-tiny", overrides=overrides)
    run = open_run(config, out)
    data = task.prepare_data(config, run, log=lambda *a: None)
    return {"task": task, "config": config, "data": data,
            "model": lambda stage: load_stage_model(run, stage, lambda: task.new_model(config, data))}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    hf, clip = _llava(tmp / "llava"), _clip(tmp / "clip")
    _records(tmp / "data")
    d = tmp / "data"
    overrides = [f"init_from={tmp / 'llava'}", f"partition.features=clip:{tmp / 'clip'}", "stage1.train=projector",
                 "stage2.train=all",
                 "data.source=llava", f"data.train={d / 'train.jsonl'}", f"data.val={d / 'val.jsonl'}",
                 f"data.test={d / 'test.jsonl'}", f"data.image_root={d}", "data.image_size=32", "data.max_length=64",
                 "data.max_test=0", "partition.random_control=false", "stage1.steps=2", "stage1.warmup_steps=1",
                 "stage1.checkpoint_every=2", "stage2.steps=4", "stage2.checkpoint_every=4", "eval.max_new_tokens=2",
                 "eval.grid_examples=0"]
    out = tmp / "run"
    assert main(["run", "--config", "mllm-tiny", "--out", str(out), "--quiet", *overrides]) == 0
    return {"tmp": tmp, "run": out, "hf": hf, "clip": clip, **_job(overrides, out)}


def _hf_logits(model, tokens, px):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     pixel_values=torch.tensor(px.transpose(0, 3, 1, 2))).logits.numpy()


def _ours(model, tokens, px):
    with jax.default_matmul_precision("highest"):      # a parity check: full float32 on any backend
        return np.asarray(model(jnp.asarray(tokens), jnp.asarray(px)))


def _question(recipe, i=0):
    """(prompt ids [1, P], normalized pixels [1, 16, 16, 3]) of test question i, laid out by the job."""
    from dfm.prompts import encode_prompt
    from experiments.mllm import modeling

    data = recipe["data"]
    row = data.questions["test"][i]
    prompt = encode_prompt(data.tokenizer, row["question"], data.summary["num_image_tokens"])
    return prompt[None], modeling.pixels(data.arrays["images_test"][[row["image"]]]), row


def test_init_from_uses_the_checkpoint_tokenizer_processor_layout_and_weights(recipe):
    import transformers

    from dfm.hf import tokenizer_fingerprint

    data, tmp = recipe["data"], recipe["tmp"]
    s = data.summary
    image_id = data.tokenizer.convert_tokens_to_ids("<image>")
    assert s["init_from"] == str(tmp / "llava") and s["num_image_tokens"] == 4
    assert s["image_token_id"] == image_id == recipe["hf"].config.image_token_id
    assert data.arrays["images_test"].shape[1:] == (16, 16, 3)           # the checkpoint's size, not data.image_size
    assert tokenizer_fingerprint(data.tokenizer) == tokenizer_fingerprint(transformers.AutoTokenizer.from_pretrained(
        tmp / "llava"))
    # the prompt of a test question is LlavaProcessor's input_ids for the chat template's prompt
    processor = transformers.AutoProcessor.from_pretrained(tmp / "llava")
    prompt, px, row = _question(recipe)
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What colour is it?"}]}], add_generation_prompt=True)
    assert row["question"] == "<image>\nWhat colour is it?" and text == "USER: <image>\nWhat colour is it? ASSISTANT:"
    image = data.arrays["images_test"][row["image"]]
    want = processor(images=[image], text=[text], return_tensors="np")
    np.testing.assert_array_equal(prompt, want["input_ids"])
    # the processor's pixels are ours (CLIP mean / std at the checkpoint's size; NCHW there)
    np.testing.assert_allclose(want["pixel_values"].transpose(0, 2, 3, 1), px, atol=1e-5)
    # stage 1 starts from the checkpoint: the task's initial model has transformers' logits
    start = recipe["task"].new_model(recipe["config"], data)
    assert np.abs(_ours(start, prompt, px) - _hf_logits(recipe["hf"], prompt, px)).max() < 1e-4
    # ... and trained it: stage 1 (train = "projector") kept the checkpoint's tower and LM exactly
    from flax import nnx

    trained = recipe["model"]("stage1")
    for part, same in (("vision_tower", True), ("language_model", True), ("multi_modal_projector", False)):
        pairs = zip(nnx.to_flat_state(nnx.state(getattr(start, part), nnx.Param)),
                    nnx.to_flat_state(nnx.state(getattr(trained, part), nnx.Param)))
        assert all(np.array_equal(a[...], b[...]) for (_, a), (_, b) in pairs) == same, part
    # training sequences: answers + an inserted EOS are the targets, in the processor's token stream
    tokens, mask = data.arrays["tokens"][0], data.arrays["loss_mask"][0]
    assert tokens[0] == data.tokenizer.bos_token_id and (tokens == image_id).sum() == 4
    assert data.tokenizer.decode(tokens[mask]).replace(" ", "") in ("red<|eos|>no<|eos|>", "blue<|eos|>no<|eos|>")


def test_clip_features_partition_and_route(recipe):
    """features.npz are transformers' normalised image embeddings of the images resized to CLIP's 32 px;
    the evaluation's top-1 router picks each test image's nearest centroid in that space; the export
    records the featurizer with the CLIP files beside it."""
    from dfm.hf import clip_image_embeddings
    from experiments.mllm.images import resize_uint8
    from experiments.mllm.routing import RECORD_FILE

    run, data = recipe["run"], recipe["data"]
    feats = np.load(run / "partition" / "features.npz")
    for split in ("train", "test"):
        images = resize_uint8(data.arrays[f"images_{split}"], 32)
        px = (images / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073])) / np.array([0.26862954, 0.26130258,
                                                                                          0.27577711])
        with torch.no_grad():
            ref = recipe["clip"](pixel_values=torch.tensor(px.transpose(0, 3, 1, 2), dtype=torch.float32)).image_embeds
        ref = ref.numpy() / np.linalg.norm(ref.numpy(), axis=1, keepdims=True)
        assert feats[split].shape == (len(images), 8)
        assert np.abs(feats[split] - ref).max() < 1e-5, split
    rep = json.loads((run / "report.json").read_text())
    part = np.load(run / "partition" / "partition.npz")
    z = feats["test"]
    if "mean" in part.files and part["mean"].size:
        z = z - part["mean"]
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    image_of = [r["image"] for r in rep["test_rows"]]
    nearest = np.argmax(z @ part["centroids"].T, axis=1)
    np.testing.assert_array_equal(np.argmax(np.asarray(rep["weights"]["centroid-top1"]), axis=1), nearest[image_of])
    record = json.loads((run / "decentralized" / RECORD_FILE).read_text())
    assert record["featurizer"] == "clip" and record["dim"] == 8 and record["source"] == str(recipe["tmp"] / "clip")
    assert record["preprocess"]["image_size"] == 32 and record["preprocess"]["resize"] == "bicubic"
    copied = run / "decentralized" / record["checkpoint"]
    np.testing.assert_allclose(clip_image_embeddings(copied, px.astype(np.float32)), feats["test"], atol=1e-6)
    # the public API routes an exported CLIP-partitioned model by the same features
    import dfm

    model = dfm.DecentralizedModel.load(run / "decentralized")
    np.testing.assert_allclose(model.image_features(data.arrays["images_test"]), feats["test"], atol=1e-5)
    top1 = dfm.DecentralizedModel.load(run / "decentralized", top_k=1).route(None, images=data.arrays["images_test"])
    np.testing.assert_array_equal(np.argmax(top1, axis=1), nearest)


def test_exports_load_in_transformers_with_our_logits(recipe):
    """hf/dense and every expert of the decentralized directory: `LlavaForConditionalGeneration`
    logits within 1e-4 of the job's models; the exported processor lays the prompt out as the job;
    stage 2 trained the tower too (stage2.train = "all" is allowed with CLIP routing features)."""
    import transformers
    from flax import nnx

    run, model, data = recipe["run"], recipe["model"], recipe["data"]
    prompt, px, _ = _question(recipe, 1)
    for stage, directory in (("dense", run / "hf" / "dense"), ("expert-0", run / "decentralized/experts/expert_00"),
                             ("expert-1", run / "decentralized/experts/expert_01")):
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(directory).eval()
        ours = model(stage)
        assert np.abs(_hf_logits(hf, prompt, px) - _ours(ours, prompt, px)).max() < 1e-4, stage
    processor = transformers.AutoProcessor.from_pretrained(run / "hf" / "dense")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "What colour is it?"}]}], add_generation_prompt=True)
    np.testing.assert_array_equal(processor(images=[data.arrays["images_test"][0]], text=[text],
                                            return_tensors="np")["input_ids"], _question(recipe, 0)[0])
    base, expert = model("stage1"), model("expert-0")
    moved = [np.abs(np.asarray(a[...]) - np.asarray(b[...])).max() for (_, a), (_, b) in
             zip(nnx.to_flat_state(nnx.state(base.vision_tower, nnx.Param)),
                 nnx.to_flat_state(nnx.state(expert.vision_tower, nnx.Param)))]
    assert max(moved) > 0


def _internvl(directory):
    """Tiny InternVL: InternViT 32 px / patch 8, pixel shuffle 0.5 (4 image tokens) + 1-layer Qwen2 with
    tied embeddings; a ChatML tokenizer with InternVL's image tokens (no BOS) beside it. Not an
    `InternVLProcessor`: transformers builds its video processor only with torchvision, not installed."""
    import transformers

    from dfm.hf.parity_tools import randomize_
    from dfm import prompts
    from experiments.engine.tokenizer import train_tokenizer

    backend = train_tokenizer(TEXTS * 20 + ["user assistant\n"] * 5, 300).backend_tokenizer
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
        extra_special_tokens={"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                              "end_image_token": "</img>"})
    tok.add_tokens(["<|im_start|>"], special_tokens=True)
    tok.chat_template = prompts.default_template("internvl")
    vision = transformers.InternVLVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8)
    text = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                                         vision_feature_layer=-1, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    torch.manual_seed(0)
    hf = transformers.InternVLForConditionalGeneration(config).eval()
    randomize_(hf, 0, std=0.05)
    hf.save_pretrained(directory)
    tok.save_pretrained(directory)
    return hf, tok


INTERNVL_PROMPT = ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat colour is it?<|im_end|>\n"
                   "<|im_start|>assistant\n")   # InternVLProcessor's expansion of the ChatML prompt


@pytest.fixture(scope="module")
def internvl(tmp_path_factory):
    """The whole job (data -> CLIP partition -> stage 1 -> dense and experts -> evaluation -> export)
    from the tiny InternVL checkpoint, routed by the tiny CLIP's features. Stage 2 has no warmup: its
    2 steps give each expert 1, which a warmup from 0 would leave untrained."""
    tmp = tmp_path_factory.mktemp("internvl")
    hf, tok = _internvl(tmp / "internvl")
    _clip(tmp / "clip")
    _records(tmp / "data")
    d = tmp / "data"
    overrides = [f"init_from={tmp / 'internvl'}", f"partition.features=clip:{tmp / 'clip'}", "stage1.train=projector",
                 "stage2.train=all", "data.source=llava", f"data.train={d / 'train.jsonl'}",
                 f"data.val={d / 'val.jsonl'}", f"data.test={d / 'test.jsonl'}", f"data.image_root={d}",
                 "data.max_length=64", "data.max_test=2", "partition.random_control=false", "stage1.steps=2",
                 "stage1.warmup_steps=1", "stage1.checkpoint_every=2", "stage2.steps=2", "stage2.warmup_steps=0",
                 "stage2.checkpoint_every=2", "eval.max_new_tokens=2", "eval.grid_examples=0"]
    out = tmp / "run"
    assert main(["run", "--config", "mllm-tiny", "--out", str(out), "--quiet", *overrides]) == 0
    return {"tmp": tmp, "run": out, "hf": hf, "tok": tok, **_job(overrides, out)}


def test_init_from_an_internvl_checkpoint(internvl):
    """InternVL (InternViT + Qwen2, pixel shuffle 0.5: 32 px / patch 8 -> 4 tokens): the data stage
    lays prompts out with ChatML and `<img>` + `<IMG_CONTEXT>` x 4 + `</img>` (no BOS), and the
    task's initial model has transformers' logits on them."""
    data = internvl["data"]
    assert data.summary["num_image_tokens"] == 4 and data.arrays["images_test"].shape[1:] == (32, 32, 3)
    prompt, px, row = _question(internvl)
    assert row["question"] == "<image>\nWhat colour is it?"
    np.testing.assert_array_equal(prompt[0], internvl["tok"](INTERNVL_PROMPT)["input_ids"])
    start = internvl["task"].new_model(internvl["config"], data)
    assert start.config.projector == "internvl" and start.language_model.lm_head is None
    assert np.abs(_ours(start, prompt, px) - _hf_logits(internvl["hf"], prompt, px)).max() < 1e-4


def test_internvl_exports_load_in_transformers_with_our_logits(internvl):
    """The InternVL run's hf/dense and every expert: `InternVLForConditionalGeneration` logits within
    1e-4 of the job's models on a test prompt laid out by the exported tokenizer (its chat template +
    InternVLProcessor's image-token expansion); the experts were trained (they differ from stage 1),
    and the export records the CLIP featurizer."""
    import transformers

    from experiments.mllm.routing import RECORD_FILE

    run, model, data = internvl["run"], internvl["model"], internvl["data"]
    assert json.loads((run / "hf" / "dense" / "config.json").read_text())["architectures"] == [
        "InternVLForConditionalGeneration"]
    tok = transformers.AutoTokenizer.from_pretrained(run / "hf" / "dense")
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "What colour is it?"}]}], tokenize=False, add_generation_prompt=True)
    assert text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * 4 + "</img>") == INTERNVL_PROMPT
    prompt = np.asarray([tok(INTERNVL_PROMPT)["input_ids"]])
    np.testing.assert_array_equal(prompt, _question(internvl, 1)[0])
    px = _question(internvl, 1)[1]
    logits = {}
    for stage, directory in (("dense", run / "hf" / "dense"), ("expert-0", run / "decentralized/experts/expert_00"),
                             ("expert-1", run / "decentralized/experts/expert_01")):
        hf = transformers.InternVLForConditionalGeneration.from_pretrained(directory).eval()
        logits[stage] = _ours(model(stage), prompt, px)
        assert np.abs(_hf_logits(hf, prompt, px) - logits[stage]).max() < 1e-4, stage
    stage1 = _ours(model("stage1"), prompt, px)
    assert all(np.abs(logits[e] - stage1).max() > 1e-4 for e in ("expert-0", "expert-1"))
    record = json.loads((run / "decentralized" / RECORD_FILE).read_text())
    assert record["featurizer"] == "clip" and record["dim"] == 8
    # the evaluation routed each test question to its image's nearest centroid in CLIP space
    rep, part = json.loads((run / "report.json").read_text()), np.load(run / "partition" / "partition.npz")
    z = np.load(run / "partition" / "features.npz")["test"]
    if "mean" in part.files and part["mean"].size:
        z = z - part["mean"]
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    nearest = np.argmax(z @ part["centroids"].T, axis=1)[[r["image"] for r in rep["test_rows"]]]
    assert len(nearest) == 2
    np.testing.assert_array_equal(np.argmax(np.asarray(rep["weights"]["centroid-top1"]), axis=1), nearest)


def test_internvl_export_loads_in_the_public_api(internvl):
    """`dfm.DecentralizedModel.load` of the InternVL run's decentralized directory: CLIP routing features
    equal the partition's, prompts are laid out as the job's (ChatML, `<img>` + `<IMG_CONTEXT>` x 4 +
    `</img>`, no BOS: InternVLProcessor's expansion), and greedy generation is the argmax of the experts'
    mixture computed from plain forward passes."""
    import dfm
    from dfm.prompts import question_prompt

    run, data = internvl["run"], internvl["data"]
    model = dfm.DecentralizedModel.load(run / "decentralized")
    images = data.arrays["images_test"]
    assert model.pixel_stats == data.pixel_stats           # the exported processor's = the run's
    feats = np.load(run / "partition" / "features.npz")["test"]
    np.testing.assert_allclose(model.image_features(images), feats, atol=1e-5)
    question = "<image>\nWhat colour is it?"
    # the layout the API (and the job) builds is InternVLProcessor's expansion of the ChatML prompt
    ids = question_prompt(model.tokenizer, question, data.summary["num_image_tokens"])
    np.testing.assert_array_equal(ids, data.tokenizer(INTERNVL_PROMPT)["input_ids"])
    got = model.generate([question], images=images[:1], max_new_tokens=2)
    # the greedy mixture by hand: full forward passes of the prompt + answer so far, mixed in NumPy
    from scipy.special import logsumexp

    w = model.route([question], images=images[:1])[0]
    seq, px = list(ids), jnp.asarray(model.pixels(images[:1]))
    for _ in range(2):
        logp = np.stack([np.asarray(jax.nn.log_softmax(e(jnp.asarray([seq], jnp.int32), px)[0, -1]), np.float64)
                         for e in model.checkpoint.experts])
        seq.append(int(np.argmax(logsumexp(logp + np.log(np.maximum(w, 1e-300))[:, None], axis=0))))
    new = seq[len(ids):]
    if data.tokenizer.eos_token_id in new:
        new = new[:new.index(data.tokenizer.eos_token_id)]
    assert got == [data.tokenizer.decode(new, skip_special_tokens=True).strip()]
    scores = model.score(["<image>\nWhat colour is it?"], images=images[:1])
    assert scores.shape == (1,) and np.isfinite(scores).all()
