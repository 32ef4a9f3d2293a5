"""Resumable sampling over a prompt set: generate for every prompt once, commit results as they come.

Used by rejection sampling (best-of-N) and SeqKD's teacher data:

- prompts are cut into fixed batches of ``batch_size`` by their index in the prompt dataset (the stable
  prompt id); batch ``g`` samples with a seed derived from ``(training.seed, g, rank)``, so a batch gives
  the same responses whether or not the run was interrupted before it;
- each finished batch is appended to the output file (write, flush, fsync), then committed by one line in
  ``<name>.progress.jsonl`` (write, flush, fsync). On restart, rows of uncommitted batches and a partial
  last line are dropped and committed batches are skipped: no prompt is scored twice and none is lost.
"""

from __future__ import annotations

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

from alignkit.config import ConfigError
from alignkit.errors import TrainingError
from alignkit.rollout.batch import Rollout
from alignkit.training.batches import derived_seed

logger = logging.getLogger("alignkit")


def sft_record(prompt: Any, response: str) -> dict[str, Any]:
    """An SFT row in the prompt's own shape: a conversation for chat prompts, prompt/completion for strings."""
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": response}]}
    return {"prompt": prompt, "completion": response}


def prompts_fingerprint(rows: Sequence[dict]) -> str:
    """sha256 of the prompts in order: a resumed run must see the same prompts under the same ids."""
    text = json.dumps([r["prompt"] for r in rows], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _read_jsonl(path: Path) -> tuple[list[dict], bool]:
    """(records of the complete lines, whether the file held anything else: a partial last line).

    Only the last line can be partial (a crash during an append, which can cut a UTF-8 character in two: lines
    are decoded one by one); a bad line before it is corruption.
    """
    if not path.exists():
        return [], False
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else a partial line
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == len(lines) and not tail:  # the last line of the file, cut right before its newline
                return records, True
            raise TrainingError(f"{path} line {i} is not valid JSON ({e}); the file was edited or damaged. Fix or "
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
            raise TrainingError(f"{self.path} holds {len(kept)} rows of committed batches but {self.progress.name} "
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


def sample_prompts(accelerator, model: torch.nn.Module, sampler, rows: Sequence[dict], log: SampleLog | None, *,
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
        rollout = sampler.generate(model, [rows[i]["prompt_ids"] for i in ids], seed=derived_seed(seed, g, rank))
        results = choose([rows[i] for i in ids], ids, rollout)[: len(mine)]
        if world > 1:
            results = gather_object(results)
        if log is not None:
            log.append(g, sorted(results, key=lambda r: r.prompt_id))
        bar.update(len(todo))
    bar.close()
    accelerator.wait_for_everyone()
