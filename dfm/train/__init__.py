"""One training loop for every stage: AdamW + warmup/cosine, orbax checkpoints, exact resume."""
from dfm.train.checkpoint import load_model, save_model
from dfm.train.loop import CheckpointFallbackWarning, TrainingDiverged, TrainResult, append_metrics, read_metrics, train
from dfm.train.optim import TrainConfig, learning_rate_schedule, make_optimizer
from dfm.train.preemption import Preempted
from dfm.train.steps import make_eval_step, make_grad_fn, make_train_step

__all__ = ["CheckpointFallbackWarning", "Preempted", "TrainConfig", "TrainResult", "TrainingDiverged", "append_metrics",
           "learning_rate_schedule", "load_model", "make_eval_step", "make_grad_fn", "make_optimizer",
           "make_train_step", "read_metrics", "save_model", "train"]
