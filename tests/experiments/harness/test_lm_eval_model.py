"""lm-evaluation-harness model ``dfm`` (experiments/harness/lm_eval_model.py) on a tiny text export:
the harness's own CLI (``python -m experiments.harness.lm_eval run --model dfm ...``, offline, local
JSONL tasks of the four request kinds) reports per-sample numbers equal to those computed directly
with `DecentralizedModel` (`token_log_probs` / `score` / `generate`), and its aggregate metrics follow
from them. Needs the ``eval`` extra (skipped without lm-eval)."""
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

from tiny_models import build, record_context_length  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
CONTEXT = 64          # the experts' max_position_embeddings
WINDOW = 20           # rolling window of the CLI run (model_args max_length): the long texts are windowed
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine.",
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
    "import os\nprint(os.getcwd())\n",
    "Every cloud has a silver lining, they say.",
    "for i in range(10):\n    print(i * i)\n",
    "Birds of a feather flock together in spring.",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
]
MC = [("The quick brown", [" fox", " dog", " cat"], 0), ("def mean(xs):", ["\n    return", " pass", "\n"], 0),
      ("", [" A stitch", " The fox"], 1)]
# contexts without trailing space (it would move to the target); those whose greedy continuation
# tokenizes back to the same tokens are the loglikelihood task's greedy rows
CANDIDATES = ["A stitch in", "import os", "Birds of a", "The quick brown fox", "def mean", "Every cloud"]
GEN = [("Every cloud has", "a silver"), ("for i in", "range"), ("The quick", "brown")]


def _export(root: Path, router: str = "centroid") -> Path:
    """Two tiny random causal experts (`tiny_models.build`), a byte-level BPE, the tf-idf featurizer
    and the centroid router of a balanced k-means partition, saved as `save_decentralized` does."""
    from dfm.decentral import CentroidRouter, TextFeaturizer, balanced_kmeans
    from dfm.hf.experts import save_decentralized
    from dfm.models import Decoder, DecoderConfig
    from experiments.engine.tokenizer import train_tokenizer

    tok = train_tokenizer(CORPUS * 4, 320)
    config = DecoderConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           matmul_precision="highest")
    experts = [build(Decoder, config, seed=seed, scale=0.3) for seed in (0, 1)]
    featurizer = TextFeaturizer(n_components=6, stop_words=None).fit(CORPUS)
    features = featurizer.transform(CORPUS)
    partition, _ = balanced_kmeans(features[np.linalg.norm(features, axis=1) > 1e-6], 2)
    chosen = CentroidRouter(partition, temperature=0.3) if router == "centroid" else router
    path = save_decentralized(root, experts, partition, router=chosen, featurizer=featurizer, tokenizer=tok)
    record_context_length(path, CONTEXT)     # the experts' context, as transformers records it
    return path


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("lm-eval") / "dm")


@pytest.fixture(scope="module")
def model(export):
    from dfm import DecentralizedModel

    return DecentralizedModel.load(export)


def _tasks(directory: Path, model) -> dict:
    """Local JSONL tasks (no hub): multiple choice, loglikelihood, rolling and generate_until."""
    greedy = []
    for c, g in zip(CANDIDATES, model.generate(CANDIDATES, max_new_tokens=3)):
        tail = _ids(model, c + g)[len(_ids(model, c)):]      # (random experts emit stray bytes: few round-trip)
        if model.tokenizer.decode(tail) == g and _greedy_by_hand(model, c, 3) == tail:
            greedy.append((c, g))
    assert greedy, "no greedy continuation tokenizes back to its tokens"
    rows = {
        "dfm_mc": [{"context": c, "choices": ch, "gold": g} for c, ch, g in MC],
        "dfm_ll": [{"context": c, "target": t, "greedy": True} for c, t in greedy]
                  + [{"context": c, "target": " zebra", "greedy": False} for c, _ in greedy],
        "dfm_rolling": [{"text": t} for t in CORPUS[:2] + [CORPUS[2] + CORPUS[3], CORPUS[7]]],
        "dfm_gen": [{"prompt": p, "answer": a} for p, a in GEN],
    }
    spec = {
        "dfm_mc": "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
                  "doc_to_target: '{{gold}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n",
        "dfm_ll": "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
                  "target_delimiter: ''\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n",
        "dfm_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                       "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                       "  - metric: bits_per_byte\n",
        "dfm_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
                   "target_delimiter: ' '\ngeneration_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: 6\n"
                   "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
    }
    for name, data in rows.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / name}.jsonl\n"
            f"test_split: test\n{spec[name]}")
    return rows


