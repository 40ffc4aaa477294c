"""ACE-Step 1.5 model: own PyTorch implementation that loads the released weights key for key."""

from .config import AceStepConfig
from .loading import CheckpointError, LoadedModel, load_acestep
from .model import AceStepModel
from .variants import ModelInfo

__all__ = ["AceStepConfig", "AceStepModel", "CheckpointError", "LoadedModel", "ModelInfo", "load_acestep"]
