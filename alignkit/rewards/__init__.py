"""Reward sources for online RL (PPO, RLOO, GRPO, REINFORCE++) and rejection sampling.

A source scores a batch of sampled responses (:class:`RewardInputs`) and returns one float per response:

- :class:`RewardModelScorer` (``reward.model``): a sequence classifier with its own tokenizer;
- :class:`FunctionReward` (``reward.functions``): ``fn(prompts, completions, **row_fields) -> list[float]``;
- :class:`HTTPReward` (``reward.url``): a JSON endpoint ``{"prompts", "completions", ...} -> {"rewards"}``;
- :class:`AnswerReward` (``reward.answer``): is the answer correct (math-verify, exact, regex, a reasoning-gym
  task's verifier); :class:`FormatReward` (``reward.format_pattern``): does the completion match a regex.

:class:`CombinedReward` adds them up with weights and post-processes the sum (EOS penalty, normalisation,
clipping; :mod:`~alignkit.rewards.combine`). :func:`build_reward` makes one from a
:class:`RewardSourcesConfig` (the ``reward:`` section).
"""

from alignkit.rewards.answers import AnswerReward, FormatReward, extract_answer
from alignkit.rewards.combine import (
    NORMALIZE_CHOICES,
    CombinedReward,
    RewardResult,
    RunningMoments,
    batch_normalize,
    clip_rewards,
    eos_penalty,
)
from alignkit.rewards.config import RewardSourcesConfig, build_reward
from alignkit.rewards.functions import FunctionReward, load_function, target_token_share
from alignkit.rewards.http import HTTPReward
from alignkit.rewards.inputs import RewardError, RewardInputs, episode_rewards, prompt_text
from alignkit.rewards.model import (
    RewardModelFraming,
    RewardModelScorer,
    encoder_special_tokens,
    same_tokenizer,
)

__all__ = [
    "NORMALIZE_CHOICES", "AnswerReward", "CombinedReward", "FormatReward", "FunctionReward", "HTTPReward",
    "RewardError", "RewardInputs", "RewardModelFraming", "RewardModelScorer", "RewardResult", "RewardSourcesConfig",
    "RunningMoments", "batch_normalize", "build_reward", "clip_rewards", "encoder_special_tokens", "eos_penalty",
    "episode_rewards", "extract_answer", "load_function", "prompt_text", "same_tokenizer", "target_token_share",
]
