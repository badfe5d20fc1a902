"""metrics.jsonl: `dfm.train.train(metrics_path=...)` appends one JSON line per logged row, a resumed
run continues the file without duplicates, and every training stage of a job writes one."""
import json
import shutil

import jax
import jax.numpy as jnp
import pytest
from tiny_models import lm_loss, same_numbers, tiny_decoder

from dfm.models import DecoderConfig
from dfm.train import TrainConfig, train
from dfm.train.loop import append_metrics, read_metrics
from experiments.engine.plots import loss_curves, stage_family

CONFIG = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                       num_kv_heads=2)
DATA = jax.random.randint(jax.random.key(0), (4, 12), 0, 50, dtype=jnp.int32)
# the same optimizer setting as tests/dfm/train/test_loop.py's RESUME_CONFIG (one compilation per session)
RESUME_CONFIG = TrainConfig(steps=10, learning_rate=5e-3, warmup_steps=2, log_every=2, checkpoint_every=4,
                            weight_decay=0.1, seed=7)


def batches(step):
    return jnp.roll(DATA, step % 3, axis=0)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _timeless(rows):
    return [{k: v for k, v in r.items() if k not in ("wall", "tokens_per_s")} for r in rows]


def test_one_line_per_logged_row_with_the_keys(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    result = train(tiny_decoder(CONFIG), lm_loss, batches, RESUME_CONFIG, progress=False, metrics_path=path,
                   tensorboard_dir=tmp_path / "tb")           # no tensorboard installed: skipped silently
    rows = _lines(path)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    for row, hist in zip(rows, result.history, strict=True):
        assert {"step", "loss", "lr", "grad_norm", "wall", "tokens", "tokens_per_s"} <= set(row)
        assert row["tokens_per_s"] > 0
        assert {k: v for k, v in row.items() if k != "tokens_per_s"} == hist   # the history row, as logged


def test_resume_continues_the_file_without_duplicates(tmp_path):
    straight = tmp_path / "straight.jsonl"
    train(tiny_decoder(CONFIG), lm_loss, batches, RESUME_CONFIG, progress=False, metrics_path=straight)
    ckpt, path = tmp_path / "ckpt", tmp_path / "resumed.jsonl"
    train(tiny_decoder(CONFIG), lm_loss, batches, RESUME_CONFIG, checkpoint_dir=ckpt, stop_after=6,
          progress=False, metrics_path=path)
    assert [r["step"] for r in _lines(path)] == [2, 4, 6]
    # a crash after the step-6 checkpoint left a row of step 8 and half a line: both are dropped
    with open(path, "a") as f:
        f.write(json.dumps({"step": 8, "loss": 99.0}) + "\n" + '{"step": 9, "lo')
    train(tiny_decoder(CONFIG, seed=1), lm_loss, batches, RESUME_CONFIG, checkpoint_dir=ckpt, progress=False,
          metrics_path=path)
    assert [r["step"] for r in _lines(path)] == [2, 4, 6, 8, 10]
    assert same_numbers(_timeless(_lines(path)), _timeless(_lines(straight)))


def test_validation_rows_are_read_and_plotted(tmp_path):
    path = tmp_path / "m.jsonl"
    append_metrics(path, {"step": 3, "loss": 2.0})
    append_metrics(path, {"step": 3, "val_loss": 2.5})
    assert read_metrics(path)[1] == {"step": 3, "val_loss": 2.5}
    assert read_metrics(tmp_path / "missing.jsonl") == []
    stages = {"base": {"history": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]},
              "dense": {"history": [{"step": 1, "loss": 2.0}], "validation": [{"step": 1, "val_loss": 2.2}]},
              **{f"expert-{k}": {"history": [{"step": 1, "loss": 2.0 + k}]} for k in range(12)},
              "random-0": {"history": [{"step": 1, "loss": 2.0}]}, "router": {"history": [{"step": 1, "loss": 0.5}]}}
    assert loss_curves(stages, tmp_path / "plots" / "loss.png").stat().st_size > 0
    assert [stage_family(s) for s in ("base", "dense", "expert-3", "random-1", "router")] == \
        ["stage 1", "dense", "experts", "random control", "router"]


@pytest.mark.slow
def test_every_training_stage_of_the_tiny_job_writes_metrics(tmp_path):
    """A shortened tiny run (overrides on the command line): metrics.jsonl in logs/<stage>/ of
    every training stage, its last row the stage's last step."""
    from experiments.cli import main
    from experiments.engine.rundir import RunDir

    out = tmp_path / "run"
    overrides = ["base.steps=4", "stage2.steps=4", "base.checkpoint_every=2", "eval.num_samples=1",
                 "eval.sample_length=4", "data.max_eval_docs=2"]
    assert main(["run", "--config", "tiny", "--out", str(out), "--quiet", *overrides]) == 0
    run = RunDir(out)
    stages = [p.stem for p in (out / "stages").glob("*.json") if p.stem not in ("partition", "evaluate", "export")]
    assert {"base", "dense", "expert-0", "expert-1", "random-0", "random-1"} <= set(stages)
    for stage in stages:
        lines = _lines(run.metrics(stage))
        rows = [r for r in lines if "loss" in r]
        marker = run.stage_info(stage)
        assert rows and rows[-1]["step"] == marker["steps"], stage
        assert [r["step"] for r in rows] == [h["step"] for h in marker["history"]], stage
        # validation rows (step 0 and every validate_every steps) are the marker's validation curve
        val = [{"step": r["step"], "val_loss": r["val_loss"]} for r in lines if "val_loss" in r]
        assert val == marker["validation"] and val[0]["step"] == 0 and val[-1]["step"] == marker["steps"], stage
    assert (out / "plots" / "loss_curves.png").is_file()
    shutil.rmtree(out)
