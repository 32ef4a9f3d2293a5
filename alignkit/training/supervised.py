"""The supervised next-token objective: cross-entropy on labelled (assistant / completion) tokens.

One :class:`OfflineMethod` that SFT, SeqKD's student stage and the SFT stage of rejection sampling share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.data import IGNORE_INDEX, padded_batch
from alignkit.forward import target_logits
from alignkit.training.loop import OfflineMethod


class SFTMethod(OfflineMethod):
    """Next-token cross-entropy summed over the labelled tokens; items are labelled tokens.

    ``completion_only_loss=False`` trains on every token (prompt included). Packed rows (with
    ``position_ids``, see :func:`alignkit.data.pack_sft`) get no attention mask, so transformers builds the
    block-diagonal causal mask from the positions: attention stays within each packed example.
    """

    def __init__(self, pad_token_id: int, completion_only_loss: bool = True):
        self.pad_token_id = pad_token_id
        self.completion_only_loss = completion_only_loss

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] for r in rows] if self.completion_only_loss else [list(r["input_ids"]) for r in rows]
        batch = padded_batch(ids, labels, self.pad_token_id)
        if "position_ids" in rows[0]:
            # packed rows: positions restart per example; padding positions keep counting up
            del batch["attention_mask"]
            width = batch["input_ids"].shape[1]
            pos = [list(r["position_ids"]) for r in rows]
            batch["position_ids"] = torch.tensor(
                [p + list(range(p[-1] + 1, p[-1] + 1 + width - len(p))) for p in pos], dtype=torch.long)
            batch["n_tokens"] = torch.tensor(sum(len(i) for i in ids))
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if "n_tokens" in batch:
            return int(batch["n_tokens"])
        return int(batch["attention_mask"].sum())

    def token_loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, the logits it was computed from, their targets)."""
        logits, targets = target_logits(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                        position_ids=batch.get("position_ids"))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, logits, targets

    def loss(self, model, batch):
        return self.token_loss(model, batch)[0], {}
