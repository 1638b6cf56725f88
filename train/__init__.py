"""Stage two: the tower and heads, losses, the Ray Data input, the Ray Train loop, export,
sweeps on Ray Tune."""

from train.config import TrainConfig
from train.export import TrainedModel, load
from train.loop import TrainError, TrainResult, train
from train.losses import LOSSES, compute_loss
from train.model import FacetCLIP, ModelConfig, build_model
from train.sweep import SweepConfig, SweepResult, sweep

__all__ = ["TrainConfig", "TrainedModel", "load", "TrainError", "TrainResult", "train", "LOSSES",
           "compute_loss", "FacetCLIP", "ModelConfig", "build_model", "SweepConfig", "SweepResult",
           "sweep"]  # fmt: skip
