"""No file can run code (docs/reliability.md#security).

1. A static scan of every Python file of the project (library, jobs, proofs, benchmarks, notebooks'
   helpers) for the calls that execute code from data: `pickle.load(s)` / `Unpickler`, `marshal`,
   `shelve`, `dill`, `joblib.load`, `torch.load` without `weights_only=True`, `allow_pickle=True`,
   `trust_remote_code=True`, `yaml.load` without a safe loader, and the builtins `eval` / `exec`.
   The scanner is itself checked on snippets holding each pattern, so it cannot pass by seeing nothing.
2. Hostile files: a pickle whose loading runs `touch <marker>` is put in place of each kind of file a
   run directory holds (then `dfm evaluate`) and of every file of an export (then
   `DecentralizedModel.load`); the marker never appears.
3. The one-off converter for legacy pickled featurizers (`scripts/convert_legacy_featurizer.py`, outside the
   package) needs `--i-trust-this-file` and resolves only a featurizer's classes; the RefCOCO refs
   converter (`scripts/convert_refcoco_refs.py`) resolves no global at all. They are the only unpicklers.
"""
from __future__ import annotations

import ast
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("dfm", "experiments", "proofs_check", "benchmarks", "notebooks", "scripts")
#: the only files allowed to unpickle: the flag-guarded legacy converter and the global-free refs converter (item 3)
CONVERTER = ROOT / "scripts" / "convert_legacy_featurizer.py"
REFS_CONVERTER = ROOT / "scripts" / "convert_refcoco_refs.py"

