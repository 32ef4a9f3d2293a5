"""Rollouts sampled ahead: the online methods' ``async_steps: k``.

The rollouts of the next ``k`` steps are generated while the current step trains. :class:`RolloutsAhead`
keeps them in step order, each with the policy *version* that sampled it (the number of steps trained when
its weights reached the sampler). After every update, :meth:`RolloutsAhead.push` waits for the rollouts
still being generated (so each one comes from exactly one version), sends the new weights and starts the
rollout of the step ``k`` ahead; :meth:`RolloutsAhead.take` hands the trainer step ``s``'s rollout, sampled
at version ``v`` with ``s - v <= k`` (a rollout past the bound is sampled again with the current weights).

The samplers it drives have ``sync_weights(model)`` (the weights that answer from now on) and
``submit(prompts, seed=, logps=) -> Future[Rollout]`` (sample in the background with those weights):

- ``vllm_server``: the HTTP requests are in flight while the trainer updates
  (:meth:`~alignkit.rollout.vllm_server.VLLMServerSampler.submit`);
- ``hf``: :class:`SnapshotSampler`, a frozen copy of the policy that samples in a background thread.

Resume: the trainer counts a prompt batch as consumed when it trains on its rollout, and the stream of
prompt batches given here is the trainer's (``BatchStream.iterate(state.micro_step)``); rollouts sampled
ahead but not trained when a run stops are sampled again (by the resumed policy) after ``--resume``.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from alignkit.models import model_device, unwrap_model
from alignkit.rollout.batch import Rollout
from alignkit.rollout.hf import HFSampler


class SnapshotSampler:
    """The ``hf`` sampler for ``async_steps``: ``model.generate`` on a frozen copy of the policy, in a
    background thread, while the policy itself trains. :meth:`sync_weights` copies the policy's trainable
    parameters (a LoRA policy: its adapter) into the copy. It holds a second copy of the policy in memory,
    and the thread seeds torch's global generator while it samples (as the synchronous ``hf`` sampler does).
    On a GPU it samples on a CUDA stream of its own, so its kernels can run beside the update's."""

    def __init__(self, sampler: HFSampler, policy: torch.nn.Module):
        self.sampler = sampler
        inner = unwrap_model(policy)
        self.copy = copy.deepcopy(inner).requires_grad_(False).eval()
        self._pairs = [(c, p) for c, p in zip(self.copy.parameters(), inner.parameters(), strict=True)
                       if p.requires_grad]
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignkit-rollout")
        device = model_device(self.copy)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # None: no stream switch

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        for theirs, ours in self._pairs:
            theirs.copy_(ours)

    def submit(self, prompts: list[list[int]], *, seed: int | None = None, logps: bool = False) -> Future:
        return self._thread.submit(self._generate, prompts, seed, logps)

    def _generate(self, prompts: list[list[int]], seed: int | None, logps: bool) -> Rollout:
        # the rollout is built from host lists (generate reads its tokens back), so it is complete when returned
        with torch.cuda.stream(self._stream):
            return self.sampler.generate(self.copy, prompts, seed=seed, logps=logps)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.sampler.close()


@dataclass
class Ahead:
    step: int  # the training step this rollout is for
    rows: list[dict]  # its prompt rows
    version: int  # the policy version that samples it
    future: Future  # -> Rollout


class RolloutsAhead:
    """Step ``s``'s rollout for ``s`` in ``[version, version + depth]`` from ``sampler`` (see the module
    docstring); ``batches`` is the stream of prompt batches from the first step on, ``end`` the step count."""

    def __init__(self, sampler, batches: Iterator[list[dict]], *, depth: int, end: int, seed: Callable[[int], int],
                 logps: bool):
        self.sampler, self.batches, self.depth, self.end = sampler, batches, depth, end
        self.seed, self.logps = seed, logps
        self.pending: deque[Ahead] = deque()
        self.version: int | None = None
        self.next_step: int | None = None

    def _submit(self, step: int, rows: list[dict]) -> Ahead:
        future = self.sampler.submit([r["prompt_ids"] for r in rows], seed=self.seed(step), logps=self.logps)
        return Ahead(step, rows, self.version, future)

    def push(self, model: torch.nn.Module, version: int) -> tuple[float, float | None]:
        """The weights of ``model`` (``version`` = the steps it has trained) to the sampler, once the rollouts
        in flight are done; then the rollouts of the steps up to ``version + depth`` start. Returns (seconds
        waited for the rollouts in flight, seconds of the weight sync or None when every rollout is sampled)."""
        start = time.perf_counter()
        for ahead in self.pending:
            ahead.future.result()  # (an error in the background is raised here)
        synced = time.perf_counter()
        if self.next_step is not None and self.next_step >= self.end:
            return synced - start, None  # every rollout is sampled: no weights to send
        self.sampler.sync_weights(model)
        done = time.perf_counter()
        self.version = version
        self.next_step = version if self.next_step is None else self.next_step
        while self.next_step < min(self.end, version + self.depth + 1):
            self.pending.append(self._submit(self.next_step, next(self.batches)))
            self.next_step += 1
        return synced - start, done - synced

    def take(self, step: int) -> tuple[list[dict], Rollout, int, float]:
        """``(rows, rollout, staleness, seconds waited)`` of ``step``: staleness = ``step - version`` of the
        policy that sampled it, at most ``depth``."""
        start = time.perf_counter()
        ahead = self.pending.popleft()
        if ahead.step != step:
            raise RuntimeError(f"rollouts ahead: step {step} asked for, step {ahead.step} is next")
        if step - ahead.version > self.depth:  # past the bound: sampled again by the current weights
            ahead.future.result()
            ahead = self._submit(step, ahead.rows)
        rollout = ahead.future.result()
        return ahead.rows, rollout, step - ahead.version, time.perf_counter() - start

    def close(self) -> None:
        """Drop the rollouts not trained on and close the sampler."""
        for ahead in self.pending:
            ahead.future.cancel()
        self.pending.clear()
        self.sampler.close()


def rollouts_ahead(sampler, policy: torch.nn.Module, batches: Iterator[list[dict]], *, depth: int, end: int,
                   seed: Callable[[int], int], logps: bool) -> RolloutsAhead:
    """The queue of rollouts ahead for ``sampler``; an ``HFSampler`` samples from a :class:`SnapshotSampler`
    copy of ``policy``. Closing the queue closes ``sampler``."""
    if isinstance(sampler, HFSampler):
        sampler = SnapshotSampler(sampler, policy)
    return RolloutsAhead(sampler, batches, depth=depth, end=end, seed=seed, logps=logps)
