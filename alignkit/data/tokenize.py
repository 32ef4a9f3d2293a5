"""Tokenize canonical records: chat templates, assistant-only labels, truncation, packing, padding.

Conversations go through the tokenizer's chat template (rendered to text, then tokenized without
special tokens: the template already writes them). Plain strings do not: a plain prompt gets the bos
token when the tokenizer itself adds one, a plain completion gets eos appended.

Completions end at their end-of-turn token: whatever a template writes after the last eos of a
completion (ChatML's "\\n" after ``<|im_end|>``) is dropped at the end of a sequence and left out of the
loss inside multi-turn conversations, so the labelled tokens of a turn are exactly its text + eos.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from typing import Any

import torch

from alignkit.data.rows import DataError

logger = logging.getLogger("alignkit")

IGNORE_INDEX = -100

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Truncation counters written into the ``stats`` Counter given to tokenize_example.
PROMPT_CUT, COMPLETION_CUT = "truncated_prompt", "truncated_completion"


def ensure_chat_template(tokenizer) -> bool:
    """Give ``tokenizer`` a ChatML template when it has none. Returns whether it changed."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    known = set(tokenizer.get_vocab())
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in known]
    logger.warning(
        "the tokenizer has no chat template; using the default ChatML template%s",
        f" (note: {', '.join(missing)} are not single tokens in this vocabulary; add them as special tokens "
        "and resize the embeddings, or set model.chat_template)" if missing else "",
    )
    return True


# --------------------------------------------------------------------------------------------------
# Encoding helpers
# --------------------------------------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself starts sequences with bos, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    adds_bos = list(tokenizer("a", add_special_tokens=True)["input_ids"][:1]) == [bos]
    return [bos] if adds_bos else []


_warned_no_eos: set[int] = set()


def _eos(tokenizer) -> list[int]:
    if tokenizer.eos_token_id is None:
        if id(tokenizer) not in _warned_no_eos:  # once per tokenizer, not once per row
            _warned_no_eos.add(id(tokenizer))
            logger.warning("the tokenizer has no eos token: plain completions get no end marker")
        return []
    return [tokenizer.eos_token_id]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template, so conversations cannot be tokenized",
                        fix="Call alignkit.data.ensure_chat_template(tokenizer) or set model.chat_template.")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template is user-supplied code (e.g. raises on a system role it does not support)
        raise DataError(f"the chat template failed on this conversation ({type(e).__name__}: {e})",
                        field="chat_template",
                        fix="Fix the conversation, or set model.chat_template to a template that accepts it.") from e


def _template_error(what: str) -> DataError:
    return DataError(
        f"the chat template does not render {what} as a prefix of the longer conversation, so prompt and "
        "completion tokens cannot be told apart (templates that rewrite earlier turns, e.g. drop reasoning "
        "from past assistant turns, or render the final turn differently do this)",
        field="chat_template",
        fix="Set model.chat_template to a template whose renders of conversation prefixes are prefixes "
            "of the full render (e.g. ChatML).")


def _continue(tokenizer, text: str, ids: list[int], longer_text: str, what: str) -> list[int]:
    """Tokens that extend ``ids`` (the tokens of ``text``) to ``longer_text``.

    The template must render ``text`` as a string prefix of ``longer_text``. When the tokenizer merges
    tokens across that boundary, the new part is tokenized on its own (prefix tokens stay fixed).
    """
    if not longer_text.startswith(text):
        raise _template_error(what)
    full = encode(tokenizer, longer_text)
    if full[: len(ids)] == ids:
        return full[len(ids):]
    return encode(tokenizer, longer_text[len(text):])


def _split_after_eos(ids: list[int], eos: int | None) -> tuple[list[int], list[int]]:
    """(ids up to and including the last eos, the rest)."""
    if eos is None or eos not in ids:
        return ids, []
    k = len(ids) - ids[::-1].index(eos)
    return ids[:k], ids[k:]


def tokenize_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, prompt_len) for an sft conversation ending with an assistant turn.

    Labels are IGNORE_INDEX except on assistant turns (their text and end-of-turn token). ``prompt_len``
    is where the last assistant turn starts: everything before it counts as prompt for truncation.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    prompt_len = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        new = _continue(tokenizer, text, ids, before, "the earlier turns")
        ids += new
        labels += [IGNORE_INDEX] * len(new)
        prompt_len = len(ids)
        upto = render(tokenizer, messages[: i + 1])
        turn, tail = _split_after_eos(_continue(tokenizer, before, ids, upto, "the prompt of an assistant turn"), eos)
        ids += turn + tail
        labels += turn + [IGNORE_INDEX] * len(tail)
        text = upto
    if all(v == IGNORE_INDEX for v in labels):
        raise DataError("no assistant turn to train on", field="messages",
                        fix="End the conversation with an assistant turn.")
    # Drop what the template writes after the final end-of-turn token.
    end = len(labels) - next(k for k, v in enumerate(reversed(labels)) if v != IGNORE_INDEX)
    return ids[:end], labels[:end], prompt_len


