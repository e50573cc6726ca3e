"""Training image flows: configuration, the loop, checkpoints, metrics and pictures.

``train(TrainConfig())`` is what ``flowplugins train`` runs; see :mod:`.loop` for the files it
writes and how it resumes.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, ModelConfig, TrainConfig, load_config_file
from .dequantization import UniformDequantizer, VariationalDequantizer
from .flat_parameters import FlatParameters
from .loop import NonFiniteLossError, Runtime, TrainingError, TrainResult, train
from .metrics import EMA, evaluate_bpd
from .model import build_model, load_model, make_context
from .plotting import plot_bpd_curve, save_grid, save_rows

__all__ = [
    "CheckpointError", "ConfigError", "EMA", "FlatParameters", "ModelConfig",
    "NonFiniteLossError", "Runtime", "TrainConfig", "TrainResult", "TrainingError",
    "UniformDequantizer", "VariationalDequantizer", "build_model", "evaluate_bpd",
    "load_checkpoint", "load_config_file", "load_model", "make_context", "plot_bpd_curve",
    "save_checkpoint", "save_grid", "save_rows", "train",
]
