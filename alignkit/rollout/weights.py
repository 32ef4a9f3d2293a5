"""The policy's weights as vLLM takes them (HF checkpoint names), for both vLLM samplers: the colocated
engine (:mod:`alignkit.rollout.vllm`) and vLLM servers (:mod:`alignkit.rollout.vllm_server`).

- :func:`policy_weights`: every weight of a plain model, or of a LoRA model with its adapter folded in;
  ZeRO-3 gathers one layer at a time, FSDP2 the whole model. No vLLM import: the training side only.
- :func:`refresh_tied_lm_head`: runs inside vLLM (its model) after a reload.
- :func:`request_seed`: one seed per prompt, the same for both samplers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from alignkit.config import ConfigError
from alignkit.models import unwrap_model
from alignkit.rollout.fsdp2 import is_fsdp_module, unsharded
from alignkit.rollout.zero3 import gathered
from alignkit.training.batches import derived_seed


def _dense(module: torch.nn.Module, param: torch.Tensor) -> torch.Tensor:
    """The weight as a plain tensor: bitsandbytes 4/8-bit weights (QLoRA's frozen base) dequantized."""
    if type(param).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(module)
    return param.detach()


def _owned(tensor: torch.Tensor, partitioned: bool) -> torch.Tensor:
    # vLLM keeps references to a layer's tensors until the layer is complete; a ZeRO-3 gather is released
    # (and its memory reused) as soon as the next parameter is fetched, so keep a copy of those
    return tensor.clone() if partitioned else tensor


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF checkpoint name, tensor) of every weight of a plain model, one ZeRO-3 gather at a time.

    ``named_parameters`` already leaves out an lm_head tied to the embeddings, as vLLM expects."""
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        with gathered([param]):
            yield name, _owned(_dense(modules[name.rpartition(".")[0]], param), hasattr(param, "ds_id"))


def _checkpoint_name(peft_name: str, active: set[str]) -> str | None:
    """The base model's name of a PEFT parameter; None for LoRA tensors, the original copy of a
    ``modules_to_save`` module and the copies of inactive adapters."""
    parts = peft_name.removeprefix("base_model.model.").split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        if parts[i + 1] not in active:
            return None
        del parts[i:i + 2]
    return ".".join(p for p in parts if p != "base_layer")


def merged_lora_weights(peft_model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(base checkpoint name, tensor) of every weight of a PEFT LoRA model with its active adapters folded in.

    ``W + get_delta_weight`` goes into new tensors: merging into the model and unmerging after would add
    rounding error to the frozen base weights at every rollout. QLoRA's 4-bit base weights are dequantized;
    ``modules_to_save`` copies are sent under the original module's name. ZeRO-3 gathers one layer at a time.
    """
    from peft.tuners.lora import LoraLayer

    active = set(peft_model.active_adapters)
    for adapter in active:
        peft_type = str(getattr(peft_model.peft_config[adapter], "peft_type", "LORA")).rpartition(".")[2]
        if peft_type != "LORA":
            raise ConfigError(f"the policy's PEFT adapter {adapter!r} is {peft_type}; the vllm sampler can only fold "
                              "LoRA adapters into vLLM's weights: use generation.sampler: hf.")
    modules = dict(peft_model.named_modules())
    for name, param in peft_model.named_parameters():
        target = _checkpoint_name(name, active)
        if target is None:
            continue
        owner_name = name.rpartition(".")[0]
        layer = modules.get(owner_name.removesuffix(".base_layer"))
        partitioned = hasattr(param, "ds_id")
        if not (isinstance(layer, LoraLayer) and owner_name.endswith(".base_layer") and name.endswith(".weight")):
            with gathered([param]):
                yield target, _owned(_dense(modules[owner_name], param), partitioned)
            continue
        with gathered(list(layer.parameters())):
            weight = _dense(layer.base_layer, param).clone()
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A and adapter not in layer.lora_embedding_A:
                    continue
                if layer.use_dora.get(adapter):
                    raise ConfigError(f"the policy's LoRA adapter {adapter!r} uses DoRA (model.use_dora), which the "
                                      "vllm sampler cannot fold into vLLM's weights: use generation.sampler: hf.")
                weight += layer.get_delta_weight(adapter).to(weight.dtype)
            yield target, weight


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What vLLM's ``reload_weights`` takes for ``model`` (plain, LoRA/QLoRA, DDP/DeepSpeed-wrapped, FSDP2)."""
    inner = unwrap_model(model)
    weights = merged_lora_weights(inner) if hasattr(inner, "peft_config") else full_weights(inner)
    return _gathered_by_fsdp(inner, weights) if is_fsdp_module(inner) else weights


def _gathered_by_fsdp(model: torch.nn.Module, weights: Iterator[tuple[str, torch.Tensor]]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` of an FSDP2 model, read while it is gathered (a collective: every process syncs); copies,
    since the gathered tensors are freed when it shards again."""
    with unsharded(model):
        for name, tensor in weights:
            yield name, tensor.clone()


def refresh_tied_lm_head(vllm_model: torch.nn.Module) -> bool:
    """CPU: vLLM's lm_head keeps its own packed copy of a tied embedding matrix, which ``reload_weights``
    does not rebuild (the lm_head is an alias, never loaded); re-pack it from the updated embeddings."""
    lm_head = getattr(vllm_model, "lm_head", None)
    embed = getattr(getattr(vllm_model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or getattr(lm_head, "weight", None) is not embed.weight:
        return False
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


def request_seed(seed: int, index: int) -> int:
    # each prompt its own stream (vLLM gives sample j of a request seed + j); below 2**62 so seed + j fits int64
    return derived_seed(seed, index) % 2**62