def _prompt_ids(tokenizer, prompt: Any) -> tuple[list[int], str | None]:
    """(prompt tokens, rendered text or None for plain prompts)."""
    if isinstance(prompt, list):
        text = render(tokenizer, prompt, add_generation_prompt=True)
        return encode(tokenizer, text), text
    return _bos(tokenizer) + encode(tokenizer, prompt), None


def _completion_ids(tokenizer, prompt: Any, prompt_text: str | None, prompt_ids: list[int],
                    completion: Any) -> list[int]:
    if prompt_text is None:
        return encode(tokenizer, completion) + _eos(tokenizer)
    full = render(tokenizer, prompt + completion)
    ids = _continue(tokenizer, prompt_text, prompt_ids, full, "the prompt (with the generation prompt)")
    return _split_after_eos(ids, tokenizer.eos_token_id)[0]


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------


def truncate(prompt_len: int, completion_len: int, max_length: int,
             max_prompt_length: int | None = None) -> tuple[int, int]:
    """(prompt tokens to keep, taken from the LEFT end cut, completion tokens to keep, from the start).

    The completion is kept whole when it fits: the prompt is cut first, to ``max_prompt_length`` and
    then to what ``max_length`` leaves. A completion longer than ``max_length`` alone is cut on the right.
    """
    keep_prompt = prompt_len if max_prompt_length is None else min(prompt_len, max_prompt_length)
    keep_prompt = max(0, min(keep_prompt, max_length - completion_len))
    return keep_prompt, min(completion_len, max_length - keep_prompt)


def _count_cuts(stats: Counter | None, prompt_len: int, keep_prompt: int, completion_len: int,
                keep_completion: int) -> None:
    if stats is not None:
        stats[PROMPT_CUT] += keep_prompt < prompt_len
        stats[COMPLETION_CUT] += keep_completion < completion_len


# --------------------------------------------------------------------------------------------------
# Per kind
# --------------------------------------------------------------------------------------------------


def tokenize_example(record: dict[str, Any], tokenizer, kind: str, *, max_length: int,
                     max_prompt_length: int | None = None, stats: Counter | None = None) -> dict[str, Any]:
    """Tokenized form of one canonical record of ``kind`` (see alignkit.data.formats), truncated.

    - sft: {input_ids, labels}
    - preference: {prompt_ids, chosen_ids, rejected_ids}
    - unpaired: {prompt_ids, completion_ids, label}
    - prompt: {prompt_ids, prompt, ...other fields of the record}
    - scored: {input_ids, score, prompt_len}

    Rows whose prompt or completion was cut are counted in ``stats`` under "truncated_prompt" and
    "truncated_completion".
    """
    if kind == "sft":
        return _tokenize_sft(record, tokenizer, max_length, max_prompt_length, stats)
    if kind == "prompt":
        prompt_ids, _ = _prompt_ids(tokenizer, record["prompt"])
        limit = min(max_length, max_prompt_length or max_length)
        keep = min(len(prompt_ids), limit)
        _count_cuts(stats, len(prompt_ids), keep, 0, 0)
        return {**record, "prompt_ids": prompt_ids[len(prompt_ids) - keep:]}
    if kind == "scored":
        if "text" in record:
            prompt_ids, completion_ids = [], _bos(tokenizer) + encode(tokenizer, record["text"]) + _eos(tokenizer)
        else:
            prompt_ids, text = _prompt_ids(tokenizer, record["prompt"])
            completion_ids = _completion_ids(tokenizer, record["prompt"], text, prompt_ids, record["completion"])
        keep_p, keep_c = truncate(len(prompt_ids), len(completion_ids), max_length, max_prompt_length)
        _count_cuts(stats, len(prompt_ids), keep_p, len(completion_ids), keep_c)
        input_ids = prompt_ids[len(prompt_ids) - keep_p:] + completion_ids[:keep_c]
        return {"input_ids": input_ids, "score": float(record["score"]), "prompt_len": keep_p}
    if kind in ("preference", "unpaired"):
        names = ("chosen", "rejected") if kind == "preference" else ("completion",)
        prompt_ids, text = _prompt_ids(tokenizer, record["prompt"])
        completions = [_completion_ids(tokenizer, record["prompt"], text, prompt_ids, record[n]) for n in names]
        longest = max(len(c) for c in completions)
        keep_p, keep_c = truncate(len(prompt_ids), longest, max_length, max_prompt_length)
        _count_cuts(stats, len(prompt_ids), keep_p, longest, keep_c)
        out = {"prompt_ids": prompt_ids[len(prompt_ids) - keep_p:]}
        for name, ids in zip(names, completions):
            out[f"{name}_ids"] = ids[:keep_c]
        if kind == "unpaired":
            out["label"] = bool(record["label"])
        if record.get("margin") is not None:  # reward-model pairs may carry a preference strength
            out["margin"] = float(record["margin"])
        return out
    raise ValueError(f"unknown data kind {kind!r}")


