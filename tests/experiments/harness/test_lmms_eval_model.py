"""lmms-eval model ``dfm`` (experiments/harness/lmms_eval_model.py) on a tiny image-text export: lmms-eval's
own CLI (``python -m lmms_eval --model dfm ...``: the model found through the ``lmms_eval.models``
entry point; offline, a local image-folder task) reports per-sample numbers equal to
`DecentralizedModel.token_log_probs` / `generate` with the same images. Needs the ``eval-mm`` extra
(skipped without lmms-eval)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lmms_eval")
pytestmark = pytest.mark.slow

from tiny_models import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
TEXTS = ["<image>\nWhat digit is shown?", "7", "Is the digit even or odd?", "odd", "How many shapes are there?", "3"]
QUESTIONS = ["What digit is shown?", "Is the digit even or odd?", "How many shapes are there?"]
CHOICES = [["seven", "three", "odd"], ["odd", "even"], ["three", "seven"]]    # no digits: the harness
#                                                    would read a digit target as a choice index
GOLD = [0, 0, 1]
STEPS = 3


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _export(root: Path) -> Path:
    """Two tiny random LLaVA-style experts (`tiny_models.build`), the multimodal job's BPE with
    ``<image>`` (`experiments.mllm.bpe.build_tokenizer`) and the top-2 centroid router of a balanced
    k-means partition of the tower's routing features, saved as the job's export does."""
    from dfm.decentral import CentroidRouter, balanced_kmeans
    from dfm.hf.experts import save_decentralized
    from dfm.inference import routing_features
    from dfm.models import DecoderConfig, MultimodalConfig, MultimodalModel, VisionConfig
    from dfm.models.vision import normalize_pixels
    from dfm.prompts import image_token_id
    from experiments.mllm.bpe import build_tokenizer

    tok = build_tokenizer(TEXTS * 20, 300)
    config = MultimodalConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2, matmul_precision="highest"),
        text=DecoderConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                           matmul_precision="highest"),
        image_token_id=image_token_id(tok))
    experts = [build(MultimodalModel, config, seed=seed, scale=0.3) for seed in (0, 1)]
    images = _images(12)
    features = routing_features(experts[0], lambda rows: normalize_pixels(images[rows]), len(images), 12)
    partition, _ = balanced_kmeans(features, 2)
    return save_decentralized(root, experts, partition, router=CentroidRouter(partition, temperature=0.3, top_k=2),
                              tokenizer=tok)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("lmms-eval") / "dm")


@pytest.fixture(scope="module")
def model(export):
    from dfm import DecentralizedModel

    return DecentralizedModel.load(export)


def _tasks(directory: Path) -> None:
    """Image-folder tasks (PNG files + metadata.jsonl; no hub): multiple choice and generate_until."""
    from PIL import Image

    data = directory / "data"
    data.mkdir()
    for i, im in enumerate(_images(len(QUESTIONS))):
        Image.fromarray(im).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "question": q, "choices": c, "gold": g}) + "\n"
        for i, (q, c, g) in enumerate(zip(QUESTIONS, CHOICES, GOLD))))
    common = (f"dataset_path: imagefolder\ndataset_kwargs:\n  data_dir: {data}\ntest_split: train\n"
              "doc_to_visual: image\ndoc_to_text: '{{question}}'\n")
    (directory / "dfm_mm_mc.yaml").write_text(
        f"task: dfm_mm_mc\n{common}output_type: multiple_choice\ndoc_to_choice: '{{{{choices}}}}'\n"
        "doc_to_target: '{{choices[gold]}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (directory / "dfm_mm_gen.yaml").write_text(
        f"task: dfm_mm_gen\n{common}output_type: generate_until\ndoc_to_target: '{{{{choices[gold]}}}}'\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_new_tokens: {STEPS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def _samples(out: Path, task: str) -> list[dict]:
    [file] = list(out.rglob(f"*samples_{task}.jsonl"))
    return sorted((json.loads(line) for line in file.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def cli_run(export, tmp_path_factory):
    """``python -m lmms_eval --model dfm ...`` on the two local tasks."""
    work = tmp_path_factory.mktemp("lmms-eval-run")
    tasks = work / "tasks"
    tasks.mkdir()
    _tasks(tasks)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf"),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "dfm", "--model_args", f"pretrained={export},batch_size=8",
           "--tasks", "dfm_mm_mc,dfm_mm_gen", "--include_path", str(tasks), "--log_samples",
           "--output_path", str(work / "out")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    print(f"lmms_eval CLI: {time.perf_counter() - start:.1f} s")
    found = list((work / "out").rglob("*results*.json"))    # (lmms-eval exits 0 after an error, without results)
    assert proc.returncode == 0 and len(found) == 1, (proc.stdout[-3000:], proc.stderr[-4000:])
    results = found[0]
    return {"out": work / "out", "results": json.loads(results.read_text())["results"], "stdout": proc.stdout}


def test_cli_multiple_choice_equals_token_log_probs_given_the_image(cli_run, model):
    from dfm.prompts import human_segment, image_text_tokens

    images = _images(len(QUESTIONS))
    nit = model.multimodal_config.num_image_tokens
    accs = []
    for sample, q, choices, gold, image in zip(_samples(cli_run["out"], "dfm_mm_mc"), QUESTIONS, CHOICES, GOLD, images):
        prompt = human_segment(f"<image>\n{q}")            # USER: <image>\n{q} ASSISTANT:
        texts = [f"{prompt} {c}" for c in choices]
        mix, _, valid = model.token_log_probs(texts, images=np.stack([image] * len(texts)))
        want = []
        for i, text in enumerate(texts):
            n_cont = len(image_text_tokens(model.tokenizer, text, nit)[0]) - len(image_text_tokens(model.tokenizer,
                                                                                                    prompt, nit)[0])
            v = int(valid[i].sum())
            want.append(float(mix[i, v - n_cont:v].sum()))
        got = [float(ll) for ll, _ in sample["filtered_resps"]]
        print("dfm_mm_mc", q, "harness", got, "direct", want)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        accs.append(float(np.argmax(want) == gold))
    assert cli_run["results"]["dfm_mm_mc"]["acc,none"] == pytest.approx(np.mean(accs))


def test_cli_generate_until_is_generate_with_the_image(cli_run, model):
    images = _images(len(QUESTIONS))
    direct = model.generate(QUESTIONS, images=images, max_new_tokens=STEPS)    # one call, as the CLI's batch
    hits = []
    for sample, text, choices, gold in zip(_samples(cli_run["out"], "dfm_mm_gen"), direct, CHOICES, GOLD):
        cut = text.split("\n")[0]
        print("dfm_mm_gen harness", repr(sample["filtered_resps"]), "direct", repr(cut))
        assert sample["filtered_resps"] == cut
        hits.append(float(cut == choices[gold]))
    assert cli_run["results"]["dfm_mm_gen"]["exact_match,none"] == pytest.approx(np.mean(hits))


def test_requests_need_exactly_one_image(export):
    from experiments.harness.backend import pil_to_uint8
    from experiments.harness.lmms_eval_model import DecentralizedLMMS

    lmm = DecentralizedLMMS.create_from_arg_string(f"pretrained={export}", {"batch_size": 2})
    lmm.task_dict = {"t": {"test": [{"q": "x"}]}}

    class Req:
        args = ("What is shown?", {"max_new_tokens": 2}, lambda doc: [], 0, "t", "test")

    with pytest.raises(ValueError, match=r"requests\[0\] \(t doc 0\): expected exactly one image, got 0"):
        lmm.generate_until([Req()])
    with pytest.raises(NotImplementedError):
        lmm.generate_until_multi_round([Req()])
    big = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    assert pil_to_uint8(big, 16).shape == (16, 16, 3)
    assert (pil_to_uint8(_images(1)[0], 16) == _images(1)[0]).all()
