"""One training loop for every stage: AdamW + warmup/cosine, orbax checkpoints, exact resume."""
from dfm.train.checkpoint import load_model, save_model
from dfm.train.loop import TrainResult, train
from dfm.train.optim import TrainConfig, learning_rate_schedule, make_optimizer

__all__ = ["TrainConfig", "TrainResult", "learning_rate_schedule", "load_model", "make_optimizer",
           "save_model", "train"]