def _tokenize_sft(record: dict, tokenizer, max_length: int, max_prompt_length: int | None,
                  stats: Counter | None) -> dict[str, list[int]]:
    if "messages" in record:
        ids, labels, prompt_len = tokenize_conversation(tokenizer, record["messages"])
    elif "text" in record:
        ids = _bos(tokenizer) + encode(tokenizer, record["text"]) + _eos(tokenizer)
        labels, prompt_len = list(ids), 0
    else:
        prompt = _bos(tokenizer) + encode(tokenizer, record["prompt"])
        completion = encode(tokenizer, record["completion"]) + _eos(tokenizer)
        ids, labels, prompt_len = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, len(prompt)
    completion_len = len(ids) - prompt_len
    keep_p, keep_c = truncate(prompt_len, completion_len, max_length, max_prompt_length)
    _count_cuts(stats, prompt_len, keep_p, completion_len, keep_c)
    start, end = prompt_len - keep_p, prompt_len + keep_c
    return {"input_ids": ids[start:end], "labels": labels[start:end]}


# --------------------------------------------------------------------------------------------------
# Packing and padding
# --------------------------------------------------------------------------------------------------


def pack_sft(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack sft examples into rows of at most ``max_length`` tokens (best-fit decreasing; no example is
    split). Each row: input_ids, labels, position_ids (restarting at 0 per example: transformers builds a
    block-diagonal causal mask from them when attention_mask is None and no KV cache is used, i.e. pass
    use_cache=False) and seq_lens (the examples' lengths, for varlen attention kernels).

    The first label of every example is IGNORE_INDEX so that no token is trained to predict the next
    example (unpacked, that label is never used anyway).
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin number), sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length={max_length}; truncate before packing.")
        if n == 0:
            continue
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
    rows = []
    for members in bins:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in members:
            ids, labels = examples[i]["input_ids"], examples[i]["labels"]
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX] + list(labels[1:])
            row["position_ids"] += list(range(len(ids)))
            row["seq_lens"].append(len(ids))
        rows.append(row)
    return rows


def pad(seqs: list[list[int]], value: int, side: str = "right", width: int | None = None) -> torch.Tensor:
    """(batch, width) LongTensor of ``seqs`` padded with ``value`` on ``side`` ("right" or "left"); ``width``
    defaults to the longest sequence."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if width is None:
        width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            t = torch.as_tensor(s, dtype=torch.long)
            if side == "right":
                out[i, : len(s)] = t
            else:
                out[i, width - len(s):] = t
    return out


def attention_mask_from_lengths(lengths: list[int] | torch.Tensor, max_len: int | None = None,
                                side: str = "right") -> torch.Tensor:
    """(batch, max_len) LongTensor with 1 on the first (``side="right"``) or last (``"left"``) ``length``
    positions of each row."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    width = int(lengths.max()) if max_len is None and len(lengths) else (max_len or 0)
    positions = torch.arange(width).unsqueeze(0)
    if side == "right":
        return (positions < lengths.unsqueeze(1)).long()
    if side == "left":
        return (positions >= width - lengths.unsqueeze(1)).long()
    raise ValueError(f"side must be 'right' or 'left', got {side!r}")


def padded_batch(seqs: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``labels`` of right-padded rows (labels padded with IGNORE_INDEX)."""
    input_ids = pad(seqs, pad_token_id)
    return {"input_ids": input_ids,
            "attention_mask": attention_mask_from_lengths([len(s) for s in seqs], input_ids.shape[1]),
            "labels": pad(labels, IGNORE_INDEX)}
