"""Rejection sampling (best-of-N): sample N responses per prompt, score them, keep the best, write an SFT dataset.

Recipe: accelerator → tokenizer → prompts (data kind "prompt") → policy (frozen) → reward sources
(``rejection_sampling.reward``: reward model, Python functions, HTTP) → for each batch of prompts: sample N
(``rejection_sampling.generation``) → score → keep → append to ``output_dir/best_of_n.jsonl`` → summary →
optionally SFT on the kept responses (:class:`alignkit.training.supervised.SFTMethod`, :func:`alignkit.training.fit`).

What is kept (``keep``):

- ``best``: the highest-scoring response of each prompt (the first one on ties);
- ``threshold``: every response scoring at least ``threshold``, best first (zero or more per prompt).

Responses that decode to blank text are never kept (they would be unusable SFT rows); they are scored
and appear in ``all_scores``. Sampling is resumable (:mod:`alignkit.rollout.resumable`): no prompt is
scored twice and none is lost after a crash.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.config import ConfigError, DataSource, RunConfig, check_choice, opt
from alignkit.data import build_datasets
from alignkit.models import load_model, load_tokenizer
from alignkit.rewards import RewardSourcesConfig, build_reward
from alignkit.rollout import Rollout, SamplingConfig, build_sampler
from alignkit.rollout.resumable import (
    PromptResult,
    SampleLog,
    prompts_fingerprint,
    sample_prompts,
    sft_record,
)
from alignkit.training import fit, prepare_frozen, setup_accelerator
from alignkit.training.checkpoint import check_output_dir, lock_output_dir, release_run_lock
from alignkit.training.supervised import SFTMethod

logger = logging.getLogger("alignkit")

SAMPLES_FILE = "best_of_n.jsonl"
SUMMARY_FILE = "best_of_n_summary.json"
KEEP_CHOICES = ("best", "threshold")
# settings that change how fast results come, not which: a resumed run may change them
_NOT_IN_FINGERPRINT = ("generation.batch_size", "generation.zero3_gather", "generation.vllm_gpu_memory_utilization",
                       "reward.model_batch_size", "reward.url_timeout", "reward.url_retries", "train_sft",
                       "completion_only_loss")


@dataclass
class RejectionSamplingConfig:
    generation: SamplingConfig = opt(factory=lambda: SamplingConfig(num_samples=4),
                                     doc="Sampling; num_samples is N, the responses sampled per prompt.")
    reward: RewardSourcesConfig = opt(factory=RewardSourcesConfig, doc="Reward sources that score the samples.")
    keep: str = opt("best", "best: the highest-scoring response of each prompt; threshold: every response scoring "
                            ">= threshold, best first (zero or more per prompt).")
    threshold: float | None = opt(None, "keep: threshold only: the lowest score kept.")
    sampling_batch_size: int = opt(16, "Prompts per sampling batch: the unit of progress, resume and seeding (batch g "
                                       "samples with a seed derived from training.seed and g).")
    train_sft: bool = opt(False, "After sampling, run SFT on the kept responses (model and training sections apply; "
                                 "the model is saved to training.output_dir).")
    completion_only_loss: bool = opt(True, "SFT stage: loss on the kept responses only (false: prompt tokens too).")

    def validate(self, run: RunConfig) -> None:
        section = run.method
        self.generation.check(f"{section}.generation")
        self.reward.check(f"{section}.reward")
        check_choice(f"{section}.keep", self.keep, KEEP_CHOICES)
        if self.keep == "threshold" and self.threshold is None:
            raise ConfigError(f"{section}.keep=threshold needs {section}.threshold (the lowest score kept).")
        if self.keep == "best" and self.threshold is not None:
            raise ConfigError(f"{section}.threshold={self.threshold} is only used with keep: threshold; remove it or "
                              f"set {section}.keep=threshold.")
        if self.reward.normalize != "none":
            raise ConfigError(f"{section}.reward.normalize={self.reward.normalize!r}: best-of-N compares raw scores "
                              "(normalising per batch would make scores and thresholds of different batches "
                              "incomparable); set it to none.")
        if self.sampling_batch_size < 1:
            raise ConfigError(f"{section}.sampling_batch_size={self.sampling_batch_size}: must be >= 1.")
        if self.generation.greedy and self.generation.num_samples > 1:
            raise ConfigError(f"{section}.generation: greedy decoding (do_sample=false or temperature=0) gives "
                              f"{self.generation.num_samples} identical responses per prompt; set do_sample: true and "
                              "temperature > 0.")


def fingerprint_settings(args: RejectionSamplingConfig) -> dict[str, Any]:
    """The settings that decide which samples a run keeps, flattened to dotted keys (resume must match)."""
    flat: dict[str, Any] = {}
    for key, value in dataclasses.asdict(args).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = key if sub is None else f"{key}.{sub}"
            if name not in _NOT_IN_FINGERPRINT:
                flat[name] = v
    return flat


# --------------------------------------------------------------------------------------------------
# Best-of-N
# --------------------------------------------------------------------------------------------------


def best_of_n_chooser(args: RejectionSamplingConfig, reward) -> Callable[[list[dict], list[int], Rollout], list[PromptResult]]:
    """Score a batch's samples with ``reward`` (a CombinedReward) and keep per ``args.keep``."""
    n = args.generation.num_samples

    def choose(rows: list[dict], prompt_ids: list[int], rollout: Rollout) -> list[PromptResult]:
        scores = reward(rollout, rows).rewards.float().cpu().view(len(rows), n).tolist()
        out = []
        for j, (row, pid) in enumerate(zip(rows, prompt_ids)):
            texts, s = rollout.response_texts[j * n:(j + 1) * n], scores[j]
            candidates = [k for k in range(n) if texts[k].strip()]
            if args.keep == "best":
                kept = [max(candidates, key=lambda k: s[k])] if candidates else []
            else:
                kept = sorted((k for k in candidates if s[k] >= args.threshold), key=lambda k: -s[k])
            records = [{**sft_record(row["prompt"], texts[k]), "score": s[k], "all_scores": s, "prompt_id": pid,
                        "sample_index": k} for k in kept]
            out.append(PromptResult(pid, records, s))
        return out

    return choose


