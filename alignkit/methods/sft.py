"""Supervised fine-tuning: next-token cross-entropy on assistant (completion) tokens.

Recipe: accelerator → tokenizer → data (kind "sft") → model (full / LoRA / QLoRA) → engine.fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignkit.config import RunConfig, opt, register_method_config
from alignkit.engine import OfflineMethod, fit, setup_accelerator
from alignkit.forward import target_logits


@register_method_config("sft")
@dataclass
class SFTConfig:
    packing: bool = opt(False, "Pack several short examples into each max_length row (best-fit; attention stays per example).")
    completion_only_loss: bool = opt(True, "Loss on assistant/completion tokens only; false trains on prompt tokens too.")

    def validate(self, run: RunConfig) -> None:
        pass


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class SFTMethod(OfflineMethod):
    def __init__(self, pad_token_id: int, completion_only_loss: bool = True):
        self.pad_token_id = pad_token_id
        self.completion_only_loss = completion_only_loss

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        if self.completion_only_loss:
            labels = [r["labels"] for r in rows]
        else:
            labels = [list(r["input_ids"]) for r in rows]
        batch = {"input_ids": pad_right(ids, self.pad_token_id), "labels": pad_right(labels, -100)}
        if "position_ids" in rows[0]:
            # packed rows: position_ids restart per example; no attention_mask lets transformers build
            # the block-diagonal causal mask from them. Padding positions keep counting up.
            pos = [list(r["position_ids"]) for r in rows]
            width = batch["input_ids"].shape[1]
            batch["position_ids"] = torch.tensor(
                [p + list(range(p[-1] + 1, p[-1] + 1 + width - len(p))) for p in pos], dtype=torch.long)
            batch["n_tokens"] = torch.tensor(sum(len(i) for i in ids))
        else:
            mask = torch.zeros_like(batch["input_ids"])
            for i, s in enumerate(ids):
                mask[i, : len(s)] = 1
            batch["attention_mask"] = mask
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if "n_tokens" in batch:
            return int(batch["n_tokens"])
        return int(batch["attention_mask"].sum())

    def loss(self, model, batch):
        logits, targets = target_logits(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                        position_ids=batch.get("position_ids"))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100, reduction="sum")
        return loss, {}


def run(cfg: RunConfig) -> dict:
    from alignkit.data import build_datasets
    from alignkit.models import load_model, load_tokenizer

    accelerator = setup_accelerator(cfg.training)
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, "sft", packing=cfg.method_args.packing)
    model = load_model(cfg.model, tokenizer)
    method = SFTMethod(tokenizer.pad_token_id, cfg.method_args.completion_only_loss)
    result = fit(accelerator, model, tokenizer, method, cfg, splits.train, splits.eval)
    result["data_stats"] = splits.stats
    return result
