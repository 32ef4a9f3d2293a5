"""Full weights of a DeepSpeed ZeRO-3 model for the length of a block (generation, weight sync, init)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from alignkit.models import is_deepspeed_engine


def zero3_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters partitioned by DeepSpeed ZeRO-3 (they carry ``ds_id``); empty otherwise."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """These parameters in full inside the block when ZeRO-3 partitions them; a no-op otherwise.

    ``modifier_rank``: the process whose in-place changes are kept (None: read only)."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def _hook_owner(model):
    """The DeepSpeed object holding the ZeRO-3 fetch/release module hooks of an engine, or None."""
    if not is_deepspeed_engine(model):
        return None
    optimizer = getattr(model, "optimizer", None)
    owner = getattr(optimizer, "parameter_offload", optimizer)
    return owner if hasattr(owner, "forward_hooks") and hasattr(owner, "_register_deepspeed_module") else None


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module, part: torch.nn.Module | None = None) -> Iterator[bool]:
    """Full (un-partitioned) parameters of a ZeRO-3 model inside the block; a no-op for other models.

    Yields whether it gathered. One all-gather for the whole block instead of one per layer per forward,
    so generation runs at normal speed; the price is memory: every GPU holds all the weights (in the
    training dtype) for the duration. ``part``: gather only this submodule's parameters (the policy of
    PPO's policy-and-critic engine; the rest must not run inside the block). ZeRO-3's per-module hooks are
    removed meanwhile (they would re-partition after each forward) and registered again after. A
    collective: every process must enter.
    """
    params = zero3_params(part if part is not None else model)
    if not params:
        yield False
        return
    import deepspeed

    owner = _hook_owner(model)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if owner is not None:
            for hook in owner.forward_hooks + owner.backward_hooks:
                hook.remove()
            owner.forward_hooks, owner.backward_hooks = [], []
        try:
            yield True
        finally:
            if owner is not None:
                coordinator = getattr(owner, "param_coordinator", None)
                if coordinator is not None and not coordinator.is_invalid_trace():
                    coordinator._invalidate_trace()  # the recorded fetch order no longer matches
                owner._register_deepspeed_module(owner.module)
