"""nanoseek: train small DeepSeek-style language models (MLA, MoE, MTP) that never blow up silently."""

from nanoseek.config import PRESETS, DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig
from nanoseek.model import ModelOutput, Transformer
from nanoseek.train.loading import load_model as load_checkpoint

__version__ = "0.1.0"

__all__ = ["PRESETS", "DataConfig", "GuardConfig", "ModelConfig", "ModelOutput", "RunConfig", "TrainConfig",
           "Transformer", "load_checkpoint", "__version__"]
