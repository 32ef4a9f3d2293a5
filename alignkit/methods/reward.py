"""Reward model: a one-output sequence classifier on any causal-LM or encoder backbone.

Recipe: accelerator → tokenizer → data (kind "preference" for ``objective: pairwise``, "scored" for
``objective: regression``) → ``AutoModelForSequenceClassification`` with ``num_labels=1`` (full / LoRA /
QLoRA) → engine.fit → reward mean/std over the training rows, saved in the output's ``config.json``.

- pairwise: Bradley-Terry, ``L = -log σ(r(x, y_w) - r(x, y_l) - m)`` (:func:`alignkit.losses.bradley_terry_loss`);
  chosen and rejected go through one forward of 2B rows. ``m = rm.margin * row["margin"]`` when the rows
  carry a ``margin`` field (Llama 2's preference-strength margin), else 0. Items are pairs.
- regression: ``L = (r(x, y) - score)^2`` (:func:`alignkit.losses.regression_loss`). Items are rows.

The score is read where transformers' classifier reads it: the last non-pad token for causal LMs, the
first ([CLS]) token for encoders. Encoder backbones (a tokenizer that frames its inputs with [CLS]/[SEP])
get their pair form ``[CLS] prompt [SEP] completion [SEP]`` (with token type ids when the tokenizer makes
them), the same as ``tokenizer(prompt, completion)`` gives at inference time.

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

from alignkit.config import ConfigError, RunConfig, opt, register_method_config
from alignkit.engine import OfflineMethod, eval_batches, fit, setup_accelerator
from alignkit.losses import bradley_terry_loss, regression_loss

logger = logging.getLogger("alignkit")

STATS_FILE = "alignkit_reward_stats.json"


@register_method_config("rm")
@dataclass
class RewardConfig:
    objective: str = opt("pairwise", "pairwise: Bradley-Terry on chosen/rejected pairs; regression: squared error on "
                                     "a scalar score column (score, label or reward).")
    margin: float = opt(1.0, "pairwise: scale of the rows' `margin` field, L = -log σ(r_w - r_l - margin * row.margin); "
                             "0 ignores it. Rows without the field get no margin.")
    stats_rows: int = opt(1000, "Training rows scored after training for the reward mean/std saved in "
                                "config.json (0: all rows).")

    def validate(self, run: RunConfig) -> None:
        if self.objective not in ("pairwise", "regression"):
            raise ConfigError(f"rm.objective={self.objective!r} is not valid; choose one of: pairwise, regression.")
        if self.stats_rows < 0:
            raise ConfigError(f"rm.stats_rows={self.stats_rows}: must be >= 0 (0 means every training row).")


def encoder_special_tokens(tokenizer) -> tuple[int, int] | None:
    """(cls, sep) for BERT-style tokenizers that frame their inputs with them, else None."""
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None:
        return None
    framed = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    return (cls, sep) if framed[:1] == [cls] and framed[-1:] == [sep] else None


class RewardMethod(OfflineMethod):
    def __init__(self, objective: str, pad_token_id: int, *, margin: float = 1.0,
                 special_tokens: tuple[int, int] | None = None, token_type_ids: bool = False,
                 max_length: int | None = None):
        self.objective, self.pad_token_id, self.margin = objective, pad_token_id, margin
        self.special_tokens, self.token_type_ids, self.max_length = special_tokens, token_type_ids, max_length
        self.bar_metrics = ("rewards/accuracies", "rewards/margins") if objective == "pairwise" else ("mae",)

    # -- data ---------------------------------------------------------------------------------------

    def sequence(self, prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
        """(input_ids, token_type_ids) of one scored sequence; the prompt is cut from the left to fit."""
        if self.special_tokens is None:
            extra, ids_of = 0, (lambda p, c: (p + c, [0] * (len(p) + len(c))))
        else:
            cls, sep = self.special_tokens

            def ids_of(p, c):
                if not p:
                    return [cls] + c + [sep], [0] * (len(c) + 2)
                return [cls] + p + [sep] + c + [sep], [0] * (len(p) + 2) + [1] * (len(c) + 1)

            extra = 3 if prompt else 2
        if self.max_length is not None:
            over = len(prompt) + len(completion) + extra - self.max_length
            if over > 0:
                cut = min(over, len(prompt))
                prompt, over = prompt[cut:], over - cut
                if over > 0:
                    completion = completion[:len(completion) - over]
        return ids_of(list(prompt), list(completion))

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from alignkit.data import attention_mask_from_lengths, pad

        if self.objective == "pairwise":
            parts = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"])
                                                                           for r in rows]
        else:
            parts = [(r["input_ids"][:r.get("prompt_len", 0)], r["input_ids"][r.get("prompt_len", 0):]) for r in rows]
        seqs = [self.sequence(list(p), list(c)) for p, c in parts]
        input_ids = pad([s for s, _ in seqs], self.pad_token_id)
        batch = {"input_ids": input_ids,
                 "attention_mask": attention_mask_from_lengths([len(s) for s, _ in seqs], input_ids.shape[1])}
        if self.token_type_ids:
            batch["token_type_ids"] = pad([t for _, t in seqs], 0)
        if self.objective == "pairwise":
            if self.margin and any("margin" in r for r in rows):
                batch["margin"] = torch.tensor([float(r.get("margin", 0.0)) for r in rows]) * self.margin
        else:
            batch["score"] = torch.tensor([float(r["score"]) for r in rows], dtype=torch.float32)
        return batch

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        n = batch["input_ids"].shape[0]
        return n // 2 if self.objective == "pairwise" else n

    # -- loss ---------------------------------------------------------------------------------------

    @staticmethod
    def scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One float32 reward per row of the batch."""
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        try:
            logits = model(**kwargs, use_cache=False).logits  # causal LMs would build a KV cache otherwise
        except TypeError:  # a classifier whose forward has no use_cache
            logits = model(**kwargs).logits
        return logits[:, 0].float()

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
        for batch in eval_batches(sample, method.collate, batch_size, accelerator.num_processes,
                                  accelerator.process_index):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            s = method.scores(model, batch).double()
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
    from alignkit.data import build_datasets
    from alignkit.models import load_model, load_tokenizer, unwrap_model

    args = cfg.method_args
    accelerator = setup_accelerator(cfg.training)
    tokenizer = load_tokenizer(cfg.model)
    kind = "preference" if args.objective == "pairwise" else "scored"
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, kind)
    model = load_model(cfg.model, tokenizer, task="seq_cls", num_labels=1)
    special = encoder_special_tokens(tokenizer)
    method = RewardMethod(args.objective, tokenizer.pad_token_id, margin=args.margin, special_tokens=special,
                          token_type_ids=special is not None and "token_type_ids" in tokenizer.model_input_names,
                          max_length=cfg.data.max_length)
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