def summarize(entries: list[dict], n_prompts: int, args: RejectionSamplingConfig) -> dict[str, Any]:
    """Best-of-N vs a single sample: mean over prompts of the best score and of the first sample's score."""
    all_scores = [s for e in entries for s in e.get("all_scores", [])]
    flat = [x for s in all_scores for x in s]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    best, first = mean([max(s) for s in all_scores]), mean([s[0] for s in all_scores])
    kept_rows = sum(e["rows"] for e in entries)
    return {
        "prompts": n_prompts,
        "prompts_done": len(all_scores),
        "samples_per_prompt": args.generation.num_samples,
        "keep": args.keep,
        "threshold": args.threshold,
        "kept_rows": kept_rows,
        "prompts_with_kept_rows": sum(1 for e in entries for k in e["kept"] if k),
        "mean_best_score": best,
        "mean_first_sample_score": first,
        "best_minus_first": None if best is None else best - first,
        "mean_sample_score": mean(flat),
    }


def run(cfg: RunConfig) -> dict:
    args: RejectionSamplingConfig = cfg.method_args
    t = cfg.training
    out = Path(t.output_dir)
    accelerator = setup_accelerator(t)
    lock_output_dir(accelerator, t.output_dir)  # the samples file is appended to: one run at a time
    if args.train_sft and not t.resume:
        check_output_dir(t)  # a finished SFT run there: fail now, not after sampling
    tokenizer = load_tokenizer(cfg.model)
    # every training prompt is sampled; data.eval / data.eval_split are for the SFT stage
    prompt_data = dataclasses.replace(cfg.data, eval=[], eval_split=0.0)
    with accelerator.main_process_first():
        prompts = build_datasets(prompt_data, tokenizer, "prompt").train
    args.reward.check_columns(prompts, cfg.data.describe_train(), section=f"{cfg.method}.reward")
    policy = prepare_frozen(accelerator, load_model(cfg.model, tokenizer, trainable=False))
    reward = build_reward(args.reward, tokenizer, accelerator.device, dtype=cfg.model.dtype,
                          section=f"{cfg.method}.reward", prepare_model=lambda m: prepare_frozen(accelerator, m))
    sampler = build_sampler(args.generation, tokenizer, model_name_or_path=cfg.model.name_or_path,
                            device=accelerator.device, dtype=cfg.model.dtype, seed=t.seed)

    meta = {"method": cfg.method, "model": cfg.model.name_or_path, "seed": t.seed, "processes": accelerator.num_processes,
            "prompts": len(prompts), "prompts_sha256": prompts_fingerprint(prompts),
            "settings": fingerprint_settings(args)}
    log = SampleLog(out / SAMPLES_FILE, meta, restart=t.overwrite_output_dir and not t.resume) \
        if accelerator.is_main_process else None
    n = args.generation.num_samples
    sample_prompts(accelerator, policy, sampler, prompts, log, batch_size=args.sampling_batch_size, seed=t.seed,
                   choose=best_of_n_chooser(args, reward), desc=f"best-of-{n}")

    summary: dict[str, Any] = {}
    if log is not None:
        summary = summarize(log.entries, len(prompts), args)
        summary["data_file"] = str(log.path)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        logger.info("best-of-%d over %d prompts: mean best score %s vs mean first-sample score %s; %d rows kept "
                    "in %s", n, len(prompts), summary["mean_best_score"],
                    summary["mean_first_sample_score"], summary["kept_rows"], log.path)
    result: dict[str, Any] = {"step": 0, "train": {}, "eval": {}, "output_dir": str(out), "best_of_n": summary,
                              "data_file": str(out / SAMPLES_FILE)}
    if not args.train_sft:
        if accelerator.is_main_process:
            release_run_lock(t.output_dir)
        return result

    sampler.close()
    del policy, reward, sampler
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    sft_data = dataclasses.replace(cfg.data, train=[DataSource(path=str(out / SAMPLES_FILE))])
    with accelerator.main_process_first():
        splits = build_datasets(sft_data, tokenizer, "sft")
    model = load_model(cfg.model, tokenizer)
    method = SFTMethod(tokenizer.pad_token_id, args.completion_only_loss)
    result.update(fit(accelerator, model, tokenizer, method, cfg, splits.train, splits.eval))
    result["data_stats"] = splits.stats
    return result
