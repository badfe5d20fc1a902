"""The text job's data edges (issue: security and the edges): a corpus too small for the partition's
features is named by its config key, and very long documents are tokenized in bounded pieces that
give exactly the ids (and the trained tokenizer) of the whole document."""
from pathlib import Path

import numpy as np

from experiments.cli import main


def _corpus(folder: Path, words: list[str], docs: int = 60, length: int = 400) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(docs):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(words, length)))
    return folder


def test_svd_dim_above_the_vocabulary_names_the_key(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus", ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"])
    status = main(["partition", "--config", "tiny", "--out", str(tmp_path / "run"), "--quiet",
                   f"data.corpus={corpus}"])
    assert status == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dfm: error: [partition] svd_dim = 16: the train documents cannot give that many tf-idf + SVD features "
        "(n_components=16 must be smaller than the tf-idf vocabulary size (8) of texts); lower svd_dim or use a "
        "larger corpus")


def test_a_warmup_longer_than_the_stage_is_warned(tmp_path, capsys):
    status = main(["train", "--base", "--config", "tiny", "--out", str(tmp_path / "run"), "base.steps=3",
                   "base.warmup_steps=5", "base.validations=0"])
    assert status == 0
    assert ("[base] warning: warmup_steps = 5 > steps = 3: the learning rate never reaches its peak (0.003); the "
            "warmup is cut to the 3 steps") in capsys.readouterr().out.splitlines()
