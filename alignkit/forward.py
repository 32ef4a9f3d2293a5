"""Forward passes that do LM-head work only where it is needed, and never all of it at once.

The LM head over a 50k-150k vocabulary dominates activation memory: prompt and padding positions never
need it, and the float32 ``[tokens, vocab]`` logits of long completions need not exist at once either.

- :func:`batch_logps` (offline methods): per-sequence completion log-probs of a batch made by the builders
  of :mod:`alignkit.data.tokenize` (padded, packed without padding, or shared prompt), from the hidden
  states of the positions that predict a target only. :func:`completion_logps`: the same for a padded
  ``input_ids`` / ``attention_mask`` / ``labels`` batch.
- :func:`target_logits`: full logits at target positions (distillation compares whole distributions).
- :func:`response_forward` / :func:`score_rollout` (online methods): log-probs (and entropies, critic
  values) of the response tokens of a :class:`~alignkit.rollout.RolloutBatch`, padded or packed without
  padding (a :class:`BatchLayout`).
- :func:`sequence_scores`: a sequence classifier's score at each sequence's last token (packed batches).
- :func:`exact_layouts`: which batch layouts give this model's padded log-probs (a probe forward).

Chunked log-probs (``chunked=True``): the model runs with its LM head passed through, so its "logits" are
the final hidden states, and :func:`alignkit.losses.logprobs.linear_logps` applies the head and the
log-softmax a chunk of positions at a time, rebuilding each chunk's logits in backward. Models whose
logits are more than ``lm_head(hidden)`` (soft-capping, scaling), LM heads partitioned by ZeRO-3, and
models that fail a one-time probe get the full-logits path instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from alignkit.data import IGNORE_INDEX
from alignkit.data.tokenize import (
    _bins,
    packed_sequences,
    packed_shape,
    padded_sequences,
    shared_prompt_pairs,
)
from alignkit.losses.logprobs import default_chunk_rows, linear_logps, selective_log_softmax
from alignkit.losses.rl import entropy_from_logits
from alignkit.models import eval_mode, unwrap_model
from alignkit.rollout import RolloutBatch
from alignkit.rollout.fsdp2 import is_fsdp_module

logger = logging.getLogger("alignkit")

# Config fields of models whose logits are a function of lm_head(hidden), not lm_head(hidden) itself.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier", "attn_logit_softcapping_final")
# Attention kernels that read packed sequences from position_ids without a dense mask (varlen): one row.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")
# Attention kernels that take a custom 4D mask as it is (the shared-prompt layout).
MASK_ATTENTION = ("sdpa", "eager")


def first_target_index(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Smallest position (over the batch) holding a target token; 1 at least (position 0 has no context)."""
    has = labels != ignore_index
    if not bool(has.any()):
        return labels.shape[1] - 1
    first = int(has.float().argmax(dim=1)[has.any(dim=1)].min())
    return max(first, 1)


