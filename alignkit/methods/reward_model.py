"""Reward model: a one-output sequence classifier on any causal-LM or encoder backbone.

Recipe: accelerator → tokenizer → data (kind "preference" for ``objective: pairwise``, "scored" for
``objective: regression``) → ``AutoModelForSequenceClassification`` with ``num_labels=1`` (full / LoRA /
QLoRA) → training.fit → reward mean/std over the training rows, saved in the output's ``config.json``.

- pairwise: Bradley-Terry, ``L = -log σ(r(x, y_w) - r(x, y_l) - m)`` (:func:`alignkit.losses.bradley_terry_loss`);
  chosen and rejected go through one forward of 2B rows. ``m = rm.margin * row["margin"]`` when the rows
  carry a ``margin`` field (Llama 2's preference-strength margin), else 0. Items are pairs.
- regression: ``L = (r(x, y) - score)^2`` (:func:`alignkit.losses.regression_loss`). Items are rows.

Pairs are framed, truncated and scored by :class:`alignkit.rewards.RewardModelFraming`, the same code that
scores responses in RL: ``prompt + completion`` for causal LMs, ``[CLS] prompt [SEP] completion [SEP]`` for
encoders; the score is read at the last non-pad token (causal LMs) or at [CLS] (encoders). With
``rm.padding_free`` (causal LMs whose attention allows it), the sequences are packed end to end instead of
padded and the score is read at each sequence's last token (:func:`alignkit.forward.sequence_scores`).

After training, ``alignkit_reward_mean`` / ``alignkit_reward_std`` (over up to ``rm.stats_rows`` training
rows, chosen and rejected sequences both) are written into the output's ``config.json`` (and
``alignkit_reward_stats.json``), for reward normalisation in RL.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import ConfigError, RunConfig, check_choice, opt
from alignkit.data import IGNORE_INDEX, build_datasets
from alignkit.forward import BatchLayout, choose_layout, sequence_scores
from alignkit.losses import bradley_terry_loss, regression_loss
from alignkit.models import load_model, load_tokenizer, unwrap_model
from alignkit.rewards import RewardModelFraming
from alignkit.training import OfflineMethod, fit, setup_accelerator
from alignkit.training.batches import eval_batches

logger = logging.getLogger("alignkit")

STATS_FILE = "alignkit_reward_stats.json"


@dataclass
class RMConfig:
    objective: str = opt("pairwise", "pairwise: Bradley-Terry on chosen/rejected pairs; regression: squared error on "
                                     "a scalar score column (score, label or reward).")
    margin: float = opt(1.0, "pairwise: scale of the rows' `margin` field, L = -log σ(r_w - r_l - margin * row.margin); "
                             "0 ignores it. Rows without the field get no margin.")
    stats_rows: int = opt(1000, "Training rows scored after training for the reward mean/std saved in "
                                "config.json (0: all rows).")
    padding_free: bool = opt(True, "Causal-LM backbones: pack the sequences end to end (position ids restart per "
                                   "sequence) and read each score at its last token; same scores, no padding.")

    def validate(self, run: RunConfig) -> None:
        check_choice("rm.objective", self.objective, ("pairwise", "regression"))
        if self.stats_rows < 0:
            raise ConfigError(f"rm.stats_rows={self.stats_rows}: must be >= 0 (0 means every training row).")


def _trailing(seq: list[int], pad_token_id: int) -> int:
    """Tokens after the last non-pad token (all but the first when every token is pad, as transformers)."""
    n = len(seq)
    last = next((i for i in range(n - 1, -1, -1) if seq[i] != pad_token_id), 0)
    return n - 1 - last


class RewardMethod(OfflineMethod):
    """Pairwise (items: pairs) or regression (items: rows) training of a one-output sequence classifier."""

    def __init__(self, objective: str, framing: RewardModelFraming, *, margin: float = 1.0,
                 layout: BatchLayout | None = None):
        self.objective, self.framing, self.margin = objective, framing, margin
        self.layout = layout or BatchLayout()
        self.bar_metrics = ("rewards/accuracies", "rewards/margins") if objective == "pairwise" else ("mae",)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.objective == "pairwise":
            pairs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"])
                                                                          for r in rows]
        else:
            pairs = [(r["input_ids"][:r.get("prompt_len", 0)], r["input_ids"][r.get("prompt_len", 0):]) for r in rows]
        if self.layout.packed and self.framing.special_tokens is None:
            seqs = [self.framing.sequence(list(p), list(c))[0] for p, c in pairs]
            pad = self.framing.pad_token_id
            batch = self.layout.sequences(seqs, [[IGNORE_INDEX] * len(s) for s in seqs], pad)
            # transformers' classifiers read the last token that is not the pad token (with pad = eos, the one
            # before a final eos): the same token here
            batch["last_positions"] -= torch.tensor([_trailing(s, pad) for s in seqs], dtype=torch.long)
        else:
            batch = self.framing.batch(pairs)
        if self.objective == "pairwise":
            if self.margin and any("margin" in r for r in rows):
                batch["margin"] = torch.tensor([float(r.get("margin", 0.0)) for r in rows]) * self.margin
        else:
            batch["score"] = torch.tensor([float(r["score"]) for r in rows], dtype=torch.float32)
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        n = len(batch["last_positions"]) if "last_positions" in batch else batch["input_ids"].shape[0]
        return n // 2 if self.objective == "pairwise" else n

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["n_tokens"]) if "n_tokens" in batch else super().count_tokens(batch)

    def scores(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One float32 reward per sequence of the batch (padded or packed)."""
        if "last_positions" in batch:
            return sequence_scores(model, batch)
        return self.framing.scores(model, batch)

    # -- loss ---------------------------------------------------------------------------------------

    def loss(self, model, batch):
        scores = self.scores(model, batch)
        if self.objective == "regression":
            target = batch["score"].to(scores.device)
            losses = regression_loss(scores, target)
            err = (scores.detach() - target).abs()
            return losses.sum(), {"mae": err.sum(), "rewards/mean": scores.detach().sum()}
        B = self.count_items(batch)
        chosen, rejected = scores[:B], scores[B:]
        losses = bradley_terry_loss(chosen, rejected, margin=batch.get("margin"))
        c, r = chosen.detach(), rejected.detach()
        return losses.sum(), {
            "rewards/chosen": c.sum(),
            "rewards/rejected": r.sum(),
            "rewards/accuracies": (c > r).float().sum(),
            "rewards/margins": (c - r).sum(),
        }


