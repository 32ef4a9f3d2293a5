"""Weighted sum of reward sources, then EOS penalty, normalisation and clipping (in that order).

1. ``combined = sum_i weight_i * score_i``            (raw scores kept for logging as ``reward/<name>``)
2. ``- missing_eos_penalty`` for responses cut at max_new_tokens (no EOS)
3. normalisation: none, batch (this rollout's mean/std) or running (mean/std of every reward so far)
4. clipping to ``[-clip, clip]``
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from alignkit.config import ConfigError
from alignkit.rewards.inputs import RewardError, RewardInputs
from alignkit.rollout import Rollout

NORMALIZE_CHOICES = ("none", "batch", "running")


def eos_penalty(rewards: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """``rewards - penalty`` where the response has no EOS (cut at max_new_tokens); unchanged elsewhere."""
    if penalty == 0:
        return rewards
    return rewards - penalty * (~ended_with_eos.to(rewards.device).bool()).to(rewards.dtype)


def clip_rewards(rewards: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``rewards`` clamped to ``[-clip, clip]``; None or 0 = no clipping."""
    return rewards if not clip else rewards.clamp(-clip, clip)


def batch_normalize(rewards: torch.Tensor, all_rewards: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` with the mean/std of ``all_rewards`` (e.g. gathered from every process)."""
    ref = rewards if all_rewards is None else all_rewards
    std = ref.std() if ref.numel() > 1 else torch.zeros((), dtype=ref.dtype, device=ref.device)
    return (rewards - ref.mean()) / (std + eps)


class RunningMoments:
    """Mean and variance of every reward seen so far (Chan et al.'s parallel update), checkpointable."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        x = values.detach().double().flatten().cpu()
        n = x.numel()
        if n == 0:
            return
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def normalize(self, rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (rewards - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class RewardResult:
    rewards: torch.Tensor  # [N] final: combined, eos penalty, normalised, clipped
    combined: torch.Tensor  # [N] weighted sum of the sources before post-processing
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # source name -> [N] unweighted scores

    def metrics(self) -> dict[str, float]:
        """Means over this batch: ``reward/<source>`` (raw), ``reward/combined``, ``reward/final``, ``reward/std``."""
        out = {f"reward/{k}": float(v.float().mean()) for k, v in self.raw.items()}
        out["reward/combined"] = float(self.combined.mean())
        out["reward/final"] = float(self.rewards.mean())
        out["reward/std"] = float(self.rewards.std()) if self.rewards.numel() > 1 else 0.0
        return out


class CombinedReward:
    """Weighted sum of reward sources, then EOS penalty, normalisation and clipping (module docstring).

    ``sources``: ``(name, source, weight)`` triples; a source is a callable ``RewardInputs -> [N] tensor``.
    """

    def __init__(self, sources: Sequence[tuple[str, Callable[[RewardInputs], torch.Tensor], float]], *,
                 normalize: str = "none", clip: float | None = None, missing_eos_penalty: float = 0.0,
                 policy_tokenizer=None):
        if not sources:
            raise ConfigError("no reward source: set reward.model, reward.functions or reward.url.")
        if normalize not in NORMALIZE_CHOICES:
            raise ConfigError(f"reward.normalize={normalize!r}: choose one of {', '.join(NORMALIZE_CHOICES)}.")
        names: list[str] = []
        for name, _, _ in sources:  # unique names: they become metric keys
            unique, i = name, 2
            while unique in names:
                unique, i = f"{name}_{i}", i + 1
            names.append(unique)
        self.sources = [(n, s, float(w)) for n, (_, s, w) in zip(names, sources)]
        self.normalize, self.clip, self.missing_eos_penalty = normalize, clip, missing_eos_penalty
        self.policy_tokenizer = policy_tokenizer
        self.running = RunningMoments()

    def __call__(self, rollout: Rollout | RewardInputs, rows: Sequence[dict] | None = None, *,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RewardResult:
        """Rewards for ``rollout`` (generated from the dataset ``rows``, in order).

        ``gather`` (e.g. ``accelerator.gather``) makes batch/running normalisation use the rewards of every
        process; without it each process normalises with its own batch.
        """
        inputs = rollout if isinstance(rollout, RewardInputs) else RewardInputs.from_rollout(
            rollout, rows, tokenizer=self.policy_tokenizer)
        device = inputs.ended_with_eos.device
        raw: dict[str, torch.Tensor] = {}
        combined = torch.zeros(len(inputs), dtype=torch.float32, device=device)
        for name, source, weight in self.sources:
            scores = source(inputs).detach().float().to(device)
            if scores.shape != combined.shape:
                raise RewardError(f"reward source {name} returned shape {tuple(scores.shape)} for "
                                  f"{len(inputs)} responses.")
            raw[name] = scores
            combined = combined + weight * scores
        rewards = eos_penalty(combined, inputs.ended_with_eos, self.missing_eos_penalty)
        if self.normalize != "none":
            everyone = gather(rewards) if gather is not None else rewards
            if self.normalize == "batch":
                rewards = batch_normalize(rewards, everyone)
            else:
                self.running.update(everyone)
                rewards = self.running.normalize(rewards)
        rewards = clip_rewards(rewards, self.clip)
        return RewardResult(rewards=rewards, combined=combined, raw=raw)

    def state_dict(self) -> dict:
        return {"running": self.running.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "running" in state:
            self.running.load_state_dict(state["running"])
