"""Supervised fine-tuning: next-token cross-entropy on assistant (completion) tokens.

Recipe: accelerator -> tokenizer -> data (kind "sft", optionally packed) -> model (full / LoRA / QLoRA) ->
:func:`alignkit.training.fit` with the supervised objective (:class:`alignkit.training.supervised.SFTMethod`).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.config import RunConfig, opt
from alignkit.data import build_datasets
from alignkit.models import load_model, load_tokenizer
from alignkit.training import fit, setup_accelerator
from alignkit.training.supervised import SFTMethod


@dataclass
class SFTConfig:
    packing: bool = opt(False, "Pack several short examples into each max_length row (best-fit; attention stays per example).")
    completion_only_loss: bool = opt(True, "Loss on assistant/completion tokens only; false trains on prompt tokens too.")

    def validate(self, run: RunConfig) -> None:
        pass


def run(cfg: RunConfig) -> dict:
    accelerator = setup_accelerator(cfg.training)
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, "sft", packing=cfg.method_args.packing)
    model = load_model(cfg.model, tokenizer)
    method = SFTMethod(tokenizer.pad_token_id, cfg.method_args.completion_only_loss)
    result = fit(accelerator, model, tokenizer, method, cfg, splits.train, splits.eval)
    result["data_stats"] = splits.stats
    return result
