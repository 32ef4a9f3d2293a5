"""Forward passes that compute LM-head logits only where they are needed.

The LM head over a 50k-150k vocabulary dominates activation memory; prompt positions never need it.
``target_logits`` asks the model for logits from the first position that predicts a target token
(``logits_to_keep`` with an index tensor, supported by transformers' causal LMs).
"""

from __future__ import annotations

import torch


def first_target_index(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """Smallest position (over the batch) holding a target token; 1 at least (position 0 has no context)."""
    has = labels != ignore_index
    if not bool(has.any()):
        return labels.shape[1] - 1
    first = int(has.float().argmax(dim=1)[has.any(dim=1)].min())
    return max(first, 1)


def target_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                  position_ids: torch.Tensor | None = None, ignore_index: int = -100
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
