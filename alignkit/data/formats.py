"""Normalise raw records (TRL, Alpaca, ShareGPT, LLaMA-Factory, plain text, ...) to one canonical record
per *kind*.

Input formats (``DataSource.format``; ``auto`` detects one per source from its first row, trying them in
this order):

===================  ======================================================================================
messages_label       ``messages`` + ``label`` (or ``kto_tag``): a conversation and its KTO label
messages             ``messages``: [{role, content}, ...] (TRL conversational)
sharegpt_preference  ``conversations`` + ``chosen``/``rejected``: one {from, value} turn each (LLaMA-Factory)
sharegpt_label       ``conversations`` + ``label`` (or ``kto_tag``) (LLaMA-Factory KTO)
sharegpt             ``conversations``: [{from, value}, ...], optional ``system``
alpaca_preference    ``instruction``, ``chosen``, ``rejected``, optional ``input``, ``system``, ``history``
preference           ``chosen``, ``rejected`` and an optional ``prompt`` (TRL explicit / implicit prompt)
unpaired             ``prompt``, ``completion``, ``label`` (TRL KTO)
alpaca_label         ``instruction``, ``output``, ``label`` (or ``kto_tag``), optional as alpaca
alpaca               ``instruction``, ``output``, optional ``input``, ``system``, ``history``
prompt_completion    ``prompt``, ``completion`` (strings or message lists)
text                 ``text``
prompt               ``prompt`` alone (prompt-only data for online methods)
===================  ======================================================================================

Canonical records per kind (what :mod:`alignkit.data.tokenize` consumes):

- ``sft``: {messages} | {prompt: str, completion: str} | {text}
- ``preference``: {prompt, chosen, rejected}: all message lists (completions hold only the assistant
  turns) or all strings
- ``unpaired``: {prompt, completion, label: bool}
- ``prompt``: {prompt: messages | str, **other fields of the record}
- ``scored``: {prompt, completion, score: float} | {text, score: float}

A record whose format the kind does not accept gets an error naming the closest accepted format and the
``columns:`` / ``format:`` settings that load it (:func:`suggest_format`; every suggestion is checked by
loading the record that way). LLaMA-Factory ``dataset_info.json`` entries are converted to these formats
by :func:`from_llamafactory`.
"""

from __future__ import annotations

import difflib
import itertools
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from alignkit.data.rows import DataError, Row, rename_fields

logger = logging.getLogger("alignkit")

KINDS = ("sft", "preference", "unpaired", "prompt", "scored")

# Input format -> (required fields, optional fields), in the order ``auto`` tries them (the more specific
# shape of a pair first).
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages_label": (("messages", "label"), ()),
    "messages": (("messages",), ()),
    "sharegpt_preference": (("conversations", "chosen", "rejected"), ("system",)),
    "sharegpt_label": (("conversations", "label"), ("system",)),
    "sharegpt": (("conversations",), ("system",)),
    "alpaca_preference": (("instruction", "chosen", "rejected"), ("input", "system", "history")),
    "preference": (("chosen", "rejected"), ("prompt",)),
    "unpaired": (("prompt", "completion", "label"), ()),
    "alpaca_label": (("instruction", "output", "label"), ("input", "system", "history")),
    "alpaca": (("instruction", "output"), ("input", "system", "history")),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
    "prompt": (("prompt",), ()),
}

# Kind -> input formats it accepts.
KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "sharegpt", "alpaca", "prompt_completion", "text"),
    "preference": ("preference", "sharegpt_preference", "alpaca_preference"),
    "unpaired": ("unpaired", "messages_label", "sharegpt_label", "alpaca_label", "preference",
                 "sharegpt_preference", "alpaca_preference"),
    "prompt": ("prompt", "messages", "messages_label", "sharegpt", "sharegpt_label", "alpaca", "alpaca_label",
               "prompt_completion", "unpaired", "preference", "sharegpt_preference", "alpaca_preference", "text"),
    "scored": ("messages", "messages_label", "sharegpt", "sharegpt_label", "alpaca", "alpaca_label",
               "prompt_completion", "unpaired", "text"),
}

# Formats that hold a pair of completions, and the formats whose rows add a KTO label to a base format.
PAIR_FORMATS = ("preference", "sharegpt_preference", "alpaca_preference")
LABELLED_FORMATS = {"messages_label": "messages", "sharegpt_label": "sharegpt", "alpaca_label": "alpaca"}

# LLaMA-Factory calls the KTO label `kto_tag`; a record may use either name.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {"label": ("label", "kto_tag")}

# Score column names for kind "scored", in order of preference.
SCORE_FIELDS = ("score", "label", "reward")

# The fields each kind needs, as alternatives (for docs and error messages).
REQUIRED_FIELDS: dict[str, list[tuple[str, ...]]] = {
    kind: [FORMAT_FIELDS[f][0] for f in formats] for kind, formats in KIND_FORMATS.items()
}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
TOOL_SPEAKERS = ("function_call", "observation", "tool", "function", "ipython")

