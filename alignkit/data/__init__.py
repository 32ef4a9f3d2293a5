"""The data layer every method shares: read sources, mix them, normalise records, tokenize.

``build_datasets(cfg.data, tokenizer, kind)`` is the one entry point methods call::

    read_source (sources.py)   file / folder / hub / named asset -> rows with their origin
    mix + eval split           ratios per source, deterministic with data.shuffle_seed
    normalize_rows (formats)   TRL / Alpaca / ShareGPT / text -> canonical records of the kind
    tokenize_example           chat template, assistant-only labels, truncation (tokenize.py)
    pack_sft                   optional, sft only

The result is plain lists of dicts (see ``tokenize_example`` for the fields of each kind).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from alignkit.config import DataConfig, DataSource
from alignkit.data.formats import (
    FORMAT_FIELDS,
    KIND_FORMATS,
    KINDS,
    REQUIRED_FIELDS,
    check_roles,
    detect_format,
    normalize_record,
    normalize_rows,
)
from alignkit.data.sources import DataError, Row, read_source
from alignkit.data.tokenize import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    attention_mask_from_lengths,
    ensure_chat_template,
    pack_sft,
    pad,
    padded_batch,
    tokenize_conversation,
    tokenize_example,
    truncate,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE", "FORMAT_FIELDS", "IGNORE_INDEX", "KINDS", "KIND_FORMATS", "REQUIRED_FIELDS",
    "DataError", "DatasetSplits", "Row", "attention_mask_from_lengths", "build_datasets", "check_roles",
    "detect_format", "ensure_chat_template", "eval_count", "mix", "normalize_record", "normalize_rows",
    "pack_sft", "pad", "padded_batch", "read_source", "tokenize_conversation", "tokenize_example", "truncate",
]

logger = logging.getLogger("alignkit")


@dataclass
class DatasetSplits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    stats: dict[str, Any] = field(default_factory=dict)


def build_datasets(data_cfg: DataConfig, tokenizer, kind: str, *, packing: bool = False) -> DatasetSplits:
    """Read, mix, split, normalise and tokenize ``data_cfg``'s sources for a method of ``kind``
    (sft, preference, unpaired, prompt, scored).

    stats: sources (per source: path, rows_read, skipped, rows_used), skipped, truncated_prompt,
    truncated_completion, train_rows, eval_rows (and packed_train_rows / packed_eval_rows with packing).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; kinds: {', '.join(KINDS)}.")
    if packing and kind != "sft":
        raise ValueError(f"packing is only for kind 'sft', not {kind!r}.")
    if not data_cfg.train:
        raise DataError("data.train is empty",
                        fix="Set data.train to a file, folder, hub dataset or named asset (see `alignkit assets`).")
    skipped: list[DataError] = []
    stats: dict[str, Any] = {"sources": [], "eval_sources": []}

    train_groups = []
    for src in data_cfg.train:
        groups = _read_and_normalize(src, kind, data_cfg, skipped, stats["sources"])
        stats["sources"][-1]["rows_used"] = round(src.ratio * len(groups))
        train_groups.append((src, groups))
    mixed = mix(train_groups, random.Random(data_cfg.shuffle_seed))

    if data_cfg.eval:
        eval_groups = []
        for src in data_cfg.eval:
            eval_groups += _read_and_normalize(src, kind, data_cfg, skipped, stats["eval_sources"])
    elif data_cfg.eval_split > 0:
        n_eval = eval_count(data_cfg.eval_split, len(mixed))
        eval_groups = mixed[:n_eval]
        held_out = {id(g) for g in eval_groups}  # rows repeated by ratio > 1 must not also train
        mixed = [g for g in mixed[n_eval:] if id(g) not in held_out]
    else:
        eval_groups = None
    if not mixed:
        raise DataError("no training rows left" + (f" ({len(skipped)} bad rows skipped)" if skipped else ""),
                        source="data.train", fix="Check the sources, their `limit`/`ratio`, and data.eval_split.")

    counts: Counter = Counter()
    train = _tokenize_all(mixed, tokenizer, kind, data_cfg, counts, skipped)
    eval_rows = _tokenize_all(eval_groups, tokenizer, kind, data_cfg, counts, skipped) if eval_groups else None
    if not train:
        raise DataError(f"every training row was skipped ({len(skipped)} bad rows)", source="data.train",
                        fix="Fix the data (run with data.on_bad_row=error to see the first problem).")
    stats.update(skipped=len(skipped), truncated_prompt=counts["truncated_prompt"],
                 truncated_completion=counts["truncated_completion"], train_rows=len(train),
                 eval_rows=len(eval_rows) if eval_rows else 0)
    if skipped:
        logger.warning("skipped %d bad rows; first: %s", len(skipped), skipped[0])
    if counts["truncated_prompt"] or counts["truncated_completion"]:
        logger.warning("truncated %d prompts (cut from the left) and %d completions (cut on the right) to "
                       "data.max_length=%d%s", counts["truncated_prompt"], counts["truncated_completion"],
                       data_cfg.max_length,
                       f", data.max_prompt_length={data_cfg.max_prompt_length}" if data_cfg.max_prompt_length else "")
    if packing:
        train = pack_sft(train, data_cfg.max_length)
        stats["packed_train_rows"] = len(train)
        if eval_rows:
            eval_rows = pack_sft(eval_rows, data_cfg.max_length)
            stats["packed_eval_rows"] = len(eval_rows)
    logger.info("data (%s): %d train rows, %d eval rows, %d skipped", kind, stats["train_rows"],
                stats["eval_rows"], stats["skipped"])
    return DatasetSplits(train=train, eval=eval_rows, stats=stats)