def reward_stats(accelerator, model, method: RewardMethod, rows: list[dict], batch_size: int,
                 limit: int = 0) -> dict[str, float]:
    """Mean and std of the rewards of ``rows[:limit]`` (every row for 0), chosen and rejected both.

    Rows are sharded over processes (every process runs the same number of forwards) and the sums reduced.
    """
    sample = rows[:limit] if limit else rows
    was_training = model.training
    model.eval()
    total, total_sq, count = 0.0, 0.0, 0.0
    with torch.no_grad():
        for batch, counts in eval_batches(sample, method.collate, batch_size, accelerator.num_processes,
                                          accelerator.process_index):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            s = method.scores(model, batch).double()
            if not counts:  # a filler batch (this process had no rows left)
                continue
            total, total_sq, count = total + float(s.sum()), total_sq + float((s * s).sum()), count + s.numel()
    model.train(was_training)
    t = torch.tensor([total, total_sq, count], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    total, total_sq, count = t.tolist()
    mean = total / max(count, 1.0)
    std = math.sqrt(max(total_sq / max(count, 1.0) - mean * mean, 0.0))
    return {"alignkit_reward_mean": mean, "alignkit_reward_std": std, "alignkit_reward_stats_count": int(count)}


def write_reward_stats(output_dir: str | Path, stats: dict[str, float]) -> None:
    """Add the stats to ``config.json`` (full models; a LoRA output has an adapter only) and a stats file."""
    out = Path(output_dir)
    (out / STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
    config_file = out / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config.update(stats)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run(cfg: RunConfig) -> dict:
    args = cfg.method_args
    accelerator = setup_accelerator(cfg.training)
    tokenizer = load_tokenizer(cfg.model)
    kind = "preference" if args.objective == "pairwise" else "scored"
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, kind)
    model = load_model(cfg.model, tokenizer, task="seq_cls", num_labels=1)
    framing = RewardModelFraming.for_tokenizer(tokenizer, max_length=cfg.data.max_length)
    layout = BatchLayout()
    if framing.special_tokens is None:  # encoders read [CLS]: their pair form stays padded
        layout = choose_layout(model, padding_free=args.padding_free, scores=True, accelerator=accelerator,
                               what="rm batches")
    method = RewardMethod(args.objective, framing, margin=args.margin, layout=layout)
    result = fit(accelerator, model, tokenizer, method, cfg, splits.train, splits.eval)
    stats = reward_stats(accelerator, result["model"], method, splits.train, cfg.training.per_device_batch_size,
                         args.stats_rows)
    unwrap_model(result["model"]).config.update(stats)
    if accelerator.is_main_process:
        write_reward_stats(cfg.training.output_dir, stats)
        logger.info(f"rm: reward mean {stats['alignkit_reward_mean']:.4f}, std {stats['alignkit_reward_std']:.4f} "
                    f"over {stats['alignkit_reward_stats_count']} training sequences, saved in "
                    f"{Path(cfg.training.output_dir) / 'config.json'}")
    accelerator.wait_for_everyone()
    result.update(stats)
    result["data_stats"] = splits.stats
    return result
