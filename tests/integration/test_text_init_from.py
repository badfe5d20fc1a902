"""`model.init_from`: the text job started from a local HF Llama / Qwen2 checkpoint on a user corpus
folder. Tiny random transformers models (weights perturbed so every tensor matters) with tiny
tokenizers: the job's token ids are `AutoTokenizer`'s, its initial model's logits are transformers',
stage 1 starts from the checkpoint, and the exported dense model is transformers' again."""
import json

import numpy as np
import pytest
from flax import nnx

from experiments.cli import main
from experiments.engine.pipeline import open_run
from experiments.engine.training import load_stage_model
from experiments.engine.task import DataError
from experiments.engine.tokenizer import load_pretrained_tokenizer, special_token_ids
from experiments.registry import load_job
from experiments.text import modeling
from experiments.text.export import CHAT_TEMPLATE
from experiments.text.task import TextTask

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.integration, pytest.mark.slow]
TASK = TextTask()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = {0: ["rocket", "orbit", "moon", "launch", "planet", "star", "comet", "gravity", "telescope", "astronaut"],
         1: ["flour", "sugar", "oven", "butter", "recipe", "dough", "knife", "onion", "garlic", "simmer"]}
TEXTS = [" ".join(np.random.default_rng(i).choice(WORDS[i % 2], size=50)) + f", note {i}.\n" for i in range(36)]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(TEXTS):
        (root / ("space" if i % 2 else "kitchen")).mkdir(exist_ok=True)
        (root / ("space" if i % 2 else "kitchen") / f"{i:02d}.md").write_text(text, encoding="utf-8")
    return root


def _bpe(special):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():     # norms off 1, biases off 0: every tensor's mapping is tested
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _llama(directory):
    """Llama-3 style: a fast BPE tokenizer whose post-processor adds <s>; untied, GQA, sharded."""
    from tokenizers import processors

    tok = _bpe(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False, initializer_range=0.2, rope_theta=500.0)
    _perturbed(transformers.LlamaForCausalLM(config)).save_pretrained(directory, max_shard_size="40KB")
    hf_tok.save_pretrained(directory)
    return directory


def _qwen2(directory):
    """Qwen2 style: Qwen2Tokenizer (no BOS, EOS <|endoftext|>, ChatML template), q/k/v biases,
    tied embeddings, an embedding larger than the tokenizer."""
    vocab = json.loads(_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).to_str())["model"]
    hf_tok = transformers.Qwen2Tokenizer(vocab=vocab["vocab"], merges=[tuple(m) for m in vocab["merges"]])
    hf_tok.chat_template = CHATML
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(hf_tok) + 8, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, initializer_range=0.2)
    _perturbed(transformers.Qwen2ForCausalLM(config)).save_pretrained(directory)
    hf_tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    build = {"llama": _llama, "qwen2": _qwen2}[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param))


