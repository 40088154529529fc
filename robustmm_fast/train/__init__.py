"""The training engine: one loop that runs a method's recipe (robustmm_fast.train.fit), model
selection on the validation split, atomic resumable checkpoints, DDP under torchrun, and
scoring (evaluate / predict)."""
from ..contract import ENGINE_KEYS, NonFiniteLossError, Recipe, check_finite
from .checkpoint import load_best, load_checkpoint, load_trained, save_atomic
from .evaluate import evaluate, evaluate_masks, predict
from .engine import FitResult, fit
from .memory import keep_freed_memory

__all__ = ["Recipe", "NonFiniteLossError", "check_finite", "fit", "FitResult", "ENGINE_KEYS",
           "evaluate", "evaluate_masks", "predict", "save_atomic", "load_checkpoint", "load_best", "load_trained",
           "keep_freed_memory"]