def mix(sources: list[tuple[DataSource, list]], rng: random.Random) -> list:
    """Draw round(ratio * size) items from each source (without replacement below 1, whole copies plus a
    sample above 1) and shuffle them together."""
    mixed = []
    for src, items in sources:
        if src.ratio < 0:
            raise DataError(f"ratio={src.ratio} is negative", source=src.path, field="ratio",
                            fix="Use a ratio >= 0 (1 = every row once).")
        n = round(src.ratio * len(items))
        copies, rest = divmod(n, len(items)) if items else (0, 0)
        mixed += items * copies
        mixed += [items[i] for i in sorted(rng.sample(range(len(items)), rest))]
    rng.shuffle(mixed)
    return mixed


def eval_count(eval_split: float, n: int) -> int:
    """Rows to hold out: a fraction (< 1, at least one row) or a count (>= 1)."""
    n_eval = max(1, round(eval_split * n)) if eval_split < 1 else int(eval_split)
    if n_eval >= n:
        raise DataError(f"data.eval_split={eval_split} holds out {n_eval} of {n} training rows, leaving none to "
                        "train on", fix="Use a smaller eval_split or more data.")
    return n_eval


def _read_and_normalize(src: DataSource, kind: str, data_cfg: DataConfig, skipped: list[DataError],
                        infos: list[dict]) -> list[list[Row]]:
    before = len(skipped)
    rows = read_source(src, on_bad_row=data_cfg.on_bad_row, skipped=skipped)
    rows_read = len(rows) + len(skipped) - before  # malformed lines count as read (and skipped)
    groups = normalize_rows(rows, kind, fmt=src.format, system_prompt=data_cfg.system_prompt,
                            on_bad_row=data_cfg.on_bad_row, skipped=skipped)
    n_skipped = len(skipped) - before
    infos.append({"path": src.path, "split": src.split, "rows_read": rows_read, "skipped": n_skipped})
    if not groups:
        raise DataError("no usable rows" + (f" ({n_skipped} bad rows skipped)" if n_skipped else ""),
                        source=src.path, fix="Check the file and its `format:`/`columns:` settings.")
    return groups


def _tokenize_all(groups: list[list[Row]], tokenizer, kind: str, data_cfg: DataConfig, counts: Counter,
                  skipped: list[DataError]) -> list[dict[str, Any]]:
    rows = [row for group in groups for row in group]
    if any(_is_conversation(r.data) for r in rows):
        ensure_chat_template(tokenizer)
    out = []
    for row in rows:
        try:
            out.append(tokenize_example(row.data, tokenizer, kind, max_length=data_cfg.max_length,
                                        max_prompt_length=data_cfg.max_prompt_length, stats=counts))
        except DataError as e:
            err = e.at(row)
            if data_cfg.on_bad_row != "skip":
                raise err from None
            logger.warning("skipping bad row: %s", err)
            skipped.append(err)
    return out


def _is_conversation(record: dict) -> bool:
    return "messages" in record or isinstance(record.get("prompt"), list)
