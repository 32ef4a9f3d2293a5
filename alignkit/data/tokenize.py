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


# --------------------------------------------------------------------------------------------------
# Batches for log-prob forwards: padded, packed (padding-free), shared prompt
# --------------------------------------------------------------------------------------------------
#
# Every builder below returns the model inputs and where the log-probs are read:
#
# - ``target_positions`` [N]: flat index into the ``[rows, width]`` grid of the position whose logits
#   predict a target token, ``target_ids`` [N] that token, ``target_sequences`` [N] the sequence it
#   belongs to (the order of the ``sequences`` argument); ``sequence_tokens`` [S] targets per sequence;
# - ``last_positions`` [S]: flat index of each sequence's last token (where a sequence classifier reads
#   its score); ``n_tokens``: real (non-pad) tokens in the batch.


def _targets(labels: list[int], offset: int) -> list[tuple[int, int]]:
    """(predicting position, target id) of each labelled token of one sequence placed at ``offset``."""
    return [(offset + t - 1, y) for t, y in enumerate(labels) if t > 0 and y != IGNORE_INDEX]


def _finish(input_ids: torch.Tensor, targets: list[tuple[int, int, int]], last: list[int], n_sequences: int,
            n_tokens: int) -> dict[str, torch.Tensor]:
    positions, ids, seqs = zip(*targets) if targets else ((), (), ())
    return {"input_ids": input_ids,
            "target_positions": torch.tensor(positions, dtype=torch.long),
            "target_ids": torch.tensor(ids, dtype=torch.long),
            "target_sequences": torch.tensor(seqs, dtype=torch.long),
            "sequence_tokens": torch.bincount(torch.tensor(seqs, dtype=torch.long), minlength=n_sequences),
            "last_positions": torch.tensor(last, dtype=torch.long),
            "n_tokens": torch.tensor(n_tokens)}


