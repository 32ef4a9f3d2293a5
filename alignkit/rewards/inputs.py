"""What a reward source sees: one rollout batch as prompts, decoded completions and dataset fields."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.errors import AlignkitError
from alignkit.rollout import Rollout


class RewardError(AlignkitError, RuntimeError):
    """A reward source failed or returned something unusable; the message names the source."""


def prompt_text(prompt: Any) -> str:
    """A prompt as plain text: a string as is; a list of chat messages as their contents joined by blank lines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return "\n\n".join(str(m.get("content", "")) for m in prompt)
    raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")


@dataclass
class RewardInputs:
    """One rollout batch as reward sources see it: everything per response (``N`` rows)."""

    prompts: list[Any]  # per response: the prompt as the data gave it (str or chat messages)
    completions: list[str]  # decoded responses
    row_fields: dict[str, list]  # other dataset columns, per response (e.g. "answer")
    ended_with_eos: torch.Tensor  # [N] bool
    rollout: Rollout | None = None  # token ids, for reward models that share the policy's tokenizer

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def prompt_texts(self) -> list[str]:
        return [prompt_text(p) for p in self.prompts]

    @classmethod
    def from_rollout(cls, rollout: Rollout, rows: Sequence[dict] | None = None, *, tokenizer=None) -> RewardInputs:
        """Reward inputs of ``rollout`` generated from ``rows`` (the dataset rows of its prompts, in order).

        Each row's ``prompt`` and other columns (``prompt_ids`` aside) go to every sample of that prompt.
        Without rows the prompts are decoded from ``rollout.prompt_ids`` with the policy ``tokenizer``
        (special tokens dropped, so chat markup leaves only role names behind).
        """
        index = rollout.prompt_index.tolist()
        if rows is None:
            if tokenizer is None:
                raise ValueError("RewardInputs.from_rollout needs the dataset rows or the policy tokenizer.")
            ids = [p[m.bool()].tolist() for p, m in zip(rollout.prompt_ids.cpu(), rollout.prompt_mask.cpu())]
            prompts: list[Any] = tokenizer.batch_decode(ids, skip_special_tokens=True)
            fields: dict[str, list] = {}
        else:
            if len(rows) != rollout.num_prompts:
                raise ValueError(f"{len(rows)} rows for a rollout of {rollout.num_prompts} prompts; pass the rows "
                                 "the rollout was generated from, in the same order.")
            missing = [i for i, r in enumerate(rows) if "prompt" not in r]
            if missing:
                raise ValueError(f"rows {missing[:5]} have no 'prompt' field; reward sources need the prompt.")
            prompts = [rows[i]["prompt"] for i in index]
            keys = sorted({k for r in rows for k in r} - {"prompt", "prompt_ids"})
            fields = {k: [rows[i].get(k) for i in index] for k in keys}
        return cls(prompts=prompts, completions=list(rollout.response_texts), row_fields=fields,
                   ended_with_eos=rollout.ended_with_eos, rollout=rollout)


def episode_rewards(inputs: RewardInputs) -> torch.Tensor:
    """The reward source of multi-turn rollouts: each episode's summed environment rewards
    (``Rollout.episodes.rewards``, :mod:`alignkit.rollout.multiturn`)."""
    episodes = getattr(inputs.rollout, "episodes", None)
    if episodes is None:
        raise RewardError("the environment reward needs a multi-turn rollout (environment.factory set); this "
                          "rollout has no episodes.")
    return episodes.rewards


def as_scores(values: Any, n: int, who: str) -> torch.Tensor:
    """``values`` as a float tensor of ``n`` finite numbers, or a RewardError naming ``who``."""
    try:
        scores = torch.as_tensor(values.tolist() if hasattr(values, "tolist") else list(values),
                                 dtype=torch.float64).float()
    except (TypeError, ValueError) as e:
        raise RewardError(f"{who} must return a list of {n} numbers; got {type(values).__name__} ({e}).") from e
    if scores.ndim != 1 or scores.numel() != n:
        raise RewardError(f"{who} returned {scores.numel() if scores.ndim else 'a scalar'} values for {n} "
                          f"completions; return one number per completion.")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"{who} returned non-finite rewards at positions {bad[:10]} "
                          f"({[float(scores[i]) for i in bad[:3]]}); return finite numbers.")
    return scores
