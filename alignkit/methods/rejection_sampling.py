"""Rejection sampling (best-of-N): sample N responses per prompt, score them, keep the best, write an SFT dataset.

Recipe: accelerator → tokenizer → prompts (data kind "prompt") → policy (frozen) → reward sources
(:func:`alignkit.rewards.build_reward`: reward model, Python functions, HTTP) → for each batch of prompts:
sample N (rollout engine) → score → keep → append to ``output_dir/best_of_n.jsonl`` → summary → optionally
SFT on the kept responses (the SFT recipe's pieces and :func:`alignkit.engine.fit`).

What is kept (``keep``):

- ``best``: the highest-scoring response of each prompt (the first one on ties);
- ``threshold``: every response scoring at least ``threshold``, best first (zero or more per prompt).

Responses that decode to blank text are never kept (they would be unusable SFT rows); they are scored
and appear in ``all_scores``.

Resumable sampling (:class:`SampleLog`, :func:`sample_prompts`, also used by SeqKD's teacher data):

- prompts are cut into fixed batches of ``sampling_batch_size`` by their index in the prompt dataset
  (the stable prompt id); batch ``g`` samples with a seed derived from ``(training.seed, g, rank)``, so a
  batch gives the same responses whether or not the run was interrupted before it;
- each finished batch is appended to the output file (write, flush, fsync), then committed by one line in
  ``<name>.progress.jsonl`` (write, flush, fsync). On restart, rows of uncommitted batches and a partial
  last line are dropped and committed batches are skipped: no prompt is scored twice and none is lost.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.config import ConfigError, DataSource, RunConfig, opt, register_method_config
from alignkit.rewards import RewardConfig
from alignkit.rollout import GenerationConfig, Rollout

logger = logging.getLogger("alignkit")

SAMPLES_FILE = "best_of_n.jsonl"
SUMMARY_FILE = "best_of_n_summary.json"
KEEP_CHOICES = ("best", "threshold")
# settings that change how fast results come, not which: a resumed run may change them
_NOT_IN_FINGERPRINT = ("generation_batch_size", "reward_model_batch_size", "reward_url_timeout", "reward_url_retries",
                       "zero3_gather", "vllm_gpu_memory_utilization", "train_sft", "completion_only_loss")


@register_method_config("rejection_sampling")
@dataclass
class RejectionSamplingConfig(GenerationConfig, RewardConfig):
    num_samples: int = opt(4, "N: responses sampled per prompt; the best of them is kept.")
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
        self.validate_generation(section)
        self.validate_reward(section)
        if self.keep not in KEEP_CHOICES:
            raise ConfigError(f"{section}.keep={self.keep!r} is not valid; choose one of: {', '.join(KEEP_CHOICES)}.")
        if self.keep == "threshold" and self.threshold is None:
            raise ConfigError(f"{section}.keep=threshold needs {section}.threshold (the lowest score kept).")
        if self.keep == "best" and self.threshold is not None:
            raise ConfigError(f"{section}.threshold={self.threshold} is only used with keep: threshold; remove it or "
                              f"set {section}.keep=threshold.")
        if self.reward_normalize != "none":
            raise ConfigError(f"{section}.reward_normalize={self.reward_normalize!r}: best-of-N compares raw scores "
                              "(normalising per batch would make scores and thresholds of different batches "
                              "incomparable); set it to none.")
        if self.sampling_batch_size < 1:
            raise ConfigError(f"{section}.sampling_batch_size={self.sampling_batch_size}: must be >= 1.")
        if self.greedy and self.num_samples > 1:
            raise ConfigError(f"{section}: greedy decoding (do_sample=false or temperature=0) gives {self.num_samples} "
                              "identical responses per prompt; set do_sample: true and temperature > 0.")


# --------------------------------------------------------------------------------------------------
# Records, seeds
# --------------------------------------------------------------------------------------------------


def sft_record(prompt: Any, response: str) -> dict[str, Any]:
    """An SFT row in the prompt's own shape: a conversation for chat prompts, prompt/completion for strings."""
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": response}]}
    return {"prompt": prompt, "completion": response}


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. training.seed, batch index, rank); independent streams per tuple."""
    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompts_fingerprint(rows: Sequence[dict]) -> str:
    """sha256 of the prompts in order: a resumed run must see the same prompts under the same ids."""
    text = json.dumps([r["prompt"] for r in rows], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------------------------------
# The resumable output file
# --------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """(records of the complete lines, whether the file held anything else: a partial last line).

    Only the last line can be partial (a crash during an append); a bad line before it is corruption.
    """
    if not path.exists():
        return [], False
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, else a partial line
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) and not tail:  # the last line of the file, cut right before its newline
                return records, True
            raise RuntimeError(f"{path} line {i} is not valid JSON ({e}); the file was edited or damaged. Fix or "
                               "delete it (with its .progress.jsonl), or set training.overwrite_output_dir=true "
                               "to start sampling over.") from e
    return records, bool(tail)


def _write_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


@dataclass
class PromptResult:
    """What one prompt produced: the rows to write (each with ``prompt_id``) and the scores of all samples."""

    prompt_id: int
    records: list[dict]
    all_scores: list[float] | None = None


class SampleLog:
    """An append-only JSONL output file plus its commit log ``<stem>.progress.jsonl``.

    The commit log's first line is ``{"meta": ...}`` (the settings that decide the results); each later line
    ``{"batch": g, "prompt_ids": [...], "rows": n, "all_scores": [...]}`` commits one batch whose ``n`` rows
    were appended (and fsynced) to the output file before. Opening an existing log resumes it: the output
    file is cut back to the rows of committed batches (a crash between the two writes, or during one, leaves
    rows of an uncommitted batch or a partial line behind). A different ``meta`` is an error.
    Only the main process should open one.
    """

    def __init__(self, path: str | Path, meta: dict, *, restart: bool = False):
        self.path = Path(path)
        self.progress = self.path.with_name(f"{self.path.stem}.progress.jsonl")
        self.meta = _as_json(meta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if restart:
            for p in (self.path, self.progress):
                p.unlink(missing_ok=True)
        self.entries = self._recover()

    def _recover(self) -> list[dict]:
        lines, partial = _read_jsonl(self.progress)
        if not lines or "meta" not in lines[0]:
            if self.path.exists() and self.path.stat().st_size:
                logger.warning("%s has no commit log (%s): none of its rows is known to be complete; starting over.",
                               self.path, self.progress.name)
            _write_atomic(self.path, [])
            _write_atomic(self.progress, [{"meta": self.meta}])
            return []
        if lines[0]["meta"] != self.meta:
            old = lines[0]["meta"]
            changed = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
            raise ConfigError(
                f"{self.path} was started with other settings ({', '.join(changed)} changed: "
                f"{ {k: old.get(k) for k in changed} } -> { {k: self.meta.get(k) for k in changed} }); resuming "
                "would mix two runs. Restore those settings, use another training.output_dir, or set "
                "training.overwrite_output_dir=true to start sampling over.")
        entries = lines[1:]
        if partial:
            _write_atomic(self.progress, lines)
        done = {pid for e in entries for pid in e["prompt_ids"]}
        rows, partial_row = _read_jsonl(self.path)
        kept = [r for r in rows if r.get("prompt_id") in done]
        expected = sum(e["rows"] for e in entries)
        if len(kept) != expected:
            raise RuntimeError(f"{self.path} holds {len(kept)} rows of committed batches but {self.progress.name} "
                               f"records {expected}; the file was edited. Set training.overwrite_output_dir=true to "
                               "start sampling over.")
        if partial_row or len(kept) != len(rows) or not self.path.exists():
            logger.warning("%s: dropped %d row(s) of an unfinished batch%s left by an interrupted run.", self.path,
                           len(rows) - len(kept), " and a partial line" if partial_row else "")
            _write_atomic(self.path, kept)
        if entries:
            logger.info("resuming %s: %d prompts already done (%d rows).", self.path, len(done), len(kept))
        return entries

    @property
    def done_ids(self) -> set[int]:
        return {pid for e in self.entries for pid in e["prompt_ids"]}

    def append(self, batch: int, results: list[PromptResult]) -> None:
        """Write the batch's rows (fsync), then commit it in the progress log (fsync)."""
        rows = [r for res in results for r in res.records]
        _append(self.path, rows)
        entry: dict[str, Any] = {"batch": batch, "prompt_ids": [res.prompt_id for res in results], "rows": len(rows),
                                 "kept": [len(res.records) for res in results]}
        if any(res.all_scores is not None for res in results):
            entry["all_scores"] = [res.all_scores for res in results]
        _append(self.progress, [entry])
        self.entries.append(entry)

    def rows(self) -> list[dict]:
        return _read_jsonl(self.path)[0]