Message = dict[str, str]


def accepted_shapes(kind: str) -> str:
    """What ``kind`` accepts, for error messages."""
    parts = []
    for fmt in KIND_FORMATS[kind]:
        required, optional = FORMAT_FIELDS[fmt]
        fields = ", ".join([_shown(f) for f in required] + [f"[{o}]" for o in optional])
        parts.append(f"{fmt} ({fields})")
    extra = " plus a score column (score, label or reward)" if kind == "scored" else ""
    return f"kind {kind!r} accepts: " + "; ".join(parts) + extra


def _shown(field: str) -> str:
    return "|".join(FIELD_ALIASES.get(field, (field,)))


def _present(record: dict[str, Any], field: str) -> bool:
    return any(record.get(name) is not None for name in FIELD_ALIASES.get(field, (field,)))


def _field_name(record: dict[str, Any], field: str) -> str:
    """The name ``record`` uses for ``field`` (an alias such as kto_tag for label)."""
    return next((n for n in FIELD_ALIASES.get(field, (field,)) if record.get(n) is not None), field)


def _matching_format(record: dict[str, Any]) -> str | None:
    """The first format (in FORMAT_FIELDS order) whose required fields ``record`` has."""
    for fmt, (required, _) in FORMAT_FIELDS.items():
        if all(_present(record, f) for f in required):
            return fmt
    return None


def detect_format(record: dict[str, Any], kind: str) -> str:
    """The input format of ``record`` (first match in FORMAT_FIELDS order). Raises DataError naming the
    closest format ``kind`` accepts and how to map the record to it."""
    fmt = _matching_format(record)
    if fmt in KIND_FORMATS[kind]:
        return fmt
    if fmt is not None and fmt != "prompt":
        required = ", ".join(_shown(f) for f in FORMAT_FIELDS[fmt][0])
        problem = f"this record looks like format {fmt!r} ({required}), which kind {kind!r} does not use"
    else:
        problem = f"no known format matches the fields {sorted(record)}"
    raise DataError(f"{problem}; {accepted_shapes(kind)}", fix=_fix_text(record, kind))


