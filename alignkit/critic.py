"""PPO's critic: a sequence classifier's backbone and one-output score head, applied at every position.

The critic is an ``AutoModelForSequenceClassification`` (one output) of the critic checkpoint: its backbone
runs over ``[prompt | response]`` and its score head is applied at *every* position, giving ``V(s_t)`` at
the positions whose logits predict each response token. ``init="policy"`` starts the head at zero (values
0, nothing random in the first advantages); ``init="reward_model"`` starts from the reward model
(InstructGPT), which then has to share the policy's tokenizer and be a causal (decoder) model.

Policy and critic train as one module (:class:`PolicyAndCritic`): one accelerate/DeepSpeed engine, one
optimizer, one checkpoint (:class:`PolicyCriticCheckpointer`: the policy as the HF folder, the critic in
its ``critic/`` subfolder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import ConfigError, ModelConfig
from alignkit.models import load_model, load_tokenizer, save_model
from alignkit.rewards import same_tokenizer
from alignkit.rollout.fsdp2 import unsharded
from alignkit.rollout.zero3 import gathered
from alignkit.training import CONFIG_FILE, Checkpointer, is_fsdp2, zero_stage
from alignkit.training.checkpoint import full_state_dict

logger = logging.getLogger("alignkit")

CRITIC_INITS = ("policy", "reward_model")
CRITIC_DIR = "critic"
_VALUE_HEADS = ("score", "classifier")


def _classifier(model):
    """The ``AutoModelForSequenceClassification`` inside a (PEFT-wrapped) critic."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def value_head(model) -> torch.nn.Module:
    inner = _classifier(model)
    for name in _VALUE_HEADS:
        head = getattr(inner, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ConfigError(f"the critic {type(inner).__name__} has no score/classifier head; use a causal-LM backbone "
                      "loaded as AutoModelForSequenceClassification (ppo.critic_init=policy always works).")


def critic_values(critic, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
    """``V(s_t)`` ``[B, keep]`` at the last ``keep`` positions (all when 0): the backbone's hidden states
    through the one-output score head, at every position instead of only the last one."""
    inner = _classifier(critic)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    hidden = hidden[:, -keep:] if keep else hidden
    return value_head(critic)(hidden).squeeze(-1)


@torch.no_grad()
def rollout_values(model, batch, micro_batch_size: int, *, autocast=None) -> torch.Tensor:
    """The critic's ``V(s_t)`` ``[N, R]`` at the positions that predict each response token of ``batch`` (a
    RolloutBatch), without the policy's forward: for when the old log-probs come from the sampler."""
    from alignkit.models import eval_mode, unwrap_model

    critic = unwrap_model(model).critic
    parts = []
    with eval_mode(model), unsharded(unwrap_model(model), part=critic):  # FSDP2: the critic runs outside the forward
        for index in torch.arange(len(batch)).split(micro_batch_size):
            part = batch.select(index)
            with autocast() if autocast is not None else contextlib.nullcontext():
                v = critic_values(critic, part.input_ids, part.attention_mask, part.position_ids,
                                  keep=part.response_width + 1)[:, :-1].float()
            parts.append(torch.nn.functional.pad(v, (0, batch.response_width - v.shape[1])))
    return torch.cat(parts) * batch.response_mask


@dataclass
class PolicyCriticOutput:
    logits: torch.Tensor
    token_values: torch.Tensor | None


class PolicyAndCritic(torch.nn.Module):
    """Policy and critic as one module: one accelerate/DeepSpeed engine, one optimizer, one forward (DDP
    syncs both), one checkpoint. ``generate``, ``config``, ``generation_config`` and ``get_base_model``
    are the policy's, so a sampler samples from this module like from the policy itself (and under
    ZeRO-3 gathers only the policy, ``sampled_module``, once per rollout)."""

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep: int = 0,
                values: bool = True, **kwargs) -> PolicyCriticOutput:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, **kwargs)
        v = critic_values(self.critic, input_ids, attention_mask, position_ids, logits_to_keep) if values else None
        return PolicyCriticOutput(logits=out.logits, token_values=v)

    def generate(self, *args, **kwargs):
        return self.policy.generate(*args, **kwargs)

    @property
    def sampled_module(self) -> torch.nn.Module:
        """What a sampler runs: the policy (under ZeRO-3 only its weights are gathered to generate)."""
        return self.policy

    def get_base_model(self) -> torch.nn.Module:
        return self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy

    @property
    def config(self):
        return self.get_base_model().config

    @property
    def generation_config(self):
        return self.get_base_model().generation_config


def load_critic(model_cfg: ModelConfig, tokenizer, policy, *, init: str, reward_model: str | None,
                section: str = "ppo") -> torch.nn.Module:
    """The trainable critic (same finetune mode as the policy), from the policy checkpoint or the reward model."""
    if init == "reward_model":
        critic_cfg = dataclasses.replace(model_cfg, name_or_path=reward_model, gguf_file=None, revision=None,
                                         tokenizer=None, chat_template=None)
        if not same_tokenizer(load_tokenizer(critic_cfg), tokenizer):
            raise ConfigError(f"{section}.critic_init=reward_model: the reward model {reward_model} has its own "
                              "tokenizer, but the critic reads the policy's tokens. Use "
                              f"{section}.critic_init=policy (the reward model still scores through its own "
                              "tokenizer), or a reward model trained on the policy's base model.")
        logger.info(f"{section} critic: initialised from the reward model {reward_model}")
    else:
        critic_cfg = model_cfg
        logger.info(f"{section} critic: the policy checkpoint {model_cfg.name_or_path} with a zero-initialised "
                    "value head")
    critic = load_model(critic_cfg, tokenizer, task="seq_cls", num_labels=1)
    policy_vocab = policy.config.get_text_config().vocab_size
    critic_vocab = _classifier(critic).config.get_text_config().vocab_size
    if critic_vocab != policy_vocab or getattr(_classifier(critic).config, "is_encoder_decoder", False):
        raise ConfigError(f"{section} critic: {critic_cfg.name_or_path} has a vocabulary of {critic_vocab} tokens "
                          f"but the policy {policy_vocab}; the critic must read the policy's tokens "
                          f"({section}.critic_init=policy).")
    if init == "policy":
        head = list(value_head(critic).parameters())
        with gathered(head, modifier_rank=0), torch.no_grad():  # ZeRO-3 may have partitioned it at load time
            for p in head:
                p.zero_()
    return critic


class PolicyCriticCheckpointer(Checkpointer):
    """Checkpoints of :class:`PolicyAndCritic`: the HF folder holds the policy, ``critic/`` the critic (a
    normal sequence-classifier folder); optimizer, scheduler, RNG and method state as usual."""

    def save_model(self, path: Path) -> None:
        acc = self.accelerator
        state_dict = full_state_dict(acc, self.model) if zero_stage(acc) == 3 or is_fsdp2(acc) else None
        if acc.is_main_process:
            wrapper = acc.unwrap_model(self.model)
            for name, module, where in (("policy", wrapper.policy, path), ("critic", wrapper.critic, path / CRITIC_DIR)):
                part = None
                if state_dict is not None:
                    part = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(f"{name}.")}
                save_model(module, self.tokenizer, where, state_dict=part)
            self.cfg.save(path / CONFIG_FILE)
