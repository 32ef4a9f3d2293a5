"""AdamW with decoupled weight decay (none on biases and norms) and the warmup + decay schedules."""

from __future__ import annotations

import math

import torch

from alignkit.config import TrainingConfig
from alignkit.errors import TrainingError


def build_optimizer(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise TrainingError("the model has no trainable parameters (check model.finetune and lora_target_modules).")
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.learning_rate,
                             betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the peak LR at update ``step``: linear warmup, then cosine/linear decay or constant."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer, t: TrainingConfig, total_steps: int):
    warmup = t.warmup_steps if t.warmup_steps > 0 else int(t.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_scheduler, warmup, total_steps))
