"""The data layer every method shares: read sources, mix them, normalise records, tokenize.

``build_datasets(cfg.data, tokenizer, kind)`` is the one entry point methods call::

    per source:
      read_source (sources.py)   file / folder / hub / named asset / dataset_info.json#name -> rows
      normalize_rows (formats)   TRL / Alpaca / ShareGPT / LLaMA-Factory / text -> canonical records
      tokenize_example           chat template, assistant-only labels, truncation (tokenize.py)
    mix + eval split             ratios per source, deterministic with data.shuffle_seed
    pack_sft                     optional, sft only

The result is plain lists of dicts (see ``tokenize_example`` for the fields of each kind). Every row a
source yields is either used or skipped (and logged): per source, rows_read = rows_used + skipped.
"""

from __future__ import annotations

import logging
import os
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
    LlamaFactoryFormat,
    Suggestion,
    check_roles,
    detect_format,
    from_llamafactory,
    llamafactory_format,
    normalize_record,
    normalize_rows,
    suggest_format,
)
from alignkit.data.rows import DataError, Row, rename_fields
from alignkit.data.sources import read_source
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
    "DataError", "DatasetSplits", "LlamaFactoryFormat", "Row", "Suggestion", "attention_mask_from_lengths",
    "build_datasets", "check_roles", "detect_format", "ensure_chat_template", "eval_count", "from_llamafactory",
    "llamafactory_format", "mix", "normalize_record", "normalize_rows", "pack_sft", "pad", "padded_batch",
    "read_source", "rename_fields", "suggest_format", "tokenize_conversation", "tokenize_example", "truncate",
]

logger = logging.getLogger("alignkit")
_ANNOUNCE_BYTES = 10 * 2**20  # a file this large takes seconds to read: say so first
_PROGRESS_DELAY = 1.0  # seconds of tokenizing before the bar appears (small data sets show none)


@dataclass
class DatasetSplits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    stats: dict[str, Any] = field(default_factory=dict)


def build_datasets(data_cfg: DataConfig, tokenizer, kind: str, *, packing: bool = False) -> DatasetSplits:
    """Read, normalise and tokenize ``data_cfg``'s sources for a method of ``kind`` (sft, preference,
    unpaired, prompt, scored), then mix them and split off eval rows.

    stats: sources / eval_sources (per source: path, split, rows_read, rows_used, skipped, where
    rows_read = rows_used + skipped; train sources also rows_drawn = round(ratio * rows_used), the rows
    the mix takes), skipped (all sources), truncated_prompt, truncated_completion (counted once per source
    row), train_rows, eval_rows (and packed_train_rows / packed_eval_rows with packing).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; kinds: {', '.join(KINDS)}.")
    if packing and kind != "sft":
        raise ValueError(f"packing is only for kind 'sft', not {kind!r}.")
    if not data_cfg.train:
        raise DataError("data.train is empty",
                        fix="Set data.train to a file, folder, hub dataset or named asset (see `alignkit assets`).")
    skipped: list[DataError] = []
    counts: Counter = Counter()
    stats: dict[str, Any] = {"sources": [], "eval_sources": []}

    def load(src: DataSource, infos: list[dict]) -> list[list[dict[str, Any]]]:
        groups, info = _load_source(src, tokenizer, kind, data_cfg, counts, skipped)
        infos.append(info)
        return groups

    train_groups = []
    for src in data_cfg.train:
        groups = load(src, stats["sources"])
        stats["sources"][-1]["rows_drawn"] = round(src.ratio * len(groups))
        train_groups.append((src, groups))
    mixed = mix(train_groups, random.Random(data_cfg.shuffle_seed))

    if data_cfg.eval:
        eval_groups = [g for src in data_cfg.eval for g in load(src, stats["eval_sources"])]
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

    train = _flatten(mixed)
    eval_rows = _flatten(eval_groups) if eval_groups else None
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


def _load_source(src: DataSource, tokenizer, kind: str, data_cfg: DataConfig, counts: Counter,
                 skipped: list[DataError]) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
    """The tokenized examples of one source, grouped per source row, and its row accounting. Every row
    read ends up in exactly one group or one entry of ``skipped``."""
    before = len(skipped)
    size = _file_size(src.path)
    if size >= _ANNOUNCE_BYTES:
        logger.info("%s: reading %.0f MB ...", src.path, size / 2**20)
    rows = read_source(src, on_bad_row=data_cfg.on_bad_row, skipped=skipped)
    rows_read = len(rows) + len(skipped) - before  # malformed rows count as read (and skipped)
    groups = normalize_rows(rows, kind, fmt=src.format, system_prompt=data_cfg.system_prompt,
                            on_bad_row=data_cfg.on_bad_row, skipped=skipped)
    examples = _tokenize_groups(groups, tokenizer, kind, data_cfg, counts, skipped, f"tokenizing {src.path}")
    info = {"path": src.path, "split": src.split, "rows_read": rows_read, "rows_used": len(examples),
            "skipped": len(skipped) - before}
    logger.info("%s: %d rows read = %d used + %d skipped", src.path, rows_read, info["rows_used"], info["skipped"])
    if not examples:
        raise DataError("no usable rows" + (f" ({info['skipped']} bad rows skipped)" if info["skipped"] else ""),
                        source=src.path, fix="Check the file and its `format:`/`columns:` settings.")
    return examples, info


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path) if os.path.isfile(path) else 0
    except OSError:
        return 0


def _progress(items: list, desc: str):
    """``items`` with a progress bar (tqdm, stderr) where the data layer's INFO lines show (rank 0 of a run
    with logging set up); the bar appears only after ``_PROGRESS_DELAY`` seconds and is cleared when done."""
    if not logger.isEnabledFor(logging.INFO):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=" rows", delay=_PROGRESS_DELAY, leave=False, mininterval=0.5)


def _tokenize_groups(groups: list[list[Row]], tokenizer, kind: str, data_cfg: DataConfig, counts: Counter,
                     skipped: list[DataError], desc: str = "tokenizing") -> list[list[dict[str, Any]]]:
    """Tokenized groups; a group with a bad row is skipped whole (one source row, one skip)."""
    if any(_is_conversation(r.data) for group in groups for r in group):
        ensure_chat_template(tokenizer)
    out = []
    for group in _progress(groups, desc):
        group_counts: Counter = Counter()
        try:
            out.append([tokenize_example(row.data, tokenizer, kind, max_length=data_cfg.max_length,
                                         max_prompt_length=data_cfg.max_prompt_length, stats=group_counts)
                        for row in group])
        except DataError as e:
            err = e.at(group[0])  # the rows of a group share their source row
            if data_cfg.on_bad_row != "skip":
                raise err from None
            logger.warning("skipping bad row: %s", err)
            skipped.append(err)
            continue
        counts.update(group_counts)
    return out


def _flatten(groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    # A row drawn several times (ratio > 1) gets its own dict each time, as methods may add fields to rows.
    return [dict(example) for group in groups for example in group]


def _is_conversation(record: dict) -> bool:
    return "messages" in record or isinstance(record.get("prompt"), list)
