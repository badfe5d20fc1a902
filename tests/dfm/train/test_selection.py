"""Model selection by validation loss in `dfm.train.train` (`validate=`, `TrainConfig.validate_every`,
`keep_best`; dfm/train/selection.py). The engine's rule of which validation units select which
model: tests/experiments/engine/test_validation.py."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.train import TrainConfig, train
from dfm.train.selection import BestCheckpoint

TARGET = jnp.array([1.0, 2.0, 3.0])


class Point(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((3,)))


def loss_fn(model, batch, key):
    del key
    return jnp.mean((model.w[...] - batch) ** 2), {}


def batches(step):
    return TARGET


def val_loss(model) -> float:
    """Validation optimum at 0.4 * TARGET: training towards TARGET passes it, so the validation
    curve falls, then rises, and the best step is strictly inside the run."""
    return float(np.mean((np.asarray(model.w[...], np.float64) - 0.4 * np.asarray(TARGET)) ** 2))


CONFIG = TrainConfig(steps=30, learning_rate=0.1, validate_every=3, keep_best=True, checkpoint_every=9, log_every=3)


def _trained(steps: int) -> np.ndarray:
    """Parameters after `steps` updates of an independent run without validation."""
    model = Point()
    train(model, loss_fn, batches, CONFIG.replace(steps=30, validate_every=0, keep_best=False), progress=False,
          stop_after=steps) if steps else None
    return np.asarray(model.w[...])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_keeps_the_parameters_of_the_lowest_validation_loss(tmp_path, checkpointing):
    model = Point()
    result = train(model, loss_fn, batches, CONFIG, checkpoint_dir=tmp_path / "ckpt" if checkpointing else None,
                   progress=False, validate=val_loss)
    steps = [r["step"] for r in result.validation]
    assert steps == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    losses = np.array([r["val_loss"] for r in result.validation])
    assert result.best_step == steps[int(np.argmin(losses))] and 0 < result.best_step < 30
    assert result.best_val_loss == losses.min()
    # the model holds exactly the parameters an independent run has after best_step updates
    np.testing.assert_array_equal(np.asarray(model.w[...]), _trained(result.best_step))
    assert val_loss(model) == pytest.approx(result.best_val_loss, abs=1e-7)


def test_keep_last_returns_the_final_parameters_but_reports_the_best():
    model = Point()
    result = train(model, loss_fn, batches, CONFIG.replace(keep_best=False), progress=False, validate=val_loss)
    np.testing.assert_array_equal(np.asarray(model.w[...]), _trained(30))
    assert 0 < result.best_step < 30


def test_resume_continues_the_same_selection(tmp_path):
    whole = Point()
    full = train(whole, loss_fn, batches, CONFIG, checkpoint_dir=tmp_path / "a", progress=False, validate=val_loss)
    first = Point()
    part = train(first, loss_fn, batches, CONFIG, checkpoint_dir=tmp_path / "b", progress=False, validate=val_loss,
                 stop_after=18)
    assert part.steps_done == 18 and [r["step"] for r in part.validation][-1] == 18
    resumed = Point()
    rest = train(resumed, loss_fn, batches, CONFIG, checkpoint_dir=tmp_path / "b", progress=False, validate=val_loss)
    assert rest.validation == full.validation
    assert (rest.best_step, rest.best_val_loss) == (full.best_step, full.best_val_loss)
    np.testing.assert_array_equal(np.asarray(resumed.w[...]), np.asarray(whole.w[...]))
    # a finished directory returns at once, with the best parameters again
    again = Point()
    done = train(again, loss_fn, batches, CONFIG, checkpoint_dir=tmp_path / "b", progress=False, validate=val_loss)
    assert done.best_step == full.best_step
    np.testing.assert_array_equal(np.asarray(again.w[...]), np.asarray(whole.w[...]))


def test_a_relative_checkpoint_directory_works(tmp_path, monkeypatch):
    """`dfm run` passes run-directory-relative paths (runs/<name>/checkpoints/<stage>); orbax needs
    absolute ones: the best-validation checkpoint resolves them."""
    monkeypatch.chdir(tmp_path)
    model = Point()
    result = train(model, loss_fn, batches, CONFIG, checkpoint_dir="runs/x/checkpoints/s", progress=False,
                   validate=val_loss)
    assert (tmp_path / "runs/x/checkpoints/s/best").is_dir() and 0 < result.best_step < 30
    np.testing.assert_array_equal(np.asarray(model.w[...]), _trained(result.best_step))


def test_validation_rows_reach_the_metrics_file(tmp_path):
    from dfm.train import read_metrics

    path = tmp_path / "metrics.jsonl"
    train(Point(), loss_fn, batches, CONFIG, progress=False, validate=val_loss, metrics_path=path)
    rows = [r for r in read_metrics(path) if "val_loss" in r]
    assert [r["step"] for r in rows] == list(range(0, 31, 3))


def test_config_errors():
    with pytest.raises(ValueError, match="validate_every"):
        TrainConfig(steps=3, validate_every=-1)
    with pytest.raises(ValueError, match="keep_best"):
        TrainConfig(steps=3, keep_best="yes")


def _offers(best: BestCheckpoint, offers) -> list[bool]:
    """Offer `Point`s whose weights are the step number, so a restore shows which step was kept."""
    out = []
    for step, loss in offers:
        model = Point()
        model.w[...] = jnp.full((3,), float(step))
        out.append(best.offer(step, loss, model))
    return out


# (step, validation loss) -> whether it becomes the best: strictly lower only; a tie keeps the earlier
# step; NaN / inf never count.
OFFERS = [(0, 2.0), (3, 1.5), (6, 1.5), (9, float("nan")), (12, 1.25), (15, 1.25), (18, float("inf")),
          (21, 1.3)]
ACCEPTED = [True, True, False, False, True, False, False, False]


@pytest.mark.parametrize("on_disk", [False, True])
def test_best_validation_ties_keep_the_earlier_step(tmp_path, on_disk):
    best = BestCheckpoint(tmp_path / "best" if on_disk else None, fresh=True)
    assert (best.step, best.val_loss) == (None, None)
    assert _offers(best, OFFERS) == ACCEPTED
    assert (best.step, best.val_loss) == (12, 1.25)
    model = Point()
    best.restore(model)
    np.testing.assert_array_equal(np.asarray(model.w[...]), np.full(3, 12.0))
    best.close()
    if on_disk:                          # a resumed run reads the same choice and goes on with it
        again = BestCheckpoint(tmp_path / "best", fresh=False)
        assert (again.step, again.val_loss) == (12, 1.25)
        assert _offers(again, [(24, 1.25), (27, 1.0)]) == [False, True]
        assert again.step == 27
        again.close()
        assert BestCheckpoint(tmp_path / "best", fresh=True).step is None     # a fresh start forgets it


def test_a_flat_or_all_nan_curve():
    flat = BestCheckpoint(None, fresh=True)
    assert _offers(flat, [(0, 1.0), (5, 1.0), (10, 1.0)]) == [True, False, False] and flat.step == 0
    nan = BestCheckpoint(None, fresh=True)
    assert _offers(nan, [(0, float("nan")), (5, float("inf"))]) == [False, False] and nan.step is None
    model = Point()
    nan.restore(model)                   # nothing recorded: the model is left as it is
    np.testing.assert_array_equal(np.asarray(model.w[...]), np.zeros(3))