def normalize_record(record: dict[str, Any], kind: str, fmt: str = "auto",
                     system_prompt: str | None = None) -> list[dict[str, Any]]:
    """Canonical record(s) of ``kind`` for one raw record (two for a preference pair read as unpaired).

    Raises DataError naming the field (without the file/row; :func:`normalize_rows` adds those).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; kinds: {', '.join(KINDS)}.")
    if fmt == "auto":
        fmt = detect_format(record, kind)
    elif fmt not in FORMAT_FIELDS:
        raise DataError(f"unknown format {fmt!r}; formats: auto, {', '.join(FORMAT_FIELDS)}",
                        field="format", fix="Fix `format:` of the data source.")
    elif fmt not in KIND_FORMATS[kind]:
        raise DataError(f"format {fmt!r} cannot be used for kind {kind!r}; {accepted_shapes(kind)}",
                        field="format", fix=_fix_text(record, kind, replace_format=True))
    for f in FORMAT_FIELDS[fmt][0]:
        if not _present(record, f):
            raise DataError(f"missing (format {fmt!r} needs {', '.join(FORMAT_FIELDS[fmt][0])})", field=f,
                            fix="Add the field, rename a column to it with `columns:`, or set data.on_bad_row=skip.")

    if fmt in PAIR_FORMATS:
        prompt, chosen, rejected = _pair(record, fmt, system_prompt)
        if kind == "preference":
            out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            if record.get("margin") is not None:
                out["margin"] = _margin(record)
            return [out]
        if kind == "unpaired":
            return [{"prompt": prompt, "completion": chosen, "label": True},
                    {"prompt": prompt, "completion": rejected, "label": False}]
        return [_prompt_record(record, prompt, consumed=("prompt",) + FORMAT_FIELDS[fmt][0] + FORMAT_FIELDS[fmt][1])]

    base = LABELLED_FORMATS.get(fmt, fmt)
    if kind == "prompt":
        return [_prompt_record(record, *_prompt_only(record, base, system_prompt))]

    prompt, completion = _prompt_completion(record, base, system_prompt)
    if kind == "sft":
        if isinstance(completion, list):
            return [{"messages": prompt + completion}]
        return [{"text": completion}] if prompt is None else [{"prompt": prompt, "completion": completion}]
    if kind == "unpaired":
        name = _field_name(record, "label")
        return [{"prompt": prompt, "completion": completion, "label": _label(record.get(name), name)}]
    # scored
    score = _score(record)
    if prompt is None:
        return [{"text": completion, "score": score}]
    return [{"prompt": prompt, "completion": completion, "score": score}]


def normalize_rows(rows: list[Row], kind: str, *, fmt: str = "auto", system_prompt: str | None = None,
                   on_bad_row: str = "error", skipped: list[DataError] | None = None) -> list[list[Row]]:
    """Canonical records for each row, grouped per input row (a group holds two rows for a preference
    pair read as unpaired data, none for a skipped row). The format is detected once per source, from its
    first row that matches one. Bad rows raise DataError, or with ``on_bad_row="skip"`` are logged,
    appended to ``skipped`` and dropped."""
    groups: list[list[Row]] = []
    source_fmt = fmt
    for row in rows:
        try:
            if source_fmt == "auto":
                detected = detect_format(row.data, kind)
                out = normalize_record(row.data, kind, detected, system_prompt)
                source_fmt = detected
            else:
                out = normalize_record(row.data, kind, source_fmt, system_prompt)
        except DataError as e:
            err = e.at(row)
            if on_bad_row != "skip":
                raise err from None
            logger.warning("skipping bad row: %s", err)
            if skipped is not None:
                skipped.append(err)
            continue
        groups.append([row.with_data(r) for r in out])
    return groups


# --------------------------------------------------------------------------------------------------
# The closest accepted format, and the mapping that loads a record as it
# --------------------------------------------------------------------------------------------------

# Column names people use for the fields alignkit expects, tried first when suggesting a `columns:` map.
FIELD_SYNONYMS: dict[str, tuple[str, ...]] = {
    "prompt": ("question", "query", "instruction", "input", "problem", "context", "request", "user"),
    "completion": ("answer", "response", "output", "target", "solution", "reply", "assistant", "chosen"),
    "chosen": ("chosen_response", "preferred", "better", "good", "accepted", "winner", "positive"),
    "rejected": ("rejected_response", "dispreferred", "worse", "bad", "loser", "negative"),
    "label": ("desirable", "is_good", "feedback", "thumbs_up", "kto_label"),
    "messages": ("conversation", "conversations", "chat", "dialogue", "dialog", "turns"),
    "conversations": ("conversation", "messages", "chat", "dialogue", "dialog", "turns"),
    "instruction": ("question", "query", "prompt", "task", "problem"),
    "output": ("answer", "response", "completion", "target", "solution"),
    "text": ("content", "document", "body", "passage", "sentence"),
    "score": ("rating", "reward_score", "quality", "grade", "value"),
}
_PLAIN_NAME = re.compile(r"[A-Za-z_][\w.-]*")
# Among equally close formats, suggest the plain TRL shapes before the Alpaca/ShareGPT ones.
_GENERIC_FORMATS = ("prompt_completion", "preference", "unpaired", "messages", "text", "prompt")


@dataclass
class Suggestion:
    """How to load a record as format ``fmt``: rename ``columns`` and, when auto-detection would pick
    another format, set ``format:``. ``unused`` fields would be ignored."""

    fmt: str
    columns: dict[str, str]
    set_format: bool
    unused: list[str]

    def settings(self) -> str:
        parts = [f"`columns: {_flow_mapping(self.columns)}`"] if self.columns else []
        if self.set_format:
            parts.append(f"`format: {self.fmt}`")
        return " and ".join(parts)

    def text(self, kind: str) -> str:
        ignored = f" (it ignores {', '.join(map(repr, self.unused))})" if self.unused else ""
        return (f"The closest format kind {kind!r} accepts is {self.fmt}: set {self.settings()} on this data "
                f"source{ignored}.")


def suggest_format(record: dict[str, Any], kind: str) -> Suggestion | None:
    """The accepted format of ``kind`` closest to ``record`` (fewest ignored fields, then fewest renames),
    with the settings that load it; each candidate is checked by normalising the renamed record. None when
    no simple renaming works."""
    best: Suggestion | None = None
    best_key: tuple = ()
    for fmt in KIND_FORMATS[kind]:
        generic = fmt not in _GENERIC_FORMATS
        for columns in _candidate_mappings(record, fmt, kind):
            renamed = rename_fields(record, columns)
            try:
                normalize_record(renamed, kind, fmt)
            except DataError:
                continue
            found = Suggestion(fmt, columns, _matching_format(renamed) != fmt, _unused_fields(renamed, fmt, kind))
            key = (len(found.unused), len(columns), found.set_format, generic)
            if best is None or key < best_key:
                best, best_key = found, key
    return best


def _fix_text(record: dict[str, Any], kind: str, replace_format: bool = False) -> str:
    """The closest format's settings, or general advice; ``replace_format``: the source sets a `format:`
    that must change too."""
    found = suggest_format(record, kind)
    if found is not None:
        found.set_format = found.set_format or replace_format
        return found.text(kind)
    return "Rename the columns to one of these shapes with `columns:` of the data source."


def _candidate_mappings(record: dict[str, Any], fmt: str, kind: str) -> Iterator[dict[str, str]]:
    """`columns:` mappings (old -> new, in the record's column order) that would give ``record`` the
    required fields of ``fmt`` (and, where a column looks like one, its optional fields)."""
    required, optional = FORMAT_FIELDS[fmt]
    if kind == "scored" and not any(_present(record, f) for f in SCORE_FIELDS):
        required += ("score",)
    missing = [f for f in required if not _present(record, f)]
    if any(f in record for f in missing):
        return  # a None-valued column of that name would block the rename
    used = {n for f in required + optional for n in FIELD_ALIASES.get(f, (f,))}
    free = [k for k, v in record.items() if v is not None and k not in used]
    targets = missing + [f for f in optional if f not in record]
    options = [_source_columns(f, free) + ([] if f in missing else [None]) for f in targets]
    for sources in itertools.product(*options):
        chosen = [s for s in sources if s is not None]
        if len(set(chosen)) == len(chosen):
            mapping = dict(zip(sources, targets))
            yield {source: mapping[source] for source in record if source in mapping}


def _source_columns(field: str, free: list[str]) -> list[str]:
    """Up to three columns of ``free`` that may hold ``field``: known synonyms first, then similar names."""
    named = [s for s in FIELD_SYNONYMS.get(field, ()) if s in free]
    similar = difflib.get_close_matches(field, free, n=3, cutoff=0.6)
    return list(dict.fromkeys(named + similar))[:3]


def _unused_fields(record: dict[str, Any], fmt: str, kind: str) -> list[str]:
    if kind == "prompt":
        return []  # every other field passes through to reward functions
    required, optional = FORMAT_FIELDS[fmt]
    used = {n for f in required + optional for n in FIELD_ALIASES.get(f, (f,))}
    if kind == "scored":
        used.update(SCORE_FIELDS)
    if fmt in PAIR_FORMATS and kind == "preference":
        used.add("margin")  # an optional preference strength (reward models)
    return sorted(k for k, v in record.items() if v is not None and k not in used)


def _flow_mapping(columns: dict[str, str]) -> str:
    def name(s: str) -> str:
        return s if _PLAIN_NAME.fullmatch(s) else json.dumps(s)
    return "{" + ", ".join(f"{name(old)}: {name(new)}" for old, new in columns.items()) + "}"


# --------------------------------------------------------------------------------------------------
# Per-format readers
# --------------------------------------------------------------------------------------------------


def _prompt_completion(record: dict, fmt: str, system_prompt: str | None) -> tuple[Any, Any]:
    """(prompt, completion): both message lists, or strings (prompt None for plain text)."""
    if fmt in ("messages", "sharegpt"):
        messages = _conversation(record, fmt, system_prompt)
        check_roles(messages, "messages" if fmt == "messages" else "conversations", end="assistant")
        last = max(i for i, m in enumerate(messages) if m["role"] != "assistant") + 1
        return messages[:last], messages[last:]
    if fmt == "alpaca":
        prompt = _with_system(_alpaca_prompt(record), system_prompt)
        return prompt, [{"role": "assistant", "content": _text(record, "output")}]
    if fmt == "text":
        return None, _text(record, "text")
    # prompt_completion / unpaired: strings or message lists; one of each is made conversational
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt = _messages_or_turn(prompt, "prompt", "user")
        completion = _messages_or_turn(completion, "completion", "assistant")
        prompt = _with_system(prompt, system_prompt)
        _check_split(prompt, completion, "completion")
        return prompt, completion
    return _text(record, "prompt"), _text(record, "completion")


def _prompt_only(record: dict, fmt: str, system_prompt: str | None) -> tuple[Any, tuple[str, ...]]:
    """(prompt, consumed fields) for kind "prompt"."""
    if fmt in ("messages", "sharegpt"):
        field = "messages" if fmt == "messages" else "conversations"
        messages = _conversation(record, fmt, system_prompt)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        check_roles(messages, field, end="user")
        return messages, (field, "system")
    if fmt == "alpaca":
        prompt = _with_system(_alpaca_prompt(record), system_prompt)
        check_roles(prompt, "instruction", end="user")
        return prompt, ("instruction", "input", "output", "system", "history")
    if fmt == "text":
        return _text(record, "text"), ("text",)
    prompt = record["prompt"]
    if isinstance(prompt, list):
        prompt = _with_system(_messages(prompt, "prompt"), system_prompt)
        check_roles(prompt, "prompt", end="user")
    else:
        prompt = _text(record, "prompt")
    return prompt, ("prompt", "completion")


def _prompt_record(record: dict, prompt: Any, consumed: tuple[str, ...]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in consumed}
    out["prompt"] = prompt
    return out


def _margin(record: dict) -> float:
    try:
        value = float(record["margin"])
    except (TypeError, ValueError):
        raise DataError(f"must be a number, got {record['margin']!r}", field="margin",
                        fix="Use a numeric preference strength, or drop the column.") from None
    if not math.isfinite(value):
        raise DataError(f"must be finite, got {value}", field="margin", fix="Use a finite number.")
    return value


def _pair(record: dict, fmt: str, system_prompt: str | None) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a pair format."""
    if fmt == "preference":
        return _preference(record, system_prompt)
    if fmt == "sharegpt_preference":
        trl = {"prompt": _sharegpt_messages(record),
               "chosen": _sharegpt_reply(record["chosen"], "chosen"),
               "rejected": _sharegpt_reply(record["rejected"], "rejected")}
        return _named_as(_preference, {"prompt": "conversations"}, trl, system_prompt)
    trl = {"prompt": _alpaca_prompt(record), "chosen": _text(record, "chosen"), "rejected": _text(record, "rejected")}
    return _named_as(_preference, {"prompt": "instruction"}, trl, system_prompt)


def _named_as(fn: Callable, names: dict[str, str], *args) -> Any:
    """``fn(*args)`` with the field of its DataError renamed to the record's own name for it."""
    try:
        return fn(*args)
    except DataError as e:
        if e.field not in names:
            raise
        raise DataError(e.problem, field=names[e.field], fix=e.fix) from None


def _preference(record: dict, system_prompt: str | None) -> tuple[Any, Any, Any]:
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    conversational = any(isinstance(x, list) for x in (prompt, chosen, rejected))
    if not conversational:
        if prompt is None:
            raise DataError(
                "chosen/rejected are plain strings and there is no prompt; a shared string prefix cannot be "
                "split into prompt and completion safely", field="prompt",
                fix="Add an explicit `prompt` column (and keep only the completions in chosen/rejected).")
        return _text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected")

    chosen = _messages_or_turn(chosen, "chosen", "assistant")
    rejected = _messages_or_turn(rejected, "rejected", "assistant")
    if prompt is None:  # implicit prompt: the leading messages both conversations share
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":
            n -= 1  # the completion starts at an assistant turn
        if n == 0:
            raise DataError("chosen and rejected share no leading prompt messages (implicit prompt format)",
                            field="chosen",
                            fix="Add an explicit `prompt` column, or make chosen/rejected full conversations "
                                "that start with the same prompt messages.")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt = _messages_or_turn(prompt, "prompt", "user")
        # Some datasets repeat the prompt inside chosen/rejected; keep only the completion.
        if chosen[: len(prompt)] == prompt and len(chosen) > len(prompt):
            chosen = chosen[len(prompt):]
        if rejected[: len(prompt)] == prompt and len(rejected) > len(prompt):
            rejected = rejected[len(prompt):]
    prompt = _with_system(prompt, system_prompt)
    _check_split(prompt, chosen, "chosen")
    _check_split(prompt, rejected, "rejected")
    return prompt, chosen, rejected


def _check_split(prompt: list[Message], completion: list[Message], field: str) -> None:
    check_roles(prompt, "prompt", end="user")
    if not completion:
        raise DataError("empty: no completion messages after the prompt", field=field,
                        fix="Give it the assistant turn(s) that answer the prompt.")
    if any(m["role"] != "assistant" for m in completion):
        raise DataError(f"completion messages must be assistant turns, got roles {[m['role'] for m in completion]}",
                        field=field, fix="Move user/system turns into the prompt.")
    check_roles(prompt + completion, field, end="assistant")


def _conversation(record: dict, fmt: str, system_prompt: str | None) -> list[Message]:
    if fmt == "messages":
        return _with_system(_messages(record["messages"], "messages"), system_prompt)
    return _with_system(_messages(_sharegpt_messages(record), "conversations"), system_prompt)


def _sharegpt_messages(record: dict) -> list[Message]:
    """The ``conversations`` turns as messages, led by the record's ``system`` field when it has one."""
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"expected a list of turns, got {type(turns).__name__}", field="conversations",
                        fix='Use [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}].')
    messages = [_sharegpt_turn(turn, i, "conversations") for i, turn in enumerate(turns)]
    return _with_system(messages, _optional_text(record, "system"))