def target_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                  position_ids: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting ``labels[:, s:]`` and those targets, where ``s`` is the first target position.

    Returns ``(logits [B, T-s, V], targets [B, T-s])``: ``logits[:, i]`` predicts ``targets[:, i]``.
    """
    start = first_target_index(labels, ignore_index)
    T = input_ids.shape[1]
    keep = torch.arange(start - 1, T - 1, device=input_ids.device)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model class without logits_to_keep: full logits, then slice
        logits = model(**kwargs).logits[:, start - 1:T - 1]
    return logits, labels[:, start:]


# --------------------------------------------------------------------------------------------------
# The LM head, passed through: the model returns hidden states, the head runs chunk by chunk
# --------------------------------------------------------------------------------------------------


def _base_model(model) -> Any:
    inner = unwrap_model(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _output_head(model) -> torch.nn.Module | None:
    """The LM-head module when the logits are exactly ``head(hidden)`` and it can run outside the forward."""
    base = _base_model(model)
    getter = getattr(base, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, torch.nn.Module):
        return None
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    for cfg in {id(c): c for c in (config, text_config) if c is not None}.values():
        if any(getattr(cfg, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
            return None
    if any(hasattr(p, "ds_id") for p in head.parameters()):  # ZeRO-3 partitions it; gathered only in its forward
        return None
    if any(is_fsdp_module(m) for m in (head, unwrap_model(model), base)):  # FSDP2 shards it, the same way
        return None
    return head


@dataclass
class _PassedThrough:
    head: torch.nn.Module
    forward: Any  # the head's own forward
    called: bool = False
    autocast_dtype: torch.dtype | None = None


@contextlib.contextmanager
def _head_passed_through(head: torch.nn.Module) -> Iterator[_PassedThrough]:
    """Inside the block ``head(x)`` returns ``x`` (and notes the autocast dtype it ran under)."""
    state = _PassedThrough(head, head.forward)
    had_own = "forward" in head.__dict__

    def pass_through(hidden, *args, **kwargs):
        state.called = True
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            state.autocast_dtype = torch.get_autocast_dtype(device)
        return hidden

    head.forward = pass_through
    try:
        yield state
    finally:
        if had_own:
            head.forward = state.forward
        else:
            del head.forward


def _entropy(z: torch.Tensor, with_grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
        return entropy_from_logits(z if with_grad else z.detach()).float()


def _module_chunk(forward, hidden, targets, scale: float, entropy: bool, entropy_grad: bool, autocast_dtype):
    ctx = torch.autocast(hidden.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        logits = forward(hidden)
    mean = logits.detach().float().mean(-1)
    z = logits.float() * scale if scale != 1.0 else logits.float()
    ent = _entropy(z, entropy_grad) if entropy else None
    return selective_log_softmax(z, targets), ent, mean


def _head_logps(state: _PassedThrough, hidden: torch.Tensor, targets: torch.Tensor, scale: float, entropy: bool,
                entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(logps, entropy, mean_logits)`` of ``targets`` from the hidden states that predict them."""
    head = state.head
    if type(head) is torch.nn.Linear:
        return linear_logps(hidden, head.weight, targets, head.bias, scale=scale, entropy=entropy,
                            entropy_grad=entropy_grad, matmul_dtype=state.autocast_dtype or head.weight.dtype)
    # any other head (a LoRA-wrapped one, ...): its own forward per chunk, recomputed in backward
    rows = default_chunk_rows(int(getattr(head, "out_features", 0) or 65536))
    parts = []
    for h, t in zip(hidden.split(rows), targets.split(rows)):
        if torch.is_grad_enabled():
            parts.append(checkpoint(_module_chunk, state.forward, h, t, scale, entropy, entropy_grad,
                                    state.autocast_dtype, use_reentrant=False))
        else:
            parts.append(_module_chunk(state.forward, h, t, scale, entropy, entropy_grad, state.autocast_dtype))
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if entropy else None), empty
    logps, ents, means = zip(*parts)
    return torch.cat(logps), (torch.cat(ents) if entropy else None), torch.cat(means)


def _probe_ids(model, n: int) -> torch.Tensor:
    vocab = _base_model(model).config.get_text_config().vocab_size
    return torch.randint(3, max(vocab, 4), (n,), generator=torch.Generator().manual_seed(n))


def _device(model) -> torch.device:
    return next(unwrap_model(model).parameters()).device


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to the rounding of the model's ``dtype``; a wrong mask or head differs by far more."""
    if not a.numel():
        return True
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    a, b = a.float(), b.float()
    return bool((a - b).abs().max() <= tol * (1.0 + b.abs().max()))


def _dtype(model) -> torch.dtype:
    return next(unwrap_model(model).parameters()).dtype


