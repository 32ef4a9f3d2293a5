"""Normalise raw records (TRL, Alpaca, ShareGPT, plain text, ...) to one canonical record per *kind*.

Input formats (``DataSource.format``; ``auto`` detects one per source from its first row):

=================  ==========================================================================
messages           ``messages``: [{role, content}, ...] (TRL conversational)
sharegpt           ``conversations``: [{from, value}, ...]
preference         ``chosen``, ``rejected`` and an optional ``prompt`` (TRL explicit / implicit prompt)
unpaired           ``prompt``, ``completion``, ``label`` (TRL KTO)
alpaca             ``instruction``, optional ``input``, ``output``
prompt_completion  ``prompt``, ``completion`` (strings or message lists)
text               ``text``
prompt             ``prompt`` alone (prompt-only data for online methods)
=================  ==========================================================================

Canonical records per kind (what :mod:`alignkit.data.tokenize` consumes):

- ``sft``: {messages} | {prompt: str, completion: str} | {text}
- ``preference``: {prompt, chosen, rejected}: all message lists (completions hold only the assistant
  turns) or all strings
- ``unpaired``: {prompt, completion, label: bool}
- ``prompt``: {prompt: messages | str, **other fields of the record}
- ``scored``: {prompt, completion, score: float} | {text, score: float}
"""

from __future__ import annotations

import logging
import math
from typing import Any

from alignkit.data.sources import DataError, Row

logger = logging.getLogger("alignkit")

KINDS = ("sft", "preference", "unpaired", "prompt", "scored")

# Input format -> (required fields, optional fields), in the order ``auto`` tries them.
FORMAT_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
    "preference": (("chosen", "rejected"), ("prompt",)),
    "unpaired": (("prompt", "completion", "label"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
    "prompt": (("prompt",), ()),
}

# Kind -> input formats it accepts.
KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "sharegpt", "alpaca", "prompt_completion", "text"),
    "preference": ("preference",),
    "unpaired": ("unpaired", "preference"),
    "prompt": ("prompt", "messages", "sharegpt", "alpaca", "prompt_completion", "unpaired", "preference", "text"),
    "scored": ("messages", "sharegpt", "alpaca", "prompt_completion", "unpaired", "text"),
}

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

Message = dict[str, str]


def accepted_shapes(kind: str) -> str:
    """What ``kind`` accepts, for error messages."""
    parts = []
    for fmt in KIND_FORMATS[kind]:
        required, optional = FORMAT_FIELDS[fmt]
        fields = ", ".join(list(required) + [f"[{o}]" for o in optional])
        parts.append(f"{fmt} ({fields})")
    extra = " plus a score column (score, label or reward)" if kind == "scored" else ""
    return f"kind {kind!r} accepts: " + "; ".join(parts) + extra


def detect_format(record: dict[str, Any], kind: str) -> str:
    """The input format of ``record`` (first match in FORMAT_FIELDS order). Raises DataError."""
    for fmt, (required, _) in FORMAT_FIELDS.items():
        if all(record.get(f) is not None for f in required):
            if fmt in KIND_FORMATS[kind]:
                return fmt
            if fmt == "prompt":
                break
            raise DataError(
                f"this record looks like format {fmt!r} ({', '.join(required)}), which kind {kind!r} does not "
                f"use; {accepted_shapes(kind)}",
                fix="Rename columns with `columns:` or set `format:` of the data source explicitly.")
    raise DataError(
        f"no known format matches the fields {sorted(record)}; {accepted_shapes(kind)}",
        fix="Rename columns with `columns:` of the data source, e.g. {question: prompt, answer: completion}.")


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
                        field="format", fix="Fix `format:` of the data source or use other data.")
    for f in FORMAT_FIELDS[fmt][0]:
        if record.get(f) is None:
            raise DataError(f"missing (format {fmt!r} needs {', '.join(FORMAT_FIELDS[fmt][0])})", field=f,
                            fix="Add the field, rename a column to it with `columns:`, or set data.on_bad_row=skip.")

    if fmt == "preference":
        prompt, chosen, rejected = _preference(record, system_prompt)
        if kind == "preference":
            out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            if record.get("margin") is not None:
                out["margin"] = _margin(record)
            return [out]
        if kind == "unpaired":
            return [{"prompt": prompt, "completion": chosen, "label": True},
                    {"prompt": prompt, "completion": rejected, "label": False}]
        return [_prompt_record(record, prompt, consumed=("prompt", "chosen", "rejected"))]

    if kind == "prompt":
        return [_prompt_record(record, *_prompt_only(record, fmt, system_prompt))]

    prompt, completion = _prompt_completion(record, fmt, system_prompt)
    if kind == "sft":
        if isinstance(completion, list):
            return [{"messages": prompt + completion}]
        return [{"text": completion}] if prompt is None else [{"prompt": prompt, "completion": completion}]
    if kind == "unpaired":
        return [{"prompt": prompt, "completion": completion, "label": _label(record.get("label"))}]
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
        user = _text(record, "instruction")
        extra = record.get("input")
        if isinstance(extra, str) and extra.strip():
            user = f"{user}\n\n{extra}"
        prompt = _with_system([{"role": "user", "content": user}], system_prompt)
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
        return messages, (field,)
    if fmt == "alpaca":
        prompt, _ = _prompt_completion(record, fmt, system_prompt)
        return prompt, ("instruction", "input", "output")
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
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"expected a list of turns, got {type(turns).__name__}", field="conversations",
                        fix='Use [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}].')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} is a {type(turn).__name__}, not an object", field="conversations",
                            fix='Each turn must look like {"from": "human", "value": "..."}.')
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise DataError(f"turn {i} has from={speaker!r}; known speakers: {', '.join(SHAREGPT_ROLES)}",
                            field="conversations", fix="Map other speakers to human/gpt/system first.")
        content = turn.get("value", turn.get("content"))
        messages.append({"role": role, "content": content})
    return _with_system(_messages(messages, "conversations"), system_prompt)


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


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"expected true/false (or 1/0), got {value!r}", field="label",
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