def _ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _greedy_by_hand(model, context: str, steps: int) -> list[int]:
    """Greedy tokens of the mixture with the context's router weights, from plain forward passes."""
    seq, w = [model.bos_id] + _ids(model, context), model.route([context])[0]
    for _ in range(steps):
        lps = np.stack([np.asarray(jax.nn.log_softmax(e(jnp.asarray([seq], jnp.int32))[0, -1]), np.float64)
                        for e in model.checkpoint.experts])
        seq.append(int(np.argmax(logsumexp(lps + np.log(np.maximum(w, 1e-300))[:, None], axis=0))))
    return seq[-steps:]


def _expected_lls(model, pairs) -> list[float]:
    """log p(continuation | context) of each pair from one `DecentralizedModel.token_log_probs` call on
    the texts context + continuation, mixed by hand (THEORY S8) with each context's router weights."""
    split = []
    for context, continuation in pairs:
        n = len(context) - len(context.rstrip())
        split.append((context[:-n], context[-n:] + continuation) if n else (context, continuation))
    _, lp, _ = model.token_log_probs([c + x for c, x in split])
    w = model.route([c for c, _ in split])
    out = []
    for i, (context, continuation) in enumerate(split):
        n_ctx, n_all = len(_ids(model, context)), len(_ids(model, context + continuation))
        mix = logsumexp(lp[:, i, :n_all] + np.log(np.maximum(w[i], 1e-300))[:, None], axis=0)
        out.append(float(mix[n_ctx:].sum()))
    return out