def sample_prompts(accelerator, model: torch.nn.Module, engine, rows: Sequence[dict], log: SampleLog | None, *,
                   batch_size: int, seed: int, choose: Callable[[list[dict], list[int], Rollout], list[PromptResult]],
                   desc: str) -> None:
    """Generate for every prompt not yet committed in ``log``, batch by batch, and commit the results.

    ``choose(rows, prompt_ids, rollout)`` turns a rollout of the batch's prompts into one
    :class:`PromptResult` per prompt. ``log`` is the main process's (None elsewhere). With several
    processes each takes an equal slice of every batch (padded with a repeat of the batch's first prompt,
    so every process runs the same number of generate and reward forwards: ZeRO-3 needs that) and the main
    process writes everything.
    """
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    done = [log.done_ids if log is not None else set()]
    if world > 1:
        broadcast_object_list(done, from_process=0)
    done_ids: set[int] = done[0]
    n = len(rows)
    bar = tqdm(total=n, initial=len(done_ids & set(range(n))), desc=desc, unit="prompt", dynamic_ncols=True,
               disable=not main)
    for g in range(math.ceil(n / batch_size)):
        todo = [i for i in range(g * batch_size, min(n, (g + 1) * batch_size)) if i not in done_ids]
        if not todo:
            continue
        mine = todo[rank::world]
        ids = mine + [todo[0]] * (math.ceil(len(todo) / world) - len(mine))
        rollout = engine.generate(model, [rows[i]["prompt_ids"] for i in ids], seed=derived_seed(seed, g, rank))
        results = choose([rows[i] for i in ids], ids, rollout)[: len(mine)]
        if world > 1:
            results = gather_object(results)
        if log is not None:
            log.append(g, sorted(results, key=lambda r: r.prompt_id))
        bar.update(len(todo))
    bar.close()
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------
# Best-of-N
# --------------------------------------------------------------------------------------------------