def _chunked_head_ok(model, head: torch.nn.Module) -> bool:
    """Once per model: does the passed-through forward + head give the model's own logits?"""
    base = _base_model(model)
    known = getattr(base, "_alignkit_chunked_head_ok", None)
    if known is not None:
        return known
    ids = _probe_ids(model, 6).to(_device(model))[None]
    with torch.no_grad(), eval_mode(model):
        logits = model(input_ids=ids, use_cache=False).logits
        with _head_passed_through(head) as state:
            hidden = model(input_ids=ids, use_cache=False).logits
        ok = state.called and hidden.shape[-1] != logits.shape[-1]
        if ok:
            dtype = state.autocast_dtype
            with torch.autocast(hidden.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                ok = _close(state.forward(hidden), logits, dtype or _dtype(model))
    base._alignkit_chunked_head_ok = ok
    if not ok:
        logger.info("chunked log-probs: this model's logits are not lm_head(hidden states); full logits are used")
    return ok


def _selected_logps(model, inputs: dict[str, Any], positions: torch.Tensor, targets: torch.Tensor, *,
                    keep: int | None = None, scale: float = 1.0, entropy: bool = False, entropy_grad: bool = False,
                    chunked: bool = True):
    """Log-probs of ``targets`` predicted at flat ``positions`` of the ``[rows, width]`` input grid.

    Runs the model once, asking for LM-head output from the first to the last position needed (or the
    last ``keep`` positions), then gathers those positions: the LM head runs only on them, chunk by chunk
    when ``chunked``. Returns ``(logps [N], entropy [N] or None, mean_logits [N], model output)``.
    """
    rows, width = inputs["input_ids"].shape
    r, c = positions // width, positions % width
    if keep is None:
        lo = int(c.min()) if len(c) else width - 1
        hi = int(c.max()) + 1 if len(c) else width
        keep_arg: Any = torch.arange(lo, hi, device=positions.device)
    else:
        lo, hi, keep_arg = width - keep, width, keep
    head = _output_head(model) if chunked else None
    if head is not None and not _chunked_head_ok(model, head):
        head = None
    with _head_passed_through(head) if head is not None else contextlib.nullcontext() as state:
        try:
            out = model(**inputs, use_cache=False, logits_to_keep=keep_arg)
            kept = out.logits
        except TypeError:  # a model class without logits_to_keep
            out = model(**inputs, use_cache=False)
            kept = out.logits[:, lo:hi]
    flat = kept.reshape(-1, kept.shape[-1])[r * (hi - lo) + (c - lo)]
    if state is not None and state.called:
        logps, ent, mean = _head_logps(state, flat, targets, scale, entropy, entropy_grad)
    else:
        mean = flat.detach().float().mean(-1)
        z = flat * scale if scale != 1.0 else flat
        logps = selective_log_softmax(z, targets)
        ent = _entropy(z, entropy_grad) if entropy else None
    return logps.float(), ent, mean, out


def _model_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": batch["input_ids"]}
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4 and _attention(model) == "eager":
        # eager attention adds its mask to the scores: a boolean mask becomes 0 / -inf
        dtype = _dtype(model)
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if mask is not None:
        inputs["attention_mask"] = mask
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def batch_logps(model, batch: dict[str, torch.Tensor], *, chunked: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence of a batch from :mod:`alignkit.data.tokenize`'s builders: summed ``log p(completion
    tokens)`` (float32), their count, and the mean logit over them (detached)."""
    positions, targets, seqs = batch["target_positions"], batch["target_ids"], batch["target_sequences"]
    counts = batch["sequence_tokens"]
    logps, _, mean, _ = _selected_logps(model, _model_inputs(model, batch), positions, targets, chunked=chunked)
    summed = torch.zeros(len(counts), dtype=logps.dtype, device=logps.device).index_add(0, seqs, logps)
    mean_sum = torch.zeros(len(counts), dtype=torch.float32, device=logps.device).index_add(0, seqs, mean.float())
    return summed, counts, mean_sum / counts.clamp(min=1)


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                     chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed ``log p(completion tokens)``, their count, and the mean logit over them (detached).

    Only the positions that predict a completion token reach the LM head; ``chunked`` (default) runs the
    head chunk by chunk (see :func:`batch_logps`).
    """
    has = labels[:, 1:] != IGNORE_INDEX
    rows, cols = has.nonzero(as_tuple=True)
    width = input_ids.shape[1]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "target_positions": rows * width + cols, "target_ids": labels[:, 1:][has],
             "target_sequences": rows, "sequence_tokens": has.sum(-1)}
    return batch_logps(model, batch, chunked=chunked)