def _sharegpt_turn(turn: Any, i: int, field: str) -> Message:
    if not isinstance(turn, dict):
        raise DataError(f"turn {i} is a {type(turn).__name__}, not an object", field=field,
                        fix='Each turn must look like {"from": "human", "value": "..."}.')
    speaker = turn.get("from", turn.get("role"))
    role = SHAREGPT_ROLES.get(str(speaker).lower())
    if role is None and str(speaker).lower() in TOOL_SPEAKERS:
        raise DataError(f"turn {i} is a tool turn (from={speaker!r}); tool calls and results are not supported",
                        field=field, fix="Drop such rows (data.on_bad_row=skip).")
    if role is None:
        raise DataError(f"turn {i} has from={speaker!r}; known speakers: {', '.join(SHAREGPT_ROLES)}",
                        field=field, fix="Map other speakers to human/gpt/system first.")
    return {"role": role, "content": turn.get("value", turn.get("content"))}


def _sharegpt_reply(value: Any, field: str) -> Any:
    """A ShareGPT ``chosen``/``rejected``: one turn object (LLaMA-Factory), a list of turns, or a string."""
    if isinstance(value, dict):
        return [_sharegpt_turn(value, 0, field)]
    if isinstance(value, list):
        return [_sharegpt_turn(turn, i, field) for i, turn in enumerate(value)]
    return value


