"""`dfm.DecentralizedModel` on the tiny text job's export: the HF directories load in transformers,
the README quickstart runs, and route / score / generate check against independent computations."""
import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp

from experiments.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["def mean(xs):\n    return sum(xs) / len(xs)\n", "The quick brown fox"]
SNIPPET = '''from dfm import DecentralizedModel

model = DecentralizedModel.load("runs/default/export/decentralized")
texts = ["def mean(xs):\\n    return sum(xs) / len(xs)\\n", "The quick brown fox"]
print(model.route(texts))
print(model.score(texts))
print(model.generate(["import os\\n"], max_new_tokens=32))
'''


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm") / "run"
    assert main(["run", "--config", "tiny", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def model(run_dir):
    from dfm import DecentralizedModel

    return DecentralizedModel.load(run_dir / "export" / "decentralized")


def _quickstart() -> str:
    readme = (ROOT / "README.md").read_text() if (ROOT / "README.md").is_file() else ""
    m = re.search(r"## Quickstart.*?```python\n(.*?)```", readme, re.S)
    return m.group(1) if m else SNIPPET


def test_export_directories_load_in_transformers(run_dir, model):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaForCausalLM

    from dfm.hf import load_pretrained

    export = run_dir / "export"
    assert (export / "dense" / "config.json").is_file()
    manifest = json.loads((export / "decentralized" / "decentral.json").read_text())
    assert manifest["featurizer"] == "featurizer.npz" and manifest["router"]["type"] == "centroid"
    report = json.loads((run_dir / "report.json").read_text())
    assert manifest["router"]["temperature"] == pytest.approx(report["eval"]["centroid_topk_temperature"])
    assert not list((export / "decentralized").rglob("*.pkl"))
    expert = export / "decentralized" / "experts" / "expert_00"
    tok = AutoTokenizer.from_pretrained(str(expert))
    assert tok.chat_template and "### Assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = [tok.bos_token_id] + tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    hf = LlamaForCausalLM.from_pretrained(str(expert)).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(load_pretrained(expert)(np.asarray([ids], np.int32)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert tok.get_vocab() == model.tokenizer.get_vocab()


def test_quickstart_snippet_runs(run_dir, model):
    code = _quickstart().replace("runs/default/export/decentralized", str(run_dir / "export" / "decentralized"))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README-quickstart", "exec"), {})
    printed = buf.getvalue()
    k = model.num_experts
    assert model.route(TEXTS).shape == (2, k) and model.score(TEXTS).shape == (2,)
    out = model.generate(["import os\n"], max_new_tokens=32)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert printed.count("[") >= 3


def test_route_and_score_match_an_independent_mixture(model):
    w = model.route(TEXTS)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    assert (w >= 0).all()
    mix, lp, valid = model.token_log_probs(TEXTS)
    # S8 by hand: log sum_k w_k p_k(x^j | x^{<j}), fixed weights per text
    by_hand = logsumexp(lp + np.log(np.maximum(w.T[:, :, None], 1e-300)), axis=0)
    np.testing.assert_allclose(np.where(valid, mix, 0), np.where(valid, by_hand, 0), atol=1e-5)
    expected = -np.where(valid, by_hand, 0).sum(axis=1) / valid.sum(axis=1)
    np.testing.assert_allclose(model.score(TEXTS), expected, atol=1e-5)


def test_generate_is_deterministic_and_matches_transformers_greedy(run_dir, model):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    from dfm import DecentralizedModel

    a = model.generate(["import os\n", "class A"], max_new_tokens=8)
    assert a == model.generate(["import os\n", "class A"], max_new_tokens=8)
    single = DecentralizedModel.load(run_dir / "export" / "decentralized", available=[1])
    np.testing.assert_allclose(single.route(TEXTS)[:, 1], 1.0)
    got = single.generate(["import os\n"], max_new_tokens=8)[0]
    hf = LlamaForCausalLM.from_pretrained(str(run_dir / "export" / "decentralized" / "experts" / "expert_01")).eval()
    tok = single.tokenizer
    ids = [tok.bos_token_id] + tok("import os\n", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        seq = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    if tok.eos_token_id in seq:
        seq = seq[:seq.index(tok.eos_token_id)]
    assert got == tok.decode(seq, skip_special_tokens=True)
    sampled = model.generate(["import os\n"], max_new_tokens=8, temperature=1.0, seed=3)
    assert sampled == model.generate(["import os\n"], max_new_tokens=8, temperature=1.0, seed=3)


def test_images_not_implemented(model):
    with pytest.raises(NotImplementedError, match="image-text"):
        model.score(TEXTS, images=np.zeros((2, 8, 8, 3), np.uint8))


def test_dfm_export_rewrites_a_finished_runs_export(run_dir, tmp_path, capsys):
    """``dfm export`` on a finished run whose export is gone writes it again: the same files, byte for byte
    (the export is a function of the run directory); on a run without the evaluation it says what to run."""
    import hashlib
    import shutil

    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = digests(run / "export")
    assert any(name.endswith(".safetensors") for name in before)
    shutil.rmtree(run / "export")
    (run / "stages" / "export.json").unlink()
    assert main(["export", "--config", "tiny", "--out", str(run), "--quiet"]) == 0
    assert digests(run / "export") == before
    assert f"[export] dense: {run / 'export' / 'dense'}" in capsys.readouterr().out
    assert main(["export", "--config", "tiny", "--out", str(run), "--quiet"]) == 0      # done: skipped
    shutil.rmtree(run / "export" / "decentralized")          # the marker stays, a directory it names is gone
    assert main(["export", "--config", "tiny", "--out", str(run), "--quiet"]) == 0
    assert digests(run / "export") == before
    assert "no longer exist(s); exporting again" in capsys.readouterr().out
    (run / "stages" / "export.json").unlink()
    (run / "stages" / "evaluate.json").unlink()
    assert main(["export", "--config", "tiny", "--out", str(run), "--quiet"]) == 1
    assert "export needs the evaluation" in capsys.readouterr().err
