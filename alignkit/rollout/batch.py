"""What a sampler returns (:class:`Rollout`) and its training-side view (:class:`RolloutBatch`).

Layout of a :class:`Rollout` (``N`` = prompts x ``num_samples``; all tensors on the model's device)::

    prompt_ids    [N, P]  LEFT-padded with pad_token_id     prompt_mask   [N, P]  1 on real prompt tokens
    response_ids  [N, R]  RIGHT-padded with pad_token_id    response_mask [N, R]  1 on real response tokens,
                                                                                 the EOS token included
    ended_with_eos [N] bool    prompt_index [N] long (which prompt each row answers)
    response_texts list[str] (decoded without special tokens)
    sampler_logps  [N, R] float32 or None: log-prob of each sampled token under the distribution it was
                   sampled from (logits / temperature, then top-k/top-p), 0 off the response mask; only
                   when ``generate(..., logps=True)`` asked for it
    action_mask    [N, R] or None: multi-turn episodes (:mod:`~alignkit.rollout.multiturn`) only. The
                   "response" is then every token after the prompt, the environment's included
                   (``response_mask`` = attended to); ``action_mask`` is 1 on the tokens the policy sampled,
                   the only ones trained on (:attr:`RolloutBatch.loss_mask`). None = every response token.
    episodes       multi-turn only: per-episode rewards, turns, stop reasons (``multiturn.Episodes``)

``torch.cat([prompt_ids, response_ids], 1)`` (:meth:`Rollout.sequences`) puts every response right
after its prompt at the same column ``P`` in every row, so response-token log-probs are the logits of
columns ``P-1 .. P+R-2``: one slice for the whole batch, no per-row gather. Positions must follow the
attention mask (:meth:`Rollout.position_ids`), as they did during generation.

The ``num_samples`` samples of one prompt are consecutive rows (``repeat_interleave`` order:
``[p0_s0, p0_s1, ..., p1_s0, ...]``), the layout :mod:`alignkit.losses.rl` expects for RLOO/GRPO groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.config import ConfigError
from alignkit.data import attention_mask_from_lengths, pad


@dataclass
class Rollout:
    """Prompts and sampled responses, padded for training (layout in the module docstring)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    response_ids: torch.Tensor  # [N, R] right-padded
    response_mask: torch.Tensor  # [N, R], 1 on response tokens including EOS
    ended_with_eos: torch.Tensor  # [N] bool; False = cut at max_new_tokens
    prompt_index: torch.Tensor  # [N] long
    response_texts: list[str]
    sampler_logps: torch.Tensor | None = None  # [N, R] float32, 0 off the mask; generate(..., logps=True)
    action_mask: torch.Tensor | None = None  # [N, R] 1 on sampled tokens; multi-turn only (None: response_mask)
    episodes: Any = None  # multi-turn only: alignkit.rollout.multiturn.Episodes

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_index.max()) + 1 if len(self) else 0

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) ``[N, P+R]`` of ``[prompt | response]``; responses start at column P."""
        return (torch.cat([self.prompt_ids, self.response_ids], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1))

    def position_ids(self) -> torch.Tensor:
        """Positions of :meth:`sequences` counted over real tokens only (what ``generate`` used), 0 on padding."""
        return positions_from_mask(torch.cat([self.prompt_mask, self.response_mask], 1))

    def to(self, device: torch.device | str) -> Rollout:
        tensors = {k: getattr(self, k).to(device) for k in
                   ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "ended_with_eos", "prompt_index")}
        optional = {k: getattr(self, k).to(device) if getattr(self, k) is not None else None
                    for k in ("sampler_logps", "action_mask")}
        return Rollout(**tensors, response_texts=self.response_texts, **optional, episodes=self.episodes)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the 1s of an attention mask, 0 on padding."""
    mask = mask.long()
    return (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every end-of-sequence id: the tokenizer's eos and the model's (generation) config eos ids."""
    ids: list[int] = []
    sources = [getattr(tokenizer, "eos_token_id", None)]
    if model is not None:
        sources += [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                    getattr(getattr(model, "config", None), "eos_token_id", None)]
    for value in sources:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ConfigError("neither the tokenizer nor the model defines an eos token, so responses cannot end; "
                         "set tokenizer.eos_token (e.g. the chat template's end-of-turn token).")
    return ids


def pad_token_id(tokenizer, eos_ids: list[int]) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Prompts as lists of ints; a clear error for a padded tensor, an empty prompt or no prompts."""
    if torch.is_tensor(prompts):
        raise TypeError("prompts must be a list of token-id lists without padding (e.g. the rows' prompt_ids), "
                        "not a padded tensor.")
    out = [list(map(int, p)) for p in prompts]
    empty = [i for i, p in enumerate(out) if not p]
    if not out or empty:
        raise ValueError(f"prompts {empty} are empty; every prompt needs at least one token." if empty
                         else "no prompts to generate from.")
    return out


def build_rollout(prompts: list[list[int]], responses: list[list[int]], prompt_index: torch.Tensor,
                  eos_ids: Sequence[int], pad_id: int, tokenizer, device: torch.device | str = "cpu",
                  logps: Sequence[Sequence[float]] | None = None) -> Rollout:
    """A :class:`Rollout` from unpadded token lists; each response is cut after its first EOS token.

    ``logps``: the sampler's log-prob of each response token (same lengths as ``responses``), cut likewise."""
    eos = set(eos_ids)
    cut, ended = [], []
    for r in responses:
        end = next((i for i, t in enumerate(r) if t in eos), None)
        cut.append(list(r) if end is None else list(r[: end + 1]))
        ended.append(end is not None)
    width = max([len(r) for r in cut] + [1])  # at least one column: an all-empty batch still has shape [N, 1]
    sampler_logps = None
    if logps is not None:
        sampler_logps = torch.zeros(len(cut), width, dtype=torch.float32)
        for i, (r, lp) in enumerate(zip(cut, logps)):
            sampler_logps[i, :len(r)] = torch.tensor(list(lp[:len(r)]), dtype=torch.float32)
        sampler_logps = sampler_logps.to(device)
    return Rollout(
        prompt_ids=pad(prompts, pad_id, side="left").to(device),
        prompt_mask=attention_mask_from_lengths([len(p) for p in prompts], side="left").to(device),
        response_ids=pad(cut, pad_id, width=width).to(device),
        response_mask=attention_mask_from_lengths([len(r) for r in cut], width).to(device),
        ended_with_eos=torch.tensor(ended, dtype=torch.bool, device=device),
        prompt_index=prompt_index.to(device),
        response_texts=tokenizer.batch_decode(cut, skip_special_tokens=True),
        sampler_logps=sampler_logps,
    )


@dataclass
class RolloutBatch:
    """``[prompt | response]`` rows ready for a forward pass; responses start at column ``prompt_width``."""

    input_ids: torch.Tensor  # [N, P+R]
    attention_mask: torch.Tensor  # [N, P+R]
    position_ids: torch.Tensor  # [N, P+R], counted over real tokens (what generate used)
    response_ids: torch.Tensor  # [N, R]
    response_mask: torch.Tensor  # [N, R]
    action_mask: torch.Tensor | None = None  # [N, R] multi-turn: 1 on sampled tokens (None: response_mask)

    @classmethod
    def from_rollout(cls, rollout: Rollout) -> RolloutBatch:
        input_ids, attention_mask = rollout.sequences()
        return cls(input_ids, attention_mask, rollout.position_ids(), rollout.response_ids, rollout.response_mask,
                   rollout.action_mask)

    @property
    def loss_mask(self) -> torch.Tensor:
        """1 on the tokens trained on: the sampled ones (environment tokens of multi-turn episodes are 0)."""
        return self.response_mask if self.action_mask is None else self.action_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_width

    def select(self, index: torch.Tensor) -> RolloutBatch:
        """Rows ``index``, without the columns that are padding in all of them (left of the longest prompt,
        right of the longest response): less compute, same log-probs (positions follow the mask)."""
        index = index.to(self.input_ids.device)
        P = self.prompt_width
        prompt_used = self.attention_mask[index, :P].any(0)
        left = int(prompt_used.float().argmax()) if bool(prompt_used.any()) else P - 1
        width = max(int(self.response_mask[index].sum(1).max()), 1)
        cols = slice(left, P + width)
        action = self.action_mask[index, :width] if self.action_mask is not None else None
        return RolloutBatch(self.input_ids[index, cols], self.attention_mask[index, cols],
                            self.position_ids[index, cols], self.response_ids[index, :width],
                            self.response_mask[index, :width], action)

    def packed(self, rows: list[list[int]]) -> PackedRollout:
        """The rows' real tokens (prompt without its left padding, response without its right padding) laid
        end to end, ``rows[k]`` holding the sequences that go to packed row ``k`` in that order; position ids
        restart with each sequence (they are :attr:`position_ids`, counted over real tokens), no attention mask.
        """
        keep = self.attention_mask.bool()
        lengths = keep.sum(1).tolist()
        width = max(sum(lengths[i] for i in row) for row in rows)
        device = self.input_ids.device
        start = torch.zeros(len(self), dtype=torch.long)
        ends: list[tuple[int, int]] = []  # per packed row: (tokens used, sequence laid last)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                start[i] = r * width + at
                at += lengths[i]
            ends.append((at, row[-1]))
        within = keep.long().cumsum(1) - 1
        slots = torch.where(keep, start.to(device)[:, None] + within, -1)
        flat = slots[keep]
        input_ids = torch.zeros(len(rows) * width, dtype=self.input_ids.dtype, device=device)
        input_ids[flat] = self.input_ids[keep]
        positions = torch.zeros(len(rows) * width, dtype=self.position_ids.dtype, device=device)
        positions[flat] = self.position_ids[keep]
        positions = positions.view(len(rows), width)
        for r, (used, last) in enumerate(ends):  # padding continues the last sequence's positions (as in SFT packing)
            if used < width:
                nxt = int(self.position_ids[last][keep[last]][-1]) + 1
                positions[r, used:] = torch.arange(nxt, nxt + width - used, device=device)
        return PackedRollout(input_ids.view(len(rows), width), positions, slots)


@dataclass
class PackedRollout:
    """A :class:`RolloutBatch` without padding (:meth:`RolloutBatch.packed`)."""

    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width], restarting at 0 with each sequence
    slots: torch.Tensor  # [N, P+R]: flat index into the [rows, width] grid of each real token of the batch, -1 off
