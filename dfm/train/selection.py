"""Model selection by validation loss: the best-so-far checkpoint of one `dfm.train.train` call.

`BestCheckpoint` keeps the model state with the lowest validation loss seen so far (ties keep the
earlier step, so a flat validation curve selects the earliest model). With a checkpoint
directory it lives in ``<checkpoint_dir>/best`` (an orbax manager holding one step, written
atomically like every orbax save), so a resumed run continues the same selection; without one it
is a host copy in memory. Validation is a deterministic function of the parameters (fixed
batches, fixed key), so replaying steps after a resume reproduces the same values and the same
choice.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dfm.train.checkpoint import (
    MODEL_STATE,
    abstract_tree,
    ensure_writable_dir,
    model_state_dict,
    restore_into,
)

#: the best-validation checkpoint of `dfm.train.train` lives in ``<checkpoint_dir>/<BEST_SUBDIR>``
BEST_SUBDIR = "best"


class BestCheckpoint:
    """The best model state of a training call by validation loss.

    Args:
      directory: ``<checkpoint_dir>/best`` or None (keep a host copy in memory).
      fresh: True when training starts from step 0: any best checkpoint left in `directory` by an
        earlier attempt is removed first (it belongs to a run being redone from scratch).

    Attributes:
      step: the selected step (0 = the model as it came in), or None before the first validation.
      val_loss: its validation loss (nats per target token), or None.
    """

    def __init__(self, directory: str | os.PathLike | None, *, fresh: bool):
        self.directory = None if directory is None else Path(directory)
        self.step: int | None = None
        self.val_loss: float | None = None
        self._memory: dict | None = None
        self._manager: ocp.CheckpointManager | None = None
        if self.directory is None:
            return
        if fresh and self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory = ensure_writable_dir(self.directory, "checkpoint_dir")   # absolute (orbax needs it)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, cleanup_tmp_directories=True),
            item_names=("state", "meta"))
        latest = self._manager.latest_step()
        if latest is not None:
            meta = self._manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            self.step, self.val_loss = int(meta["step"]), float(meta["val_loss"])

    def offer(self, step: int, val_loss: float, model: nnx.Module) -> bool:
        """Record `model` (after `step` updates) if `val_loss` is strictly lower than the best so
        far (a NaN or inf loss never is). Returns True when it became the best."""
        if not math.isfinite(val_loss) or (self.val_loss is not None and not val_loss < self.val_loss):
            return False
        self.step, self.val_loss = int(step), float(val_loss)
        if self._manager is None:
            self._memory = jax.tree.map(np.asarray, jax.device_get(model_state_dict(model)))
            return True
        # the manager keeps one step: save under a step number that only grows (the global step)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(model_state_dict(model)),
            meta=ocp.args.JsonSave({"step": int(step), "val_loss": float(val_loss)})), force=True)
        self._manager.wait_until_finished()
        return True

    def restore(self, model: nnx.Module) -> None:
        """Write the selected state into `model` in place (nothing recorded: no change).

        Raises:
          ValueError: the best checkpoint on disk does not match the model's structure.
        """
        if self.step is None:
            return
        if self._manager is None:
            restore_into(model, jax.tree.map(jax.numpy.asarray, self._memory), MODEL_STATE)
            return
        target = abstract_tree(model_state_dict(model))
        try:
            restored = self._manager.restore(self._manager.latest_step(), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        except Exception as err:  # noqa: BLE001 - orbax raises many types; name the directory
            raise ValueError(f"checkpoint_dir: the best-validation checkpoint in {self.directory} does not "
                             f"restore ({type(err).__name__}: {str(err).splitlines()[0][:200]}); delete it "
                             f"and re-run the stage") from None
        restore_into(model, restored, MODEL_STATE)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
