"""`dfm.api.DecentralizedModel` at its edges, on a directory of two tiny random text experts saved
with `save_decentralized` (Bayes-filter router, context of 12 positions): scores and greedy
generation against NumPy mixtures of plain forward passes; over-long texts, bad `max_new_tokens` /
`temperature` and invalid Unicode refused with exact messages naming the argument; a failed call
leaves the object as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp

from dfm.api import DecentralizedModel
from dfm.decentral import Partition
from dfm.hf.experts import save_decentralized
from dfm.models import Decoder, DecoderConfig
from tiny_models import record_context_length

CONFIG = DecoderConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       tie_word_embeddings=True, matmul_precision="highest")
CONTEXT = 12
PRIORS = np.array([0.25, 0.75])
TEXTS = ["w3 w4 w5 w6", "w7 w3"]


def _tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(12)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", bos_token="w1", eos_token="w2")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    experts = [Decoder(CONFIG, rngs=nnx.Rngs(seed)) for seed in (0, 1)]
    part = Partition(np.eye(2, 3), None, {"algorithm": "test"}, np.array([10, 30]))
    path = save_decentralized(tmp_path_factory.mktemp("api") / "dm", experts, part, router="bayes", priors=PRIORS,
                              tokenizer=_tokenizer())
    record_context_length(path, CONTEXT)     # the experts' context, as transformers records it
    return path


@pytest.fixture(scope="module")
def model(root):
    return DecentralizedModel.load(root)


def _ids(model, text):
    return [model.bos_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _log_probs(model, seq):
    """`[K, len(seq), vocab]` float64 log-probs of one plain forward pass of each expert."""
    return np.stack([np.asarray(jax.nn.log_softmax(e(jnp.asarray([seq], jnp.int32))[0], axis=-1), np.float64)
                     for e in model.checkpoint.experts])


def test_score_is_the_bayes_mixture_of_plain_forward_passes(model):
    assert model.context_length == CONTEXT and model.router.uses_evidence
    got = model.score(TEXTS)
    for i, text in enumerate(TEXTS):
        seq = _ids(model, text)
        lp = _log_probs(model, seq)[:, np.arange(len(seq) - 1), seq[1:]]       # [K, L]: p_k(x^j | BOS, x^{<j})
        before = np.concatenate([np.zeros((2, 1)), np.cumsum(lp, axis=1)[:, :-1]], axis=1)
        log_w = np.log(PRIORS)[:, None] + before                                # THEORY S9: prior * p_k(prefix)
        mix = logsumexp(log_w - logsumexp(log_w, axis=0) + lp, axis=0)
        np.testing.assert_allclose(got[i], -mix.mean(), rtol=1e-5)


def test_generate_is_the_numpy_mixture_argmax_given_the_prompt(model):
    got = model.generate(TEXTS, max_new_tokens=4)
    for text, out in zip(TEXTS, got):
        seq = _ids(model, text)
        lp = _log_probs(model, seq)
        log_w = np.log(PRIORS) + lp[:, np.arange(len(seq) - 1), seq[1:]].sum(axis=1)    # posterior given the prompt
        new = []
        for _ in range(4):
            last = _log_probs(model, seq)[:, -1]
            y = int(np.argmax(logsumexp(last + (log_w - logsumexp(log_w))[:, None], axis=0)))
            log_w = log_w + last[:, y]
            seq, new = seq + [y], new + [y]
        if model.eos_id in new:
            new = new[:new.index(model.eos_id)]
        assert out == model.tokenizer.decode(new, skip_special_tokens=True)
    hot = model.generate(TEXTS[:1], max_new_tokens=4, temperature=1.0, seed=7)
    assert hot == model.generate(TEXTS[:1], max_new_tokens=4, temperature=1.0, seed=7)
    assert model.generate(TEXTS[:1], max_new_tokens=4, temperature=1e-4) == got[:1]   # the coldest sampling = greedy


def test_texts_longer_than_the_context_are_refused_with_both_lengths(model):
    fits = " ".join(["w3"] * CONTEXT)                        # BOS + 12 tokens: the experts read 12 positions
    assert np.isfinite(model.score([fits])).all()
    with pytest.raises(ValueError, match=r"^texts\[1\]: 13 tokens, more than the experts' context of 12 positions "
                                         r"\(max_position_embeddings\); shorten or split it \(no sliding window\)$"):
        model.score(["w3", fits + " w4"])
    with pytest.raises(ValueError, match=r"^prompts\[0\]: 9 prompt tokens \+ max_new_tokens=4, more than the "
                                         r"experts' context of 12 positions \(max_position_embeddings\); shorten the "
                                         r"prompt or lower max_new_tokens$"):
        model.generate([" ".join(["w3"] * 8)], max_new_tokens=4)
    assert len(model.generate([" ".join(["w3"] * 8)], max_new_tokens=3)) == 1


def test_max_new_tokens_and_temperature_are_checked_with_their_names(model):
    for bad in (True, 0, -3, 2.0, "4", None):
        with pytest.raises(ValueError, match=rf"^max_new_tokens: must be an int >= 1, got {bad!r}$"):
            model.generate(["w3"], max_new_tokens=bad)
    with pytest.raises(ValueError, match=r"^max_new_tokens: 13 is more than the experts' context "
                                         r"\(max_position_embeddings\) of 12 positions$"):
        model.generate(["w3"], max_new_tokens=13)
    with pytest.raises(ValueError, match=r"^max_new_tokens: 1000000 is more than"):
        model.generate(["w3"], max_new_tokens=10**6)
    for bad in (1e-30, -1.0, float("nan"), float("inf"), 5e-5):
        with pytest.raises(ValueError, match=r"^temperature: must be 0 \(greedy\) or a finite number >= 0.0001, "
                                             rf"got {bad!r}$"):
            model.generate(["w3"], max_new_tokens=2, temperature=bad)
    with pytest.raises(ValueError, match=r"^temperature: must be a number \(0 = greedy, or >= 0.0001\), got '1'$"):
        model.generate(["w3"], max_new_tokens=2, temperature="1")


def test_invalid_unicode_is_refused_naming_the_entry(model):
    with pytest.raises(ValueError, match=r"^texts\[1\]: not valid Unicode: lone surrogate '\\ud800' at character 3 "):
        model.score(["w3", "w3 \ud800"])
    with pytest.raises(ValueError, match=r"^prompts\[0\]: not valid Unicode: lone surrogate '\\udfff' at character 0 "):
        model.generate(["\udfff"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"^texts\[0\]: not valid Unicode"):
        model.route(["\ud800"])


def _param_arrays(model):
    return [v.get_value() for e in model.checkpoint.experts for _, v in nnx.to_flat_state(nnx.state(e))]


def test_a_failed_call_leaves_the_object_as_it_was(model, monkeypatch):
    """An error raised while a compiled call runs (here an injected RESOURCE_EXHAUSTED from a host
    callback inside the experts' forward pass, as a too-large batch raises it on a device) leaves
    nothing behind: the experts' parameter arrays are the very same objects (inputs of pure jitted
    functions, never replaced by a call's outputs as `nnx.jit` does), and the next call gives the
    numbers a fresh object gives."""
    want_scores, want_text = model.score(TEXTS), model.generate(TEXTS, max_new_tokens=3)
    params = _param_arrays(model)

    def oom(length):
        if int(length) > 5:
            raise MemoryError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 55.00GiB")

    original = Decoder.__call__

    def failing_call(self, tokens, **kwargs):
        jax.debug.callback(oom, jnp.asarray(tokens.shape[1]))
        return original(self, tokens, **kwargs)

    monkeypatch.setattr(Decoder, "__call__", failing_call)
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
        model.score(["w3 w4 w5 w6 w7 w8 w9"])
    monkeypatch.setattr(Decoder, "__call__", original)
    assert all(a is b for a, b in zip(_param_arrays(model), params))
    np.testing.assert_array_equal(model.score(TEXTS), want_scores)
    assert model.generate(TEXTS, max_new_tokens=3) == want_text
    assert all(a is b for a, b in zip(_param_arrays(model), params))