def padded_sequences(seqs: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """:func:`padded_batch` (one right-padded row per sequence) plus the target and last-token indices."""
    batch = padded_batch(seqs, labels, pad_token_id)
    width = batch["input_ids"].shape[1]
    targets = [(i * width + p, y, i) for i, lab in enumerate(labels) for p, y in _targets(lab, 0)]
    last = [i * width + len(s) - 1 for i, s in enumerate(seqs)]
    return {**batch, **_finish(batch["input_ids"], targets, last, len(seqs), sum(len(s) for s in seqs))}


def _bins(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped into bins of at most ``width`` tokens (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        k = next((b for b, free in enumerate(space) if free >= lengths[i]), None)
        if k is None:
            bins.append([i])
            space.append(width - lengths[i])
        else:
            bins[k].append(i)
            space[k] -= lengths[i]
    return bins


def packed_sequences(seqs: list[list[int]], labels: list[list[int]], pad_token_id: int, *,
                     row_width: int | None = None, position_ids: list[list[int]] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Sequences packed end to end, no attention mask: ``position_ids`` restart at 0 per sequence, so
    transformers' packed-sequence masking (SDPA/eager) and FlashAttention's varlen kernels keep attention
    within each sequence; no pad token is computed except at the end of the shorter rows.

    ``row_width``: most tokens per row (default: the longest sequence, so no row is wider than a padded
    batch; with dense attention masks the cost of a row grows with its width squared). Pass the total token
    count for one row (varlen kernels). ``position_ids``: the sequences' own positions (rows of
    :func:`pack_sft` restart inside), default ``range(len)``. ``labels`` of the packed rows carry
    IGNORE_INDEX at each sequence's first token, so a shifted loss over them never crosses sequences.
    """
    lengths = [len(s) for s in seqs]
    if any(n == 0 for n in lengths):
        raise ValueError("packed_sequences: empty sequence")
    width = max(row_width or 0, max(lengths))
    rows = _bins(lengths, width)
    row_len = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), row_len), pad_token_id, dtype=torch.long)
    packed_labels = torch.full((len(rows), row_len), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), row_len), dtype=torch.long)
    targets, last = [], [0] * len(seqs)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            input_ids[r, at:at + n] = torch.as_tensor(seqs[i])
            packed_labels[r, at + 1:at + n] = torch.as_tensor(labels[i][1:])
            pos = position_ids[i] if position_ids is not None else range(n)
            positions[r, at:at + n] = torch.as_tensor(pos)
            targets += [(r * row_len + p, y, i) for p, y in _targets(labels[i], at)]
            last[i] = r * row_len + at + n - 1
            at += n
        # padding continues the last sequence's positions: it attends causally to it, nothing attends to it
        positions[r, at:] = torch.arange(int(positions[r, at - 1]) + 1, int(positions[r, at - 1]) + 1 + row_len - at)
    targets.sort()
    out = _finish(input_ids, targets, last, len(seqs), sum(lengths))
    out.update(position_ids=positions, labels=packed_labels)
    return out


def shared_prompt_pairs(pairs: list[tuple[list[int], list[int], list[int]]], pad_token_id: int, *,
                        row_width: int | None = None) -> dict[str, torch.Tensor]:
    """Preference pairs as ``[prompt | chosen | rejected]`` segments: the prompt is computed once per pair.

    A 4D boolean attention mask (``[rows, 1, width, width]``, True = attend) lets chosen tokens attend to
    the prompt and to earlier chosen tokens, rejected tokens to the prompt and to earlier rejected tokens
    (never to chosen ones); the rejected positions continue from the prompt, as if it came right after it.
    So every chosen/rejected log-prob equals the one of the unshared ``prompt + completion`` row. Sequences:
    the B chosen completions, then the B rejected ones. Segments are packed into rows of at most
    ``row_width`` tokens (default: the longest segment); padding attends only to itself.
    """
    B = len(pairs)
    lengths = [len(p) + len(c) + len(r) for p, c, r in pairs]
    width = max(row_width or 0, max(lengths))
    rows = _bins(lengths, width)
    row_len = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), row_len), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(rows), row_len), dtype=torch.long)
    mask = torch.eye(row_len, dtype=torch.bool).repeat(len(rows), 1, 1)
    targets, last = [], [0] * (2 * B)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            prompt, chosen, rejected = pairs[i]
            P, C, n = len(prompt), len(chosen), lengths[i]
            input_ids[r, at:at + n] = torch.as_tensor(prompt + chosen + rejected)
            positions[r, at:at + P + C] = torch.arange(P + C)
            positions[r, at + P + C:at + n] = torch.arange(P, n - C)
            block = torch.ones(n, n, dtype=torch.bool).tril()
            block[P + C:, P:P + C] = False  # rejected never sees chosen
            mask[r, at:at + n, at:at + n] = block
            chosen_labels = [IGNORE_INDEX] * P + chosen
            targets += [(r * row_len + p, y, i) for p, y in _targets(chosen_labels, at)]
            # the first rejected token is predicted by the last prompt token (none without a prompt), the
            # next ones by the rejected token before them
            rejected_at = [at + P - 1] + list(range(at + P + C, at + n - 1))
            targets += [(r * row_len + p, y, B + i) for j, (p, y) in enumerate(zip(rejected_at, rejected))
                        if j > 0 or P > 0]
            last[i] = r * row_len + at + P + C - 1
            last[B + i] = r * row_len + at + n - 1 if rejected else r * row_len + at + P - 1
            at += n
    targets.sort()
    out = _finish(input_ids, targets, last, 2 * B, sum(lengths))
    out.update(position_ids=positions, attention_mask=mask.unsqueeze(1))
    return out


def packed_shape(lengths: list[int], row_width: int | None = None) -> tuple[int, int]:
    """(rows, width) of the batch :func:`packed_sequences` / :func:`shared_prompt_pairs` build from
    sequences (or segments) of these lengths."""
    width = max(row_width or 0, max(lengths))
    rows = _bins(lengths, width)
    return len(rows), max(sum(lengths[i] for i in row) for row in rows)
