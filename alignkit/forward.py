"""Forward passes that compute LM-head logits only where they are needed.

The LM head over a 50k-150k vocabulary dominates activation memory; prompt positions never need it.

- :func:`target_logits` / :func:`completion_logps` (offline methods): logits from the first position that
  predicts a target token (``logits_to_keep`` with an index tensor), and completion log-probs from them.
- :func:`response_forward` / :func:`score_rollout` (online methods): log-probs (and entropies, critic
  values) of the response tokens of a :class:`~alignkit.rollout.RolloutBatch`, from its last ``R + 1``
  positions only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.data import IGNORE_INDEX
from alignkit.losses.logprobs import token_logps
from alignkit.losses.rl import entropy_from_logits
from alignkit.models import eval_mode
from alignkit.rollout import RolloutBatch


def first_target_index(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Smallest position (over the batch) holding a target token; 1 at least (position 0 has no context)."""
    has = labels != ignore_index
    if not bool(has.any()):
        return labels.shape[1] - 1
    first = int(has.float().argmax(dim=1)[has.any(dim=1)].min())
    return max(first, 1)


def target_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                  position_ids: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting ``labels[:, s:]`` and those targets, where ``s`` is the first target position.

    Returns ``(logits [B, T-s, V], targets [B, T-s])``: ``logits[:, i]`` predicts ``targets[:, i]``.
    """
    start = first_target_index(labels, ignore_index)
    T = input_ids.shape[1]
    keep = torch.arange(start - 1, T - 1, device=input_ids.device)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model class without logits_to_keep: full logits, then slice
        logits = model(**kwargs).logits[:, start - 1:T - 1]
    return logits, labels[:, start:]


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed ``log p(completion tokens)``, their count, and the mean logit over them (detached).

    Only the logits of positions that predict a completion token are computed (``logits_to_keep``), and
    the log-probs are gathered with ``selective_log_softmax`` (no ``[B, T, V]`` log-softmax copy).
    """
    logits, targets = target_logits(model, input_ids, attention_mask, labels)
    mask = targets != IGNORE_INDEX
    logps = token_logps(logits, targets, mask=mask).sum(-1)
    n_tokens = mask.sum(-1)
    mean_logits = (logits.detach().mean(-1, dtype=torch.float32) * mask).sum(-1) / n_tokens.clamp(min=1)
    return logps, n_tokens, mean_logits


@dataclass
class ResponseOutput:
    logps: torch.Tensor  # [B, R] log-probs of the response tokens (float32), 0 off-mask
    entropy: torch.Tensor | None = None  # [B, R] entropy of the sampling distribution per position
    values: torch.Tensor | None = None  # [B, R] critic values V(s_t) (PPO)


def response_forward(model, batch: RolloutBatch, temperature: float, *, entropy: bool = False,
                     entropy_grad: bool = False, **model_kwargs: Any) -> ResponseOutput:
    """Log-probs (and optionally entropies / values) of the response tokens of ``batch``.

    The LM head runs only on the ``R + 1`` last positions (``logits_to_keep``): positions ``P-1 .. P+R-2``
    predict the ``R`` response tokens, prompt positions never reach the vocabulary projection. Logits are
    divided by the sampling ``temperature`` (the distribution the tokens were drawn from), and the sampled
    tokens' log-probs are gathered with :func:`selective_log_softmax` (no ``[B, R, V]`` log-softmax copy).
    A model output with ``token_values`` (PPO's policy+critic module) gets them sliced to the same positions.
    """
    keep = batch.response_width + 1
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False, **model_kwargs)
    try:
        out = model(**kwargs, logits_to_keep=keep)
    except TypeError:  # a model class without logits_to_keep: full logits, sliced below
        out = model(**kwargs)
    logits = out.logits[:, -keep:-1]
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logps = token_logps(logits, batch.response_ids, mask=batch.response_mask)
    ent = None
    if entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(logits if entropy_grad else logits.detach()).float()
            ent = ent * batch.response_mask
    values = getattr(out, "token_values", None)  # not "values": HF outputs are dicts with a values() method
    if values is not None:
        values = values[:, -keep:-1].float()
    return ResponseOutput(logps=logps, entropy=ent, values=values)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


@torch.no_grad()
def score_rollout(model, batch: RolloutBatch, temperature: float, micro_batch_size: int, *, autocast=None,
                  entropy: bool = False, **model_kwargs: Any) -> ResponseOutput:
    """:func:`response_forward` over the whole rollout in micro-batches, without gradients, in eval mode
    (the model's mode comes back after). Every process runs the same number of forwards (ZeRO-3 safe)."""
    parts: list[ResponseOutput] = []
    with eval_mode(model):
        for index in torch.arange(len(batch)).split(micro_batch_size):
            with autocast() if autocast is not None else contextlib.nullcontext():
                parts.append(response_forward(model, batch.select(index), temperature, entropy=entropy,
                                              **model_kwargs))
    R = batch.response_width

    def cat(name: str) -> torch.Tensor | None:
        xs = [getattr(p, name) for p in parts]
        return None if xs[0] is None else torch.cat([_pad_to(x, R) for x in xs])

    return ResponseOutput(logps=cat("logps"), entropy=cat("entropy"), values=cat("values"))
