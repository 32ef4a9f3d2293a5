"""Data order and seeds that a resumed run replays exactly.

- :class:`BatchStream`: a seeded permutation per epoch, cut into global batches and sharded by rank;
  a run resumed at micro-batch ``n`` continues with micro-batch ``n``. With ``group_by_length``, rows of
  similar length share a global batch (less padding), in an order that is still a function of seed and epoch.
- :func:`minibatches`: a seeded shuffle of a rollout's rows into optimizer minibatches.
- :func:`derived_seed`: independent seeds from integers (training seed, step, rank, ...), so sampling and
  shuffling never draw from the global RNG (whose state a resumed run does not share).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

from alignkit.errors import TrainingError


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. training.seed, step, rank); independent streams per tuple."""
    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


TOKEN_FIELDS = ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")
LENGTH_GROUP_BATCHES = 50  # global batches per window that length grouping sorts


def row_tokens(row: dict) -> int:
    """Tokens a tokenized row puts through the model (all its token-id fields)."""
    return sum(len(row[k]) for k in TOKEN_FIELDS if k in row)


class BatchStream:
    """Micro-batches in a fixed order that a resumed run can replay from any position.

    Epoch ``e`` visits ``randperm(n, seed + e)``; global batch ``g`` is rows ``[g*B*W, (g+1)*B*W)``
    and process ``r`` takes its ``r``-th slice of ``B`` rows. Incomplete global batches are dropped.

    ``group_by_length``: the epoch's permutation (after dropping the incomplete tail) is cut into windows of
    ``LENGTH_GROUP_BATCHES`` global batches; each window is sorted by :func:`row_tokens`, longest first,
    and cut into global batches, whose order is then shuffled with a seed derived from ``(seed, epoch)``.
    Rows of a global batch have similar lengths (little padding, similar step times across processes),
    the same rows are visited per epoch, and the order is as replayable as the plain one.
    """

    def __init__(self, rows: list[dict], collate, *, batch_size: int, world: int, rank: int, seed: int,
                 shuffle: bool = True, num_workers: int = 0, what: str = "rows",
                 batch_size_key: str = "training.per_device_batch_size", group_by_length: bool = False):
        self.rows, self.collate = rows, collate
        self.batch_size, self.world, self.rank = batch_size, world, rank
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.lengths = [row_tokens(r) for r in rows] if group_by_length else None
        self.batches_per_epoch = len(rows) // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise TrainingError(
                f"{len(rows)} {what} is less than one global batch ({batch_size} per process x {world} processes); "
                f"lower {batch_size_key} or add data."
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.rows)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(n))
        per_global = self.batch_size * self.world
        if self.lengths is not None:
            order = self._grouped(order[:self.batches_per_epoch * per_global], epoch)
        out = []
        for g in range(self.batches_per_epoch):
            start = g * per_global + self.rank * self.batch_size
            out.append(order[start:start + self.batch_size])
        return out

    def _grouped(self, order: list[int], epoch: int) -> list[int]:
        """``order`` regrouped into global batches of similar lengths (see the class doc)."""
        per_global = self.batch_size * self.world
        window = per_global * LENGTH_GROUP_BATCHES
        batches = []
        for start in range(0, len(order), window):
            part = sorted(order[start:start + window], key=lambda i: -self.lengths[i])  # stable: ties keep order
            batches += [part[k:k + per_global] for k in range(0, len(part), per_global)]
        shuffled = torch.randperm(len(batches), generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))
        return [i for b in shuffled.tolist() for i in batches[b]]

    def iterate(self, start_micro_step: int = 0) -> Iterator[dict]:
        """Endless micro-batches, starting at global micro-batch index ``start_micro_step``."""
        from torch.utils.data import DataLoader

        epoch, offset = divmod(start_micro_step, self.batches_per_epoch)
        while True:
            batches = self.epoch_batches(epoch)[offset:]
            # its own generator: the loader must not draw from the global RNG (dropout's), or a
            # resumed run would see different dropout masks than the uninterrupted one
            loader = DataLoader(self.rows, batch_sampler=batches, collate_fn=self.collate,
                                num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, offset = epoch + 1, 0


def eval_batches(rows: list[dict], collate, batch_size: int, world: int, rank: int) -> Iterator[tuple[dict, bool]]:
    """This process's share of the eval rows as ``(batch, counts)``: over all processes every row once.

    Every process runs the same number of batches (ZeRO-3 gathers weights in each forward, KTO reduces over
    processes in its loss), so a process whose share runs out first (fewer rows than processes, or a
    remainder) gets filler batches of ``rows[:1]`` with ``counts`` False: run them, drop their results.
    """
    mine = rows[rank::world]
    n_batches = math.ceil(math.ceil(len(rows) / world) / batch_size)
    for b in range(n_batches):
        part = mine[b * batch_size:(b + 1) * batch_size]
        yield (collate(part), True) if part else (collate(rows[:1]), False)


def minibatches(n: int, size: int, seed: int) -> list[torch.Tensor]:
    """A seeded permutation of ``range(n)`` cut into index tensors of ``size`` rows (the last may be short)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(order.split(size))


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
