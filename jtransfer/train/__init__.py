"""Training: state, optimiser partition, the generic step, eval, schedules, loop, checkpoints."""
from jtransfer.train import batched, parallel, schedules
from jtransfer.train.checkpoint import RunCheckpointer, load_model, save_model
from jtransfer.train.evaluate import accuracy, cross_entropy, predict_logits
from jtransfer.train.loop import MetricsWriter, fit
from jtransfer.train.optim import FROZEN, Optimizer, adam, make_optimizer, sgd
from jtransfer.train.state import TrainState
from jtransfer.train.step import init_state, make_train_step, train_step_fn

__all__ = ["FROZEN", "MetricsWriter", "Optimizer", "RunCheckpointer", "TrainState", "accuracy",
           "adam", "batched", "cross_entropy", "fit", "init_state", "load_model", "make_optimizer",
           "make_train_step", "parallel", "predict_logits", "save_model", "schedules", "sgd",
           "train_step_fn"]