# --------------------------------------------------------------------------------------------------
# Batch layouts of the offline methods
# --------------------------------------------------------------------------------------------------


@dataclass
class BatchLayout:
    """How a method lays out a micro-batch; every layout gives the same log-probs and scores (the online
    methods' rollouts: :func:`response_forward`).

    ``packed``: padding-free rows (:func:`~alignkit.data.tokenize.packed_sequences`); ``one_row``: all of a
    batch in one row (varlen attention kernels, whose cost does not grow with the row). Otherwise the attention
    mask is dense, so a row costs the square of its width, and the row width is chosen per batch: the
    cheapest of a few widths from the longest sequence to all of them in one row. ``shared_prompt`` (pairs
    only): ``"never"``, ``"always"``, or ``"auto"``: per batch, when it is estimated cheaper than the
    unshared layout. A layout's estimated cost is its token slots (rows x width) plus ``attention_cost`` per
    (query, key) slot pair, relative to one token through a layer's linear maps (:func:`attention_cost`).
    """

    packed: bool = False
    one_row: bool = False
    shared_prompt: str = "never"
    attention_cost: float = 0.0

    def describe(self) -> str:
        rows = "padded rows" if not self.packed else "padding-free (one row)" if self.one_row else \
            "padding-free (packed rows)"
        return rows + ("" if self.shared_prompt == "never" else f", shared prompt: {self.shared_prompt}")

    def sequences(self, seqs: list[list[int]], labels: list[list[int]], pad_token_id: int,
                  position_ids: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
        """A batch of ``seqs`` (their ``labels`` mark the targets); rows with their own ``position_ids``
        (packed SFT rows) are always laid out by position, without an attention mask."""
        if self.packed or position_ids is not None:
            width = self._packed([len(s) for s in seqs])[0] if self.packed else None
            return packed_sequences(seqs, labels, pad_token_id, row_width=width, position_ids=position_ids)
        return padded_sequences(seqs, labels, pad_token_id)

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Which sequences (indices into ``lengths``) go to each packed row: the row width of
        :meth:`sequences`, first-fit decreasing."""
        return _bins(lengths, self._packed(lengths)[0])

    def pairs(self, triples: list[tuple[list[int], list[int], list[int]]], pad_token_id: int
              ) -> dict[str, torch.Tensor]:
        """``(prompt, chosen, rejected)`` triples: sequences ``prompt + chosen`` (all B), then ``prompt + rejected``."""
        if self.shared_prompt != "never":
            width, cost = self._packed([len(p) + len(c) + len(r) for p, c, r in triples])
            if self.shared_prompt == "always" or cost < self._unshared_cost(triples):
                return shared_prompt_pairs(triples, pad_token_id, row_width=width)
        seqs = [p + c for p, c, _ in triples] + [p + r for p, _, r in triples]
        labels = [[IGNORE_INDEX] * len(p) + c for p, c, _ in triples] + \
            [[IGNORE_INDEX] * len(p) + r for p, _, r in triples]
        return self.sequences(seqs, labels, pad_token_id)

    def _cost(self, rows: int, width: int) -> float:
        return rows * width * (1.0 + self.attention_cost * width)

    def _packed(self, lengths: list[int]) -> tuple[int, float]:
        """(row width, estimated cost) of the cheapest packing of sequences (or segments) of ``lengths``."""
        total = sum(lengths)
        if self.one_row:
            return total, float(total)
        widths = {min(int(max(lengths) * m), total) for m in (1, 1.5, 2, 3, 4)} | {total}
        return min(((w, self._cost(*packed_shape(lengths, w))) for w in sorted(widths)), key=lambda x: x[1])

    def _unshared_cost(self, triples) -> float:
        lengths = [len(p) + len(c) for p, c, _ in triples] + [len(p) + len(r) for p, _, r in triples]
        return self._packed(lengths)[1] if self.packed else self._cost(len(lengths), max(lengths))


def attention_cost(model) -> float:
    """FLOPs of one attended (query, key) pair over those of one token through a layer's linear maps."""
    config = _base_model(model).config.get_text_config()
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    linear = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inner
    return 2 * heads * head_dim / linear  # QK^T and attention x V: 2 * 2 * heads * head_dim / (2 * linear)


def choose_layout(model, *, padding_free: bool, shared_prompt: bool | str = False, pairs: bool = False,
                  scores: bool = False, accelerator=None, what: str = "batches") -> BatchLayout:
    """The :class:`BatchLayout` a method's switches ask for, as far as :func:`exact_layouts` allows for
    ``model``; the choice is logged. With an ``accelerator`` the probe runs on its device under its autocast
    (flash-attention kernels exist only there); under ZeRO-3 (weights partitioned until training starts)
    the attention implementation alone decides."""
    wants_shared = pairs and shared_prompt in (True, "auto")
    if not padding_free and not wants_shared:
        logger.info("%s: padded rows", what)
        return BatchLayout()
    probe = not _zero3(accelerator)
    if probe and accelerator is not None and not getattr(model, "is_loaded_in_4bit", False) \
            and not getattr(model, "is_quantized", False):
        model.to(accelerator.device)  # where training places it anyway
    found = exact_layouts(model, pairs=wants_shared, scores=scores, probe=probe,
                          autocast=accelerator.autocast if accelerator is not None else None)
    packed = padding_free and found["packed"]
    shared = ("always" if shared_prompt is True else "auto") if wants_shared and found["shared_prompt"] else "never"
    layout = BatchLayout(packed=packed, one_row=packed and found["one_row"], shared_prompt=shared,
                         attention_cost=attention_cost(model))
    refused = [name for name, wanted, ok in (("padding-free", padding_free, found["packed"]),
                                              ("shared prompt", wants_shared, found["shared_prompt"])) if wanted and not ok]
    note = f" ({' and '.join(refused)} not exact with attention {_attention(model)}: off)" if refused else ""
    logger.info("%s: %s%s%s", what, layout.describe(), note, "" if probe else " (ZeRO-3: not probed)")
    return layout


def _zero3(accelerator) -> bool:
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and int(getattr(plugin, "zero_stage", 0) or 0) == 3


# --------------------------------------------------------------------------------------------------
# Reward models: the score at each sequence's last token
# --------------------------------------------------------------------------------------------------


def _score_head(model) -> torch.nn.Module | None:
    head = getattr(_base_model(model), "score", None)
    return head if isinstance(head, torch.nn.Module) else None


def sequence_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float32 score per sequence of a packed batch (:func:`alignkit.data.tokenize.packed_sequences`):
    the one-output ``score`` head of a causal-LM sequence classifier, read at each ``last_positions``."""
    head = _score_head(model)
    if head is None:
        raise ValueError("sequence_scores: the model has no `score` head (a causal-LM sequence classifier).")
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        model(**_model_inputs(model, batch), use_cache=False)
    finally:
        handle.remove()
    per_position = seen[-1]
    if per_position.dim() != 3 or per_position.shape[1] != batch["input_ids"].shape[1]:
        raise ValueError("sequence_scores: the score head did not run on every position.")
    return per_position[..., 0].reshape(-1)[batch["last_positions"]].float()


# --------------------------------------------------------------------------------------------------
# Which layouts are exact for this model
# --------------------------------------------------------------------------------------------------


def _attention(model) -> str:
    base = _base_model(model)
    return str(getattr(base.config, "_attn_implementation", None) or "eager")


def _probe_pairs(model) -> list[tuple[list[int], list[int], list[int]]]:
    ids = _probe_ids(model, 19).tolist()
    return [(ids[:3], ids[3:7], ids[7:9]), (ids[9:11], ids[11:12], ids[12:19])]


def _probe_outputs(model, batch: dict[str, torch.Tensor], scores: bool) -> torch.Tensor:
    """What every layout must reproduce: a classifier's scores (``scores``), else the final hidden states at
    the target positions in (sequence, token) order (log-probs when the LM head cannot be passed through:
    on near-uniform random heads they would hide a wrong mask)."""
    batch = {k: v.to(_device(model)) for k, v in batch.items()}
    if scores:
        return sequence_scores(model, batch)
    head = _output_head(model)
    if head is None:
        return batch_logps(model, batch, chunked=False)[0]
    with _head_passed_through(head):
        hidden = model(**_model_inputs(model, batch), use_cache=False).logits
    order = torch.sort(batch["target_sequences"], stable=True).indices
    return hidden.reshape(-1, hidden.shape[-1])[batch["target_positions"][order]]


def exact_layouts(model, *, pairs: bool = False, scores: bool = False, probe: bool = True, autocast=None
                  ) -> dict[str, bool]:
    """Which padding-free layouts give the padded batch's results for ``model``:
    ``{"packed": ..., "shared_prompt": ..., "one_row": ...}``.

    Decided by the attention implementation (packed rows need transformers' position-id masking or a
    varlen kernel, which also takes everything as one row; the shared prompt needs a kernel that takes a
    custom 4D mask: sdpa or eager) and, with ``probe``, confirmed by a forward of a few random tokens in
    each layout against the padded one (eval mode, no gradients, under ``autocast()`` when given).
    ``scores``: compare a sequence classifier's scores at each sequence's last token (reward models).
    """
    attention = _attention(model)
    varlen = attention in VARLEN_ATTENTION
    found = {"packed": varlen or attention in MASK_ATTENTION, "one_row": varlen,
             "shared_prompt": pairs and not scores and attention in MASK_ATTENTION}
    if scores and _score_head(model) is None:
        found["packed"] = False
    if not probe or not (found["packed"] or found["shared_prompt"]):
        return found
    pad = 0
    triples = _probe_pairs(model)
    seqs = [p + c for p, c, _ in triples] + [p + r for p, _, r in triples]
    labels = [[IGNORE_INDEX] * len(p) + c for p, c, _ in triples] + \
        [[IGNORE_INDEX] * len(p) + r for p, _, r in triples]
    with torch.no_grad(), eval_mode(model), autocast() if autocast is not None else contextlib.nullcontext():
        device = _device(model).type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else _dtype(model)
        padded = _probe_outputs(model, padded_sequences(seqs, labels, pad), scores)
        if found["packed"]:
            width = sum(len(s) for s in seqs) if varlen else None
            packed = _probe_outputs(model, packed_sequences(seqs, labels, pad, row_width=width), scores)
            found["packed"] = _close(packed, padded, dtype)
        if found["shared_prompt"]:
            shared = _probe_outputs(model, shared_prompt_pairs(triples, pad), False)
            found["shared_prompt"] = _close(shared, padded, dtype)
    return found


@dataclass
class ResponseOutput:
    logps: torch.Tensor  # [B, R] log-probs of the response tokens (float32), 0 off-mask
    entropy: torch.Tensor | None = None  # [B, R] entropy of the sampling distribution per position
    values: torch.Tensor | None = None  # [B, R] critic values V(s_t) (PPO)


def response_forward(model, batch: RolloutBatch, temperature: float, *, entropy: bool = False,
                     entropy_grad: bool = False, chunked: bool = True, layout: BatchLayout | None = None,
                     **model_kwargs: Any) -> ResponseOutput:
    """Log-probs (and optionally entropies / values) of the response tokens of ``batch``.

    The LM head runs only on the positions that predict a response token (positions ``P-1 .. P+R-2``; the
    model is asked for its last ``R + 1`` positions), never on prompt or padding positions; with ``chunked``
    (default) it runs chunk by chunk (:func:`alignkit.losses.logprobs.linear_logps`), so no ``[B, R, V]``
    logits exist. Logits are divided by the sampling ``temperature`` (the distribution the tokens were drawn
    from). Entropies come from the same chunks, with gradients when ``entropy_grad``. A model output with
    ``token_values`` (PPO's policy+critic module) gets them sliced to the same positions.

    A packed ``layout`` (:func:`choose_layout`, padding-free) lays the sequences' real tokens end to end in
    rows with restarting position ids (:meth:`RolloutBatch.packed`): no prompt or response padding is
    computed; same outputs (values and entropies off the response mask are 0 then, not the padded ones).
    """
    mask = batch.response_mask.bool()
    rows, cols = mask.nonzero(as_tuple=True)
    if layout is not None and layout.packed:
        packed = batch.packed(layout.rows(batch.attention_mask.sum(1).tolist()))
        inputs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, **model_kwargs)
        width = packed.input_ids.shape[1]
        positions = packed.slots[:, batch.prompt_width:][mask] - 1  # the token before each response token
        keep = width - int((positions % width).min()) if len(positions) else 1
    else:
        keep = batch.response_width + 1
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, **model_kwargs)
        width = batch.input_ids.shape[1]
        positions = rows * width + (width - keep) + cols
    scale = 1.0 / temperature if temperature > 0 and temperature != 1.0 else 1.0
    logps_flat, ent_flat, _, out = _selected_logps(model, inputs, positions, batch.response_ids[mask], keep=keep,
                                                   scale=scale, entropy=entropy, entropy_grad=entropy_grad,
                                                   chunked=chunked)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    logps = logps.index_put((rows, cols), logps_flat)
    ent = None
    if entropy:
        ent = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).index_put((rows, cols), ent_flat)
    values = getattr(out, "token_values", None)  # not "values": HF outputs are dicts with a values() method
    if values is not None and layout is not None and layout.packed:  # [rows, keep] -> the predicting positions
        at = (positions // width) * keep + positions % width - (width - keep)
        values = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).index_put(
            (rows, cols), values.reshape(-1)[at].float())
    elif values is not None:
        values = values[:, -keep:-1].float()
    return ResponseOutput(logps=logps, entropy=ent, values=values)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


@torch.no_grad()
def score_rollout(model, batch: RolloutBatch, temperature: float, micro_batch_size: int, *, autocast=None,
                  entropy: bool = False, layout: BatchLayout | None = None, **model_kwargs: Any) -> ResponseOutput:
    """:func:`response_forward` over the whole rollout in micro-batches (laid out by ``layout``), without
    gradients, in eval mode (the model's mode comes back after). Every process runs the same number of
    forwards (ZeRO-3 safe)."""
    parts: list[ResponseOutput] = []
    with eval_mode(model):
        for index in torch.arange(len(batch)).split(micro_batch_size):
            with autocast() if autocast is not None else contextlib.nullcontext():
                parts.append(response_forward(model, batch.select(index), temperature, entropy=entropy,
                                              layout=layout, **model_kwargs))
    R = batch.response_width

    def cat(name: str) -> torch.Tensor | None:
        xs = [getattr(p, name) for p in parts]
        return None if xs[0] is None else torch.cat([_pad_to(x, R) for x in xs])

    return ResponseOutput(logps=cat("logps"), entropy=cat("entropy"), values=cat("values"))