_LOADS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"),
          ("cPickle", "loads"), ("_pickle", "load"), ("_pickle", "loads"), ("marshal", "load"),
          ("marshal", "loads"), ("shelve", "open"), ("dill", "load"), ("dill", "loads"),
          ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("pandas", "read_pickle"),
          ("pd", "read_pickle"), ("np", "loads"), ("numpy", "loads")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def code_from_data(source: str, filename: str = "<snippet>") -> list[str]:
    """Every call in `source` that can execute code held in a file or string, as `file:line: why`."""
    found, tree = [], ast.parse(source, filename)
    aliases = {a.asname: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names if a.asname}                  # `import pickle as p`: p -> pickle
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "_pickle", "cPickle", "marshal", "dill"}:
            names = {a.name for a in node.names} & {"load", "loads", "Unpickler"}
            if names:
                found.append(f"{filename}:{node.lineno}: from {node.module} import {', '.join(sorted(names))}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        first, dot, rest = name.partition(".")
        name = aliases.get(first, first) + dot + rest
        head, _, tail = name.rpartition(".")
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}"
        if (head.rpartition(".")[2], tail) in _LOADS:
            found.append(f"{where}: {name}(...) unpickles")
        elif name in {"eval", "exec", "builtins.eval", "builtins.exec", "__import__"}:
            found.append(f"{where}: builtin {name}(...)")
        elif tail == "load" and head.rpartition(".")[2] == "torch" and not _is_true(keywords.get("weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        elif tail == "load" and head.rpartition(".")[2] == "yaml" and "Safe" not in _dotted(
                keywords.get("Loader", ast.Constant(None))):
            found.append(f"{where}: yaml.load without a safe Loader")
        for key in ("allow_pickle", "trust_remote_code"):
            if _is_true(keywords.get(key)):
                found.append(f"{where}: {key}=True")
    return found


def _project_files() -> list[Path]:
    files = []
    for top in SCANNED:
        files += [p for p in sorted((ROOT / top).rglob("*.py")) if p not in (CONVERTER, REFS_CONVERTER)]
    return files


def test_no_project_file_can_run_code_from_data():
    files = _project_files()
    assert len(files) > 100 and any(p.parts[-2:] == ("decentral", "features.py") for p in files)
    found = [f for p in files for f in code_from_data(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert found == []


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(f)", "import pickle as p\np.loads(b)", "from pickle import load",
    "pickle.Unpickler(f).load()", "import marshal\nmarshal.loads(b)", "torch.load(path)",
    "torch.load(path, weights_only=False)", "np.load(path, allow_pickle=True)",
    "AutoModel.from_pretrained(d, trust_remote_code=True)", "eval('1 + 1')", "exec(code)",
    "yaml.load(text)", "joblib.load(path)", "import pandas as pd\npd.read_pickle(path)",
])
def test_the_scan_sees_each_pattern(snippet):
    assert len(code_from_data(snippet)) == 1


@pytest.mark.parametrize("snippet", [
    "model.eval()", "torch.load(path, weights_only=True)", "np.load(path, allow_pickle=False)",
    "np.load(path)", "yaml.load(text, Loader=yaml.SafeLoader)", "json.loads(text)", "ast.literal_eval(s)",
])
def test_the_scan_passes_data_only_loads(snippet):
    assert code_from_data(snippet) == []


class _Payload:
    """Unpickling this runs `touch <marker>` (what a hostile file would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _poison(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))


def test_a_legacy_pickled_featurizer_is_refused_and_never_runs(tmp_path):
    from dfm.decentral.features import PrecomputedFeaturizer, TextFeaturizer

    marker = tmp_path / "ran"
    _poison(tmp_path / "featurizer.npz", marker)
    for cls in (TextFeaturizer, PrecomputedFeaturizer):
        with pytest.raises(ValueError) as e:
            cls.load(tmp_path / "featurizer.npz")
        assert str(e.value) == (
            f"path {str(tmp_path / 'featurizer.npz')!r} is a pickled featurizer (the format before dfm-featurizer "
            f"version 1); pickles run code when loaded, so dfm never loads them. If the file comes from a source "
            f"you trust, convert it once with: python scripts/convert_legacy_featurizer.py "
            f"{tmp_path / 'featurizer.npz'} <new.npz> --i-trust-this-file")
    assert not marker.exists()


TEXTS = ["the cat sat on the mat", "dogs bark at night", "the quick brown fox", "jumps over lazy dogs",
         "a cat and a dog", "night falls on the mat", "brown dogs and brown cats", "the fox and the hound"] * 2


def _legacy_text_featurizer():
    """A `TextFeaturizer` as versions before dfm-featurizer 1 pickled it (fitted scikit-learn objects)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    from dfm.decentral.features import TextFeaturizer

    tfidf = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit(TEXTS)
    svd = TruncatedSVD(4, random_state=0).fit(tfidf.transform(TEXTS))
    old = TextFeaturizer.__new__(TextFeaturizer)
    old.__dict__ = dict(n_components=4, seed=0, max_features=2**17, min_df=1, sublinear_tf=True,
                        stop_words="english", _tfidf=tfidf, _svd=svd)
    return old, svd.transform(tfidf.transform(TEXTS))


def _convert(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERTER), *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_converter_turns_a_trusted_legacy_file_into_arrays(tmp_path):
    from dfm.decentral.features import TextFeaturizer

    old, expected = _legacy_text_featurizer()
    (tmp_path / "featurizer.pkl").write_bytes(pickle.dumps(old, protocol=pickle.HIGHEST_PROTOCOL))
    refused = _convert(tmp_path / "featurizer.pkl", tmp_path / "new.npz")
    assert refused.returncode == 2 and "A pickle runs code when it is loaded" in refused.stderr
    assert not (tmp_path / "new.npz").exists()
    done = _convert(tmp_path / "featurizer.pkl", tmp_path / "new.npz", "--i-trust-this-file")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"converted {tmp_path / 'featurizer.pkl'} (TextFeaturizer) -> {tmp_path / 'new.npz'}"
    np.testing.assert_allclose(TextFeaturizer.load(tmp_path / "new.npz").transform(TEXTS), expected, atol=1e-10)


def test_the_converter_refuses_a_payload_even_when_trusted(tmp_path):
    marker = tmp_path / "ran"
    _poison(tmp_path / "featurizer.pkl", marker)
    out = _convert(tmp_path / "featurizer.pkl", tmp_path / "new.npz", "--i-trust-this-file")
    assert out.returncode == 2
    assert out.stderr.strip() == (f"convert_legacy_featurizer: refused {tmp_path / 'featurizer.pkl'}: the file "
                                  f"names posix.system, which a featurizer never holds; nothing was executed")
    assert not marker.exists() and not (tmp_path / "new.npz").exists()


def _convert_refs(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REFS_CONVERTER), *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT)