def _hf_logits(directory, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy(), type(model).__name__


def _overrides(directory, corpus_dir):
    return [f"model.init_from={directory}", f"data.corpus={corpus_dir}"]


def test_data_tokens_and_initial_logits_are_transformers(checkpoint, corpus_dir, tmp_path):
    kind, directory = checkpoint
    _, config = load_job("tiny", None, _overrides(directory, corpus_dir))
    data = TASK.prepare_data(config, open_run(config, tmp_path / "run"), log=lambda *a: None)
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    eos = reference.eos_token_id
    bos = reference.bos_token_id if kind == "llama" else eos               # Qwen2 has no BOS: EOS starts
    hf_vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    s = data.summary
    assert (s["vocab_size"], s["bos_id"], s["eos_id"]) == (hf_vocab, bos, eos)
    assert s["tokenizer"] == {"kind": "pretrained", "init_from": str(directory)}
    for split in data.splits.values():
        ids = reference(split.texts, add_special_tokens=False)["input_ids"]
        assert [t.tolist() for t in split.tokens] == [x + [eos] for x in ids]
    # the model stage 1 starts from: the checkpoint's architecture and weights, not [model]'s
    model = modeling.new_model(config, data.vocab_size, config.seed)
    assert (model.config.hidden_size, model.config.num_layers, model.config.vocab_size) == (32, 2, hf_vocab)
    x = np.concatenate([[bos], data.splits["train"].tokens[0][:23]])[None].repeat(2, 0)
    x[1, 5:] = x[1, ::-1][5:]
    theirs, _ = _hf_logits(directory, x)
    np.testing.assert_allclose(np.asarray(model(x)), theirs, atol=1e-4)
    abstract = nnx.eval_shape(lambda: modeling.new_model(config, data.vocab_size, config.seed))
    def shapes(m):
        return {k: (v.shape, v.dtype) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assert shapes(abstract) == shapes(model)


def test_run_from_checkpoint_exports_transformers_models(checkpoint, corpus_dir, tmp_path):
    kind, directory = checkpoint
    out = tmp_path / "run"
    overrides = [*_overrides(directory, corpus_dir), "base.steps=2", "base.learning_rate=1e-6", "base.warmup_steps=0",
                 "stage2.steps=4", "partition.random_control=false", "eval.num_samples=0", "data.max_eval_docs=4",
                 "eval.bootstrap_resamples=100"]
    assert main(["run", "--config", "tiny", "--out", str(out), "--quiet", *overrides]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {s["name"] for s in report["systems"]} >= {"dense", "base", "ensemble/bayes"}
    _, config = load_job("tiny", None, overrides)
    run = open_run(config, out)
    data = TASK.prepare_data(config, run, log=lambda *a: None)
    x = np.concatenate([[data.bos_id], data.splits["test"].tokens[0][:15]])[None]
    # stage 1 continued the checkpoint (2 AdamW steps of 1e-6 barely move it)
    theirs, _ = _hf_logits(directory, x)
    np.testing.assert_allclose(np.asarray(load_stage_model(run, "base", lambda: TASK.new_model(config, data))(x)),
                               theirs, atol=2e-3)
    # the exported dense model is a transformers model of the same family with our logits
    dense = load_stage_model(run, "dense", lambda: TASK.new_model(config, data))
    exported, family = _hf_logits(out / "export" / "dense", x)
    assert family == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[kind]
    np.testing.assert_allclose(exported, np.asarray(dense(x)), atol=1e-4)
    assert np.abs(exported - theirs).max() > 1e-2                          # stage 2 did train it
    # ... with the checkpoint's tokenizer and chat template (ours when it has none)
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "export" / "dense"))
    reference = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert tok(TEXTS[:3], add_special_tokens=False)["input_ids"] == reference(TEXTS[:3], add_special_tokens=False)[
        "input_ids"]
    assert tok.get_vocab() == reference.get_vocab()
    assert tok.chat_template == (CHATML if kind == "qwen2" else CHAT_TEMPLATE)
    assert tok.bos_token_id == data.bos_id
    if kind == "qwen2":                     # the declared BOS changes no encoding, and the API can load it
        assert tok(TEXTS[:2])["input_ids"] == reference(TEXTS[:2])["input_ids"]
        from dfm import DecentralizedModel

        score = DecentralizedModel.load(out / "export" / "decentralized").score([TEXTS[0]])
        assert np.isfinite(np.asarray(score)).all()


def test_bad_checkpoint_is_a_data_error(tmp_path, corpus_dir):
    _, config = load_job("tiny", None, _overrides(tmp_path / "missing", corpus_dir))
    with pytest.raises(DataError, match=r"model\.init_from: .*missing is not a directory"):
        modeling.new_model(config, 0, 0)
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text('{"model_type": "clip_vision_model"}')
    _, config = load_job("tiny", None, _overrides(tmp_path / "clip", corpus_dir))
    with pytest.raises(DataError, match=r"model\.init_from: .*config\.json: unsupported model_type"):
        modeling.decoder_config(config, 0)
    with pytest.raises(DataError, match=r"clip: no tokenizer files \(none of tokenizer\.json"):
        load_pretrained_tokenizer(tmp_path / "clip")
    no_eos = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe(["<s>"]), bos_token="<s>")
    with pytest.raises(DataError, match="no eos_token"):
        special_token_ids(no_eos)
    with_eos = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe(["<s>", "</s>"]), eos_token="</s>")
    assert special_token_ids(with_eos) == {"bos_id": 1, "eos_id": 1, "pad_id": 1}   # no BOS, no PAD: EOS