def _alpaca_prompt(record: dict) -> list[Message]:
    """[system], history turns, then the user turn ``instruction`` + blank line + ``input``."""
    user = _text(record, "instruction")
    extra = record.get("input")
    if isinstance(extra, str) and extra.strip():
        user = f"{user}\n\n{extra}"
    messages = _history(record.get("history"), "history") + [{"role": "user", "content": user}]
    return _with_system(messages, _optional_text(record, "system"))


def _history(value: Any, field: str) -> list[Message]:
    """Alpaca ``history``: [[instruction, response], ...] as alternating user/assistant messages."""
    if value is None or value == []:
        return []
    ok = isinstance(value, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value)
    if not ok:
        raise DataError(f"expected a list of [instruction, response] pairs, got {value!r}"[:300], field=field,
                        fix='Use [["first question", "first answer"], ...], or drop the column.')
    turns = [{"role": role, "content": text} for pair in value for role, text in zip(("user", "assistant"), pair)]
    return _messages(turns, field)


def _messages(value: Any, field: str) -> list[Message]:
    """Validate a message list's shape (not its role order) and keep only role and content."""
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {type(value).__name__}", field=field,
                        fix='Use [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}].')
    if not value:
        raise DataError("empty (no messages)", field=field, fix="Give it at least one message, or skip the row.")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(f"message {i} is not an object with a role: {m!r}"[:300], field=field,
                            fix='Each message must look like {"role": "user", "content": "..."}.')
        if m["role"] not in ROLES:
            raise DataError(f"message {i} has role {m['role']!r}; roles must be one of {', '.join(ROLES)}",
                            field=field, fix="Rename the role or drop the message (tool turns are not supported).")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"message {i} ({m['role']}) has content of type {type(content).__name__}, not text",
                            field=field, fix="Give every message a text content.")
        if not content.strip():
            raise DataError(f"message {i} ({m['role']}) has empty content", field=field,
                            fix="Fill it in or drop the row (data.on_bad_row=skip).")
        out.append({"role": m["role"], "content": content})
    return out


