"""Full weights of a PyTorch FSDP2 model for the length of a block (generation), like :mod:`.zero3` for ZeRO-3."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def is_fsdp_module(module: torch.nn.Module) -> bool:
    # by class name: FSDP2's fully_shard gives a module a subclass of FSDPModule
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP2 shards in ``model`` (each a shard group); empty for any other model."""
    return [m for m in model.modules() if is_fsdp_module(m)]


@contextlib.contextmanager
def unsharded(model: torch.nn.Module, part: torch.nn.Module | None = None) -> Iterator[bool]:
    """Full parameters of an FSDP2 model inside the block; a no-op for other models. Yields whether it gathered.

    One all-gather per shard group for the whole block, then no communication at all: each process may run
    as many forwards as it needs (generation stops at a different length on each), which per-layer gathers
    would turn into a hang. The price is memory: every process holds all the weights for the duration.
    ``part``: gather only this submodule's groups and the root's (the critic of PPO's policy-and-critic
    module, whose root group holds the embeddings and heads). A collective: every process must enter.
    """
    root = model
    if not is_fsdp_module(root):
        yield False
        return
    modules = [root] + [m for m in fsdp_modules(part if part is not None else model) if m is not root]
    # the root decides who is root at its first forward; generation may run a submodule first (PPO's policy)
    root._get_fsdp_state()._lazy_init()
    saved = []
    for m in modules:
        state = m._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward,
                      [g.post_forward_mesh_info for g in state._fsdp_param_groups]))
        m.set_reshard_after_forward(False, recurse=False)  # stay gathered after each forward
    try:
        for m in modules:
            m.unshard()
        yield True
    finally:
        for m in modules:
            m.reshard()
        for state, auto, infos in saved:
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos):
                group.post_forward_mesh_info = info
