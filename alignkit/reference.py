"""The reference policy of DPO, KTO and online RL: a frozen model, or the policy with its LoRA adapter off.

- :func:`load_reference` picks and loads it from the config (``<method>.ref_model``, else the adapter-off
  policy for LoRA/QLoRA, else a frozen copy of ``model.name_or_path``) and logs the choice;
- :class:`Reference` runs it: ``with reference.applied(policy) as ref: ref(...)`` runs without gradients,
  either the frozen model or ``policy`` in eval mode with its adapter switched off;
- :func:`adapters_disabled` switches a PEFT model's adapter off for a block (a no-op for plain models).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch

from alignkit.config import ConfigError, RunConfig
from alignkit.forward import BatchLayout, choose_layout, exact_layouts, score_rollout
from alignkit.models import eval_mode, is_peft_model, load_model, unwrap_model
from alignkit.rollout import RolloutBatch
from alignkit.training import prepare_frozen

logger = logging.getLogger("alignkit")


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """Run ``model`` without its LoRA adapter (the reference model of a LoRA run); a no-op for plain models."""
    inner = unwrap_model(model)
    if is_peft_model(inner):
        with inner.disable_adapter():
            yield
    else:
        yield


class Reference:
    """A frozen reference ``model`` (placed), or, when ``model`` is None, the policy with its adapter off."""

    def __init__(self, model: torch.nn.Module | None = None):
        self.model = model
        self._packed_ok: bool | None = None  # can the frozen model take packed rows (probed once)

    def layout_for(self, ref: torch.nn.Module, layout: BatchLayout | None) -> BatchLayout | None:
        """``layout`` (the policy's) for ``ref``; a frozen model of its own is probed once before it runs packed."""
        if ref is self.model and layout is not None and layout.packed:
            if self._packed_ok is None:  # ZeRO-3 (partitioned weights): the attention implementation decides
                zero3 = any(hasattr(p, "ds_id") for p in ref.parameters())
                self._packed_ok = exact_layouts(ref, probe=False)["packed"] if zero3 else choose_layout(
                    ref, padding_free=True, what="reference batches").packed
            if not self._packed_ok:
                return BatchLayout()
        return layout

    @property
    def is_adapter_off_policy(self) -> bool:
        return self.model is None

    @contextlib.contextmanager
    def applied(self, policy: torch.nn.Module, adapter_owner: torch.nn.Module | None = None
                ) -> Iterator[torch.nn.Module]:
        """The module to run as the reference inside the block, without gradients: the frozen model, or
        ``policy`` in eval mode with the adapter of ``adapter_owner`` (default: ``policy``) switched off."""
        with torch.no_grad():
            if self.model is not None:
                yield self.model
                return
            with eval_mode(policy), adapters_disabled(policy if adapter_owner is None else adapter_owner):
                yield policy


def load_reference(cfg: RunConfig, tokenizer, accelerator, policy) -> Reference:
    """The reference of ``cfg`` for ``policy`` (DPO, KTO, online RL), placed for this process, choice logged."""
    name, ref_name = cfg.method, cfg.method_args.ref_model
    if ref_name:
        ref_cfg = dataclasses.replace(cfg.model, name_or_path=ref_name, gguf_file=None, revision=None,
                                      finetune="full", gradient_checkpointing=False)
        logger.info(f"{name} reference: frozen {ref_name} ({name}.ref_model)")
    elif cfg.model.finetune in ("lora", "qlora"):
        logger.info(f"{name} reference: the policy with its LoRA adapter disabled (model.finetune="
                    f"{cfg.model.finetune}; no second copy of the weights)")
        return Reference()
    else:
        logger.info(f"{name} reference: no {name}.ref_model given with model.finetune=full, so a frozen copy of "
                    f"{cfg.model.name_or_path} is loaded as the reference (a second copy of the weights in memory; "
                    f"set {name}.ref_model, or use model.finetune=lora to reuse the policy with its adapter off)")
        ref_cfg = dataclasses.replace(cfg.model, finetune="full", gradient_checkpointing=False)
    ref = load_model(ref_cfg, tokenizer, trainable=False)
    ref_vocab, policy_vocab = ref.config.get_text_config().vocab_size, policy.config.get_text_config().vocab_size
    if ref_vocab != policy_vocab:
        raise ConfigError(f"{name}.ref_model={ref_name!r} has a vocabulary of {ref_vocab} tokens but the policy "
                          f"{policy_vocab}: the reference must use the policy's tokenizer (log-probs are compared "
                          "token by token). Use a reference from the same model family, or the policy's base model.")
    return Reference(prepare_frozen(accelerator, ref))


def reference_logps(reference: Reference, model, batch: RolloutBatch, temperature: float, micro_batch_size: int, *,
                    adapter_owner=None, autocast=None, layout: BatchLayout | None = None,
                    **model_kwargs: Any) -> torch.Tensor:
    """Log-probs of a rollout's response tokens under the reference, in the policy's ``layout`` where the
    reference allows it. ``model_kwargs`` go to the policy's forward only (the adapter-off case; e.g.
    ``values=False`` to skip PPO's critic)."""
    with reference.applied(model, adapter_owner) as ref:
        kwargs = model_kwargs if ref is model else {}
        return score_rollout(ref, batch, temperature, micro_batch_size, autocast=autocast,
                             layout=reference.layout_for(ref, layout), **kwargs).logps