def test_the_refs_converter_writes_the_refs_of_an_official_pickle(tmp_path):
    import json

    # the layout of REFER's refs(unc).p: a list of dicts of ints, strings and lists (protocol 2, as it ships)
    refs = [{"ref_id": 0, "image_id": 581857, "ann_id": 1719310, "split": "testA", "sent_ids": [0, 1],
             "sentences": [{"sent": "woman in gray shirt", "sent_id": 0, "tokens": ["woman", "in"]},
                           {"sent": "left woman", "sent_id": 1, "tokens": ["left"]}], "category_id": 1},
            {"ref_id": 1, "image_id": 3, "ann_id": 4, "split": "train", "sentences": [{"sent": "caf\u00e9"}]}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    out = _convert_refs(tmp_path / "refs(unc).p", tmp_path / "refs.jsonl")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"converted {tmp_path / 'refs(unc).p'} (2 refs) -> {tmp_path / 'refs.jsonl'}"
    lines = (tmp_path / "refs.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == refs


def test_the_refs_converter_resolves_no_global(tmp_path):
    marker = tmp_path / "ran"
    _poison(tmp_path / "refs(unc).p", marker)
    out = _convert_refs(tmp_path / "refs(unc).p", tmp_path / "refs.jsonl")
    assert out.returncode == 2 and "nothing was executed" in out.stderr, out.stderr
    assert not marker.exists() and not (tmp_path / "refs.jsonl").exists()
    (tmp_path / "dict.p").write_bytes(pickle.dumps({"ref_id": 0}, protocol=2))
    out = _convert_refs(tmp_path / "dict.p", tmp_path / "refs.jsonl")
    assert out.returncode == 2 and "not a REFER refs file" in out.stderr
    assert list(tmp_path.glob("*.jsonl")) == [] and list(tmp_path.glob(".*.tmp")) == []


# ---------------------------------------------------------------------------------------------
# Hostile files in a shared run directory and in an export.

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from experiments.cli import main

    out = tmp_path_factory.mktemp("security") / "run"
    assert main(["run", "--config", "tiny", "--out", str(out), "--quiet"]) == 0
    return out


#: one file of each kind a run directory holds that `dfm evaluate` reads
RUN_FILES = ["data/tokens.npz", "data/corpus.jsonl", "data/summary.json", "tokenizer/tokenizer.json",
             "partition/featurizer.npz", "partition/partition.npz", "partition/assignments.json",
             "stages/dense.json", "resolved.toml", "models/dense/_METADATA", "models/expert-0/manifest.ocdbt",
             "models/expert-1/_CHECKPOINT_METADATA"]


@pytest.mark.slow
@pytest.mark.parametrize("relative", RUN_FILES)
def test_a_pickle_in_a_run_directory_never_runs(tiny_run, tmp_path, capsys, relative):
    from experiments.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "ran"
    assert (run / relative).is_file()
    _poison(run / relative, marker)
    (run / "stages" / "evaluate.json").unlink()             # so that evaluate reads everything again
    status = main(["evaluate", "--config", "tiny", "--out", str(run), "--quiet"])
    assert not marker.exists()
    error = capsys.readouterr().err
    if status != 0:                # a file that is read: one clear error naming it (or its model directory)
        assert status == 1 and error.startswith("dfm: error: ")
        assert str(run / relative) in error or str(run / Path(relative).parent) in error, error


@pytest.mark.slow
def test_a_pickle_in_any_file_of_an_export_never_runs(tiny_run, tmp_path):
    from dfm.api import DecentralizedModel

    source = tiny_run / "export" / "decentralized"
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert {"decentral.json", "featurizer.npz", "partition.npz"} <= {str(f) for f in files} and len(files) >= 10
    for relative in files:
        export = tmp_path / str(relative).replace("/", "_")
        shutil.copytree(source, export)
        marker = tmp_path / f"ran-{export.name}"
        _poison(export / relative, marker)
        try:
            DecentralizedModel.load(export)
        except Exception:                         # a clear error or not: what matters is that nothing ran
            pass
        assert not marker.exists(), relative


@pytest.mark.slow
def test_a_symlinked_expert_directory_that_leaves_the_export_is_refused(tiny_run, tmp_path):
    from dfm.api import DecentralizedModel
    from dfm.hf import CheckpointError

    export = tmp_path / "export"
    shutil.copytree(tiny_run / "export" / "decentralized", export)
    shutil.move(export / "experts" / "expert_01", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", export / "experts" / "expert_01")
    with pytest.raises(CheckpointError) as e:
        DecentralizedModel.load(export)
    assert str(e.value) == (f"{export / 'decentral.json'}: 'experts[1]' must stay inside the model directory, got "
                            f"'experts/expert_01', a symbolic link to {str(tmp_path / 'elsewhere')!r}")
    os.unlink(export / "experts" / "expert_01")             # a link that stays inside the export is fine
    shutil.move(tmp_path / "elsewhere", export / "experts" / "real_01")
    os.symlink(export / "experts" / "real_01", export / "experts" / "expert_01")
    assert DecentralizedModel.load(export).num_experts == 2