def _messages_or_turn(value: Any, field: str, role: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError("empty", field=field, fix="Fill it in or drop the row (data.on_bad_row=skip).")
        return [{"role": role, "content": value}]
    return _messages(value, field)


def check_roles(messages: list[Message], field: str, end: str | None = None) -> None:
    """Role order: optional system first, then user/assistant alternating from user; optionally the
    last turn must be ``end``."""
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    fix = "Use: optional system message, then user and assistant turns alternating, starting with user."
    if "system" in body:
        raise DataError(f"a system message must come first (roles: {roles})", field=field, fix=fix)
    if not body:
        raise DataError(f"no user or assistant turns (roles: {roles})", field=field, fix=fix)
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            what = "the first turn after an optional system message" if i == 0 else f"turn {i} (after {body[i - 1]})"
            raise DataError(f"{what} is {role!r}, expected {expected!r} (roles: {roles})", field=field, fix=fix)
    if end is not None and body[-1] != end:
        raise DataError(f"the last turn must be {end!r}, got {body[-1]!r} (roles: {roles})", field=field,
                        fix="Drop trailing turns or add the missing one." if end == "assistant" else
                        "A prompt must end with the user turn to answer.")


def _with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def _text(record: dict, field: str) -> str:
    value = record.get(field)
    if value is None:
        raise DataError("missing", field=field, fix="Add the field or drop the row (data.on_bad_row=skip).")
    if not isinstance(value, str):
        raise DataError(f"expected text, got {type(value).__name__}", field=field,
                        fix="Give it a string (or a list of messages where conversations are allowed).")
    if not value.strip():
        raise DataError("empty", field=field, fix="Fill it in or drop the row (data.on_bad_row=skip).")
    return value


def _optional_text(record: dict, field: str) -> str | None:
    """An optional text field: None when absent or blank, else it must be text."""
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(record, field)


def _label(value: Any, field: str = "label") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"expected true/false (or 1/0), got {value!r}", field=field,
                    fix="Use true for desirable completions and false for undesirable ones.")


def _score(record: dict) -> float:
    for field in SCORE_FIELDS:
        value = record.get(field)
        if value is None:
            continue
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise DataError(f"expected a number, got {value!r}", field=field, fix="Give every row a numeric score.") \
                from None
        if not math.isfinite(score):
            raise DataError(f"not a finite number ({value!r})", field=field, fix="Give every row a finite score.")
        return score
    raise DataError(f"missing: kind 'scored' needs a score column named {', '.join(SCORE_FIELDS)}", field="score",
                    fix="Rename your score column with `columns:`, e.g. {rating: score}.")


