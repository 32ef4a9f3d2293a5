"""Samplers: responses from the current policy for PPO / RLOO / GRPO / REINFORCE++, rejection sampling and
on-policy distillation (GKD).

Two samplers share one interface, ``sampler.generate(model, prompts, seed=None, logps=False) -> Rollout``:

- :class:`HFSampler` (``generation.sampler: hf``, the default): ``model.generate`` with a KV cache, in
  batches, on the training model itself (plain, LoRA, DDP- or DeepSpeed-wrapped);
- :class:`~alignkit.rollout.vllm.VLLMSampler` (``generation.sampler: vllm``, optional extra): a vLLM engine
  in each training process; the policy's weights are pushed into it before every rollout.
- :class:`~alignkit.rollout.vllm_server.VLLMServerSampler` (``generation.sampler: vllm_server``): ``vllm serve``
  processes over HTTP (given as URLs or started here); the weights (or a LoRA adapter) go to them before
  every rollout through vLLM's own weight-update routes.

Both also have ``sleep()`` (vLLM with sleep mode: free its GPU memory until the next rollout; otherwise
nothing) and ``close()``.

:mod:`~alignkit.rollout.batch` documents the layout of a :class:`Rollout`.
"""

from __future__ import annotations

import torch

from alignkit.rollout.batch import Rollout, RolloutBatch, build_rollout, eos_token_ids
from alignkit.rollout.config import SAMPLERS, SamplingConfig
from alignkit.rollout.hf import HFSampler
from alignkit.rollout.zero3 import gathered_parameters

__all__ = ["SAMPLERS", "HFSampler", "Rollout", "RolloutBatch", "SamplingConfig", "build_rollout", "build_sampler",
           "eos_token_ids", "gathered_parameters"]


def build_sampler(config: SamplingConfig, tokenizer, *, model_name_or_path: str | None = None,
                  device: torch.device | str | None = None, dtype: str = "auto", seed: int = 0,
                  policy: torch.nn.Module | None = None):
    """The sampler ``config.sampler`` names. vLLM needs ``model_name_or_path`` (the policy's starting
    checkpoint: it gives the architecture; weights are synced from the policy before each rollout) and
    runs in ``dtype`` (``model.dtype``); ``policy``, when given, lets it check on a GPU that the policy's
    gradients and optimizer state will fit beside it."""
    from alignkit.config import ConfigError

    config.check()
    if config.sampler == "vllm":
        from alignkit.rollout.vllm import VLLMSampler

        if not model_name_or_path:
            raise ConfigError("generation.sampler=vllm needs the policy's model path to build vLLM (model.name_or_path).")
        return VLLMSampler(model_name_or_path, tokenizer, config, dtype=dtype, seed=seed, policy=policy)
    if config.sampler == "vllm_server":
        from alignkit.rollout.vllm_server import VLLMServerSampler

        if not model_name_or_path:
            raise ConfigError("generation.sampler=vllm_server needs the policy's model path (model.name_or_path): "
                              "the servers serve it and the check compares their model with it.")
        return VLLMServerSampler(model_name_or_path, tokenizer, config, dtype=dtype, seed=seed, policy=policy)
    return HFSampler(tokenizer, config, device=device)
