"""The supervised next-token objective: cross-entropy on labelled (assistant / completion) tokens.

One :class:`OfflineMethod` that SFT, SeqKD's student stage and the SFT stage of rejection sampling share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.data import IGNORE_INDEX
from alignkit.forward import BatchLayout, batch_logps, target_logits
from alignkit.training.loop import OfflineMethod


class SFTMethod(OfflineMethod):
    """Next-token cross-entropy summed over the labelled tokens; items are labelled tokens.

    ``completion_only_loss=False`` trains on every token (prompt included). Rows are laid out by
    ``layout`` (:class:`~alignkit.forward.BatchLayout`: right-padded, or padding-free with per-sequence
    position ids). Packed rows (with ``position_ids``, see :func:`alignkit.data.pack_sft`) get no attention
    mask, so transformers builds the block-diagonal causal mask from the positions: attention stays within
    each packed example. ``chunked`` computes the loss from the LM head run chunk by chunk at the labelled
    positions only (:func:`alignkit.forward.batch_logps`), without a ``[tokens, vocab]`` logits tensor.
    """

    def __init__(self, pad_token_id: int, completion_only_loss: bool = True, *, layout: BatchLayout | None = None,
                 chunked: bool = True):
        self.pad_token_id = pad_token_id
        self.completion_only_loss = completion_only_loss
        self.layout, self.chunked = layout or BatchLayout(), chunked

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [list(r["input_ids"]) for r in rows]
        labels = [list(r["labels"]) for r in rows] if self.completion_only_loss else [list(i) for i in ids]
        positions = [list(r["position_ids"]) for r in rows] if "position_ids" in rows[0] else None
        if positions is not None and not self.completion_only_loss:
            # packed examples: no token learns to predict the first token of the next example
            labels = [[IGNORE_INDEX if p == 0 else t for p, t in zip(pos, lab)] for pos, lab in zip(positions, labels)]
        return self.layout.sequences(ids, labels, self.pad_token_id, position_ids=positions)

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["target_ids"])

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["n_tokens"])

    def token_loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, the logits it was computed from, their targets): full logits, for callers
        that also need the distributions (SeqKD's kl_to_teacher)."""
        logits, targets = target_logits(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                        position_ids=batch.get("position_ids"))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, logits, targets

    def loss(self, model, batch):
        if not self.chunked:
            return self.token_loss(model, batch)[0], {}
        return -batch_logps(model, batch)[0].sum(), {}