def _samples(out: Path, task: str) -> list[dict]:
    [file] = list(out.rglob(f"samples_{task}_*.jsonl"))
    return sorted((json.loads(line) for line in file.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def cli_run(export, model, tmp_path_factory):
    """``python -m experiments.harness.lm_eval run --model dfm ...`` on the four local tasks."""
    work = tmp_path_factory.mktemp("lm-eval-run")
    tasks = work / "tasks"
    tasks.mkdir()
    rows = _tasks(tasks, model)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf"),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "experiments.harness.lm_eval", "run", "--model", "dfm",
           "--model_args", f"pretrained={export},batch_size=16,max_length={WINDOW}",
           "--tasks", ",".join(rows), "--include_path", str(tasks), "--log_samples",
           "--output_path", str(work / "out")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(f"lm_eval CLI: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results] = list((work / "out").rglob("results_*.json"))
    return {"rows": rows, "out": work / "out", "results": json.loads(results.read_text())["results"],
            "stdout": proc.stdout}


def _ll_resps(sample) -> list[tuple[float, bool]]:
    return [(float(r[0][0]), str(r[0][1]) == "True") for r in sample["resps"]]


def test_cli_loglikelihood_and_multiple_choice_equal_direct_scores(cli_run, model):
    mc, ll_rows = cli_run["rows"]["dfm_mc"], cli_run["rows"]["dfm_ll"]
    pairs = [(r["context"], c) for r in mc for c in r["choices"]] + [(r["context"], r["target"]) for r in ll_rows]
    want = iter(_expected_lls(model, pairs))
    accs = []
    for sample, row in zip(_samples(cli_run["out"], "dfm_mc"), mc):
        got = [ll for ll, _ in _ll_resps(sample)]
        direct = [next(want) for _ in row["choices"]]
        np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-5)
        print("dfm_mc", row["context"][:16], "harness", got, "direct", direct)
        accs.append(float(np.argmax(direct) == row["gold"]))
    print("dfm_mc acc", cli_run["results"]["dfm_mc"]["acc,none"], np.mean(accs))
    assert cli_run["results"]["dfm_mc"]["acc,none"] == pytest.approx(np.mean(accs))
    lls, greedy = [], []
    for sample, row in zip(_samples(cli_run["out"], "dfm_ll"), ll_rows):
        [(ll, is_greedy)] = _ll_resps(sample)
        direct = next(want)
        print("dfm_ll", row["context"][:16], "harness", ll, is_greedy, "direct", direct, row["greedy"])
        assert ll == pytest.approx(direct, rel=1e-5, abs=1e-5)
        lls.append(ll)
        greedy.append(is_greedy)
    # the model's own greedy continuations are greedy, " zebra" is not
    assert greedy == [r["greedy"] for r in ll_rows]
    assert cli_run["results"]["dfm_ll"]["acc,none"] == pytest.approx(np.mean(greedy))
    assert cli_run["results"]["dfm_ll"]["perplexity,none"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-6)


def _windowed_by_hand(model, text: str, size: int) -> float:
    """Disjoint windows of `size` predictions, each with as much preceding context as fits, scored
    by plain forward passes of the experts mixed with the text's router weights."""
    full = [model.bos_id] + model.tokenizer(text, add_special_tokens=False)["input_ids"]
    w = model.route([text])[0]
    total, start, n = 0.0, 0, len(full) - 1
    while start < n:
        end = min(start + size, n)
        first = max(0, end - size)
        seq = jnp.asarray([full[first:end]], jnp.int32)
        lps = np.stack([np.asarray(jax.nn.log_softmax(e(seq)[0], axis=-1), np.float64)
                        for e in model.checkpoint.experts])             # [K, end - first, vocab]
        targets = np.asarray(full[first + 1:end + 1])
        lp = lps[:, np.arange(end - first), targets]
        mix = logsumexp(lp + np.log(w)[:, None], axis=0)
        total += float(mix[start - first:].sum())
        start = end
    return total


def test_cli_rolling_is_the_score_and_windows_long_texts(cli_run, model):
    samples = _samples(cli_run["out"], "dfm_rolling")
    texts = [r["text"] for r in cli_run["rows"]["dfm_rolling"]]
    lengths = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert min(lengths) <= WINDOW < max(lengths)
    got = [float(s["resps"][0][0]) for s in samples]
    for text, n, ll in zip(texts, lengths, got):
        # fits: exactly the total of DecentralizedModel.score; else windows, by hand
        direct = -float(model.score([text])[0]) * n if n <= WINDOW else _windowed_by_hand(model, text, WINDOW)
        print("dfm_rolling", n, "tokens", "harness", ll, "direct", direct)
        assert ll == pytest.approx(direct, rel=1e-5)
    words = sum(len(re.split(r"\s+", t)) for t in texts)     # the harness's count_words
    res = cli_run["results"]["dfm_rolling"]
    print("dfm_rolling word_perplexity", res["word_perplexity,none"], math.exp(-sum(got) / words))
    assert res["word_perplexity,none"] == pytest.approx(math.exp(-sum(got) / words), rel=1e-6)
    assert res["bits_per_byte,none"] == pytest.approx(-sum(got) / sum(len(t.encode()) for t in texts) / math.log(2),
                                                      rel=1e-6)


def test_cli_generate_until_is_generate_cut_at_the_stop_strings(cli_run, model):
    samples = _samples(cli_run["out"], "dfm_gen")
    direct = model.generate([p for p, _ in GEN], max_new_tokens=6)      # one call, as the CLI's batch
    hits = []
    for sample, text, (_, answer) in zip(samples, direct, GEN):
        cut = text[:min([text.find(s) for s in (".", "\n") if s in text] or [len(text)])]
        print("dfm_gen harness", repr(sample["resps"][0][0]), "direct", repr(cut))
        assert sample["resps"][0][0] == cut
        hits.append(float(cut.strip() == answer))
    assert cli_run["results"]["dfm_gen"]["exact_match,none"] == pytest.approx(np.mean(hits))
    assert "dfm_gen" in cli_run["stdout"]      # the CLI's results table


def test_routing_text_and_bayes_filter_are_the_apis_mixtures(export, tmp_path):
    """In process: ``routing=text`` sums `token_log_probs`' own mixture; with a Bayes-filter export
    every routing is the filter's (it reads the context's tokens)."""
    from dfm import DecentralizedModel
    from experiments.harness.lm_eval_model import DecentralizedLM

    pairs = [("The quick brown", " fox jumps"), ("", "A stitch in time")]
    for path, routing in ((export, "text"), (_export(tmp_path / "bayes", router="bayes"), "context")):
        lm = DecentralizedLM.create_from_arg_string(f"pretrained={path},routing={routing},is_greedy=false",
                                                    {"batch_size": 2, "device": "cpu"})
        got = lm.backend.loglikelihood(pairs)
        direct = DecentralizedModel.load(path)
        for (context, continuation), (ll, greedy) in zip(pairs, got):
            mix, _, valid = direct.token_log_probs([context + continuation])
            n_ctx = len(direct.tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0
            assert ll == pytest.approx(float(mix[0, n_ctx:valid[0].sum()].sum()), rel=1e-6)
            assert greedy is False
    with pytest.raises(ValueError, match="routing"):
        DecentralizedLM(pretrained=str(export), routing="oracle")
    with pytest.raises(ValueError, match=r"model_args: unknown \['temperature'\]"):
        DecentralizedLM(pretrained=str(export), temperature=1.0)
