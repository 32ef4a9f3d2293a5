"""alignkit: post-training for Hugging Face LLMs (SFT, reward models, DPO family, KTO, PPO/RLOO/GRPO, KD)."""

from alignkit.api import train
from alignkit.config import ConfigError, RunConfig, build_config, load_config

__all__ = ["train", "load_config", "build_config", "RunConfig", "ConfigError"]
__version__ = "0.1.0"