def best_of_n_chooser(args: RejectionSamplingConfig, reward) -> Callable[[list[dict], list[int], Rollout], list[PromptResult]]:
    """Score a batch's samples with ``reward`` (a CombinedReward) and keep per ``args.keep``."""
    n = args.num_samples

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
        "samples_per_prompt": args.num_samples,
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
    from alignkit.data import build_datasets
    from alignkit.engine import check_output_dir, fit, prepare_frozen, setup_accelerator
    from alignkit.methods.sft import SFTMethod
    from alignkit.models import load_model, load_tokenizer
    from alignkit.rewards import build_reward
    from alignkit.rollout import build_engine

    args: RejectionSamplingConfig = cfg.method_args
    t = cfg.training
    out = Path(t.output_dir)
    accelerator = setup_accelerator(t)
    if args.train_sft and not t.resume:
        check_output_dir(t)  # a finished SFT run there: fail now, not after sampling
    tokenizer = load_tokenizer(cfg.model)
    # every training prompt is sampled; data.eval / data.eval_split are for the SFT stage
    prompt_data = dataclasses.replace(cfg.data, eval=[], eval_split=0.0)
    with accelerator.main_process_first():
        prompts = build_datasets(prompt_data, tokenizer, "prompt").train
    policy = prepare_frozen(accelerator, load_model(cfg.model, tokenizer, trainable=False))
    reward = build_reward(args, tokenizer, accelerator.device, dtype=cfg.model.dtype, section=cfg.method,
                          prepare_model=lambda m: prepare_frozen(accelerator, m))
    engine = build_engine(args, tokenizer, model_name_or_path=cfg.model.name_or_path, device=accelerator.device,
                          dtype=cfg.model.dtype, seed=t.seed)

    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in _NOT_IN_FINGERPRINT}
    meta = {"method": cfg.method, "model": cfg.model.name_or_path, "seed": t.seed, "processes": accelerator.num_processes,
            "prompts": len(prompts), "prompts_sha256": prompts_fingerprint(prompts), "settings": settings}
    log = SampleLog(out / SAMPLES_FILE, meta, restart=t.overwrite_output_dir and not t.resume) \
        if accelerator.is_main_process else None
    sample_prompts(accelerator, policy, engine, prompts, log, batch_size=args.sampling_batch_size, seed=t.seed,
                   choose=best_of_n_chooser(args, reward), desc=f"best-of-{args.num_samples}")

    summary: dict[str, Any] = {}
    if log is not None:
        summary = summarize(log.entries, len(prompts), args)
        summary["data_file"] = str(log.path)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        logger.info("best-of-%d over %d prompts: mean best score %s vs mean first-sample score %s; %d rows kept "
                    "in %s", args.num_samples, len(prompts), summary["mean_best_score"],
                    summary["mean_first_sample_score"], summary["kept_rows"], log.path)
    result: dict[str, Any] = {"step": 0, "train": {}, "eval": {}, "output_dir": str(out), "best_of_n": summary,
                              "data_file": str(out / SAMPLES_FILE)}
    if not args.train_sft:
        return result

    del policy, reward, engine
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
