"""alignkit: post-training for Hugging Face LLMs (SFT, reward models, DPO family, KTO, PPO/RLOO/GRPO, KD)."""

from alignkit.api import build_config, load_config, train
from alignkit.config import ConfigError, RunConfig
from alignkit.errors import AlignkitError

__all__ = ["train", "load_config", "build_config", "RunConfig", "ConfigError", "AlignkitError"]
__version__ = "0.1.0"