# --------------------------------------------------------------------------------------------------
# LLaMA-Factory dataset_info.json entries (see its data/README.md)
# --------------------------------------------------------------------------------------------------

LLAMAFACTORY_COLUMNS = ("prompt", "query", "response", "history", "messages", "system", "tools", "images",
                        "videos", "audios", "chosen", "rejected", "kto_tag")
LLAMAFACTORY_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag",
                     "system_tag")
LLAMAFACTORY_ENTRY_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name",
                           "subset", "split", "folder", "num_samples", "formatting", "ranking", "columns", "tags")
# LLaMA-Factory's defaults, used only when an entry has no "columns" (or no "tags"): given ones replace
# them all, and a role left out is unset.
_LF_DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
_LF_DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


@dataclass(frozen=True)
class LlamaFactoryFormat:
    """How LLaMA-Factory reads the records of one dataset_info.json entry: ``columns`` maps its column
    roles (prompt, query, response, messages, chosen, kto_tag, ...) to column names in the data, ``tags``
    names the keys and role values of ShareGPT turns."""

    formatting: str
    ranking: bool
    columns: dict[str, str | None]
    tags: dict[str, str | None]


def llamafactory_format(entry: dict[str, Any], where: str) -> LlamaFactoryFormat:
    """The record format of a dataset_info.json entry (``where`` names it in errors)."""
    _known_keys(entry, LLAMAFACTORY_ENTRY_KEYS, where, "entry key")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"formatting {formatting!r} is not one of alpaca, sharegpt, openai", source=where,
                        field="formatting", fix="Fix \"formatting\" in the entry.")
    if not isinstance(entry.get("ranking", False), bool):
        raise DataError(f"ranking must be true or false, got {entry['ranking']!r}", source=where, field="ranking",
                        fix="Fix \"ranking\" in the entry.")
    columns = _lf_names(entry, "columns", LLAMAFACTORY_COLUMNS, _LF_DEFAULT_COLUMNS, where)
    media = [c for c in ("images", "videos", "audios") if columns[c]]
    if media:
        raise DataError(f"multimodal columns ({', '.join(media)}) are not supported", source=where, field="columns",
                        fix="Use a text-only dataset.")
    tags = _lf_names(entry, "tags", LLAMAFACTORY_TAGS, _LF_DEFAULT_TAGS, where)
    return LlamaFactoryFormat(formatting, entry.get("ranking", False), columns, tags)


def _known_keys(mapping: dict[str, Any], known: tuple[str, ...], where: str, what: str) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DataError(f"unknown {what} {key!r}", source=where, field=key,
                            fix=f"{hint}Known: {', '.join(known)}.")


def _lf_names(entry: dict[str, Any], key: str, names: tuple[str, ...], defaults: dict[str, str],
              where: str) -> dict[str, str | None]:
    if key not in entry:
        return {n: defaults.get(n) for n in names}
    given = entry[key]
    if not isinstance(given, dict) or not all(isinstance(v, str) or v is None for v in given.values()):
        raise DataError(f"expected an object of names, got {given!r}"[:300], source=where, field=key,
                        fix=f'Write e.g. "{key}": {{"{names[0]}": "..."}}.')
    _known_keys(given, names, where, key[:-1])
    return {n: given.get(n) for n in names}


def from_llamafactory(record: dict[str, Any], fmt: LlamaFactoryFormat) -> dict[str, Any]:
    """One LLaMA-Factory record as an alignkit input record, read the way LLaMA-Factory reads it:

    - alpaca: user turn ``prompt`` + "\\n" + ``query`` after the ``history`` turns, ``system`` first; with
      ``kto_tag``: {prompt, completion, label}; ranking: {prompt, chosen, rejected}; with ``response``:
      {messages}; otherwise {text} (LLaMA-Factory's pre-training shape) or {prompt} when history or
      system are mapped;
    - sharegpt / openai: turns read with ``tags`` (a leading ``system_tag`` turn, or the ``system``
      column, becomes the system message); with ``kto_tag``: {messages, label}; ranking: {prompt,
      chosen, rejected} where chosen/rejected are one turn object each; otherwise {messages}.

    Raises DataError naming the column.
    """
    tools = fmt.columns["tools"]
    if tools and _lists_tools(record.get(tools)):
        raise DataError("tool descriptions are not supported", field=tools,
                        fix="Drop such rows (data.on_bad_row=skip), or remove \"tools\" from the entry's columns "
                            "to train without them.")
    if fmt.formatting == "alpaca":
        return _lf_alpaca(record, fmt.columns, fmt.ranking)
    return _lf_sharegpt(record, fmt)


def _lists_tools(value: Any) -> bool:
    """Whether a tools column describes any tool (LLaMA-Factory data writes "[]" for none)."""
    if isinstance(value, str):
        return value.strip() not in ("", "[]", "{}")
    return bool(value)


def _lf_value(record: dict[str, Any], column: str | None, *, text: bool = False) -> Any:
    """The value of a mapped column (None when the role is not mapped); missing values are errors."""
    if column is None:
        return None
    value = record.get(column)
    if value is None:
        raise DataError("missing", field=column, fix="Every row needs this column (the entry's \"columns\" map it).")
    if text and not isinstance(value, str):
        raise DataError(f"expected text, got {type(value).__name__}", field=column, fix="Give it a string.")
    return value


def _lf_optional_text(record: dict[str, Any], column: str | None) -> str | None:
    if column is None or record.get(column) is None:
        return None
    return _lf_value(record, column, text=True)


def _lf_alpaca(record: dict[str, Any], columns: dict[str, str | None], ranking: bool) -> dict[str, Any]:
    parts = (_lf_value(record, columns["prompt"], text=True), _lf_optional_text(record, columns["query"]))
    user = "\n".join(p for p in parts if p)  # LLaMA-Factory joins the non-empty ones with one newline
    prompt = _history(record.get(columns["history"]), columns["history"]) if columns["history"] else []
    prompt.append({"role": "user", "content": user})
    system = _lf_optional_text(record, columns["system"])
    if system:
        prompt.insert(0, {"role": "system", "content": system})
    if columns["kto_tag"]:
        return {"prompt": prompt, "completion": [_assistant(_lf_value(record, columns["response"], text=True))],
                "label": _lf_value(record, columns["kto_tag"])}
    if ranking:
        return {"prompt": prompt, "chosen": _lf_value(record, columns["chosen"], text=True),
                "rejected": _lf_value(record, columns["rejected"], text=True)}
    if columns["response"]:
        return {"messages": prompt + [_assistant(_lf_value(record, columns["response"], text=True))]}
    return {"prompt": prompt} if len(prompt) > 1 else {"text": user}


def _assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def _lf_sharegpt(record: dict[str, Any], fmt: LlamaFactoryFormat) -> dict[str, Any]:
    column, tags = fmt.columns["messages"], fmt.tags
    turns = _lf_value(record, column)
    if not isinstance(turns, list):
        raise DataError(f"expected a list of turns, got {type(turns).__name__}", field=column,
                        fix=f'Use [{{"{tags["role_tag"]}": "{tags["user_tag"]}", "{tags["content_tag"]}": ...}}, ...].')
    first = 0
    system = _lf_optional_text(record, fmt.columns["system"])
    if turns and tags["system_tag"] and isinstance(turns[0], dict) and turns[0].get(tags["role_tag"]) == tags["system_tag"]:
        system, first = turns[0].get(tags["content_tag"]), 1
    messages = [_lf_turn(turn, i, tags, column) for i, turn in enumerate(turns) if i >= first]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    if fmt.columns["kto_tag"]:
        return {"messages": messages, "label": _lf_value(record, fmt.columns["kto_tag"])}
    if fmt.ranking:
        replies = {}
        for side in ("chosen", "rejected"):
            reply = _lf_value(record, fmt.columns[side])
            if not isinstance(reply, dict):
                raise DataError(f"expected one message object, got {type(reply).__name__}", field=fmt.columns[side],
                                fix=f'Use {{"{tags["role_tag"]}": "{tags["assistant_tag"]}", "{tags["content_tag"]}": ...}}.')
            replies[side] = [_lf_turn(reply, 0, tags, fmt.columns[side])]
        return {"prompt": messages, **replies}
    return {"messages": messages}


def _lf_turn(turn: Any, i: int, tags: dict[str, str | None], field: str) -> Message:
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    if not isinstance(turn, dict):
        raise DataError(f"turn {i} is a {type(turn).__name__}, not an object", field=field,
                        fix=f'Each turn must look like {{"{role_tag}": ..., "{content_tag}": ...}}.')
    tag = turn.get(role_tag)
    if tag is not None and tag in (tags["observation_tag"], tags["function_tag"]):
        raise DataError(f"turn {i} is a tool turn ({role_tag}={tag!r}); tool calls and results are not supported",
                        field=field, fix="Drop such rows (data.on_bad_row=skip).")
    roles = {tags[t]: role for t, role in (("user_tag", "user"), ("assistant_tag", "assistant"),
                                           ("system_tag", "system")) if tags[t] is not None}
    if tag not in roles:
        known = ", ".join(f"{t!r} ({r})" for t, r in roles.items())
        raise DataError(f"turn {i} has {role_tag}={tag!r}, which the entry's tags do not name; tags: {known}",
                        field=field, fix="Fix the turn, or the entry's \"tags\" (e.g. \"user_tag\", \"system_tag\").")
    return {"role": roles[tag], "content": turn.get(content_tag)}
