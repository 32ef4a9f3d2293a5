"""The ``vllm`` sampler: a vLLM instance colocated on each training process."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from alignkit import assets
from alignkit.config import ConfigError
from alignkit.launch import free_port
from alignkit.models import model_device, unwrap_model
from alignkit.rollout.batch import Rollout, build_rollout, check_prompts, eos_token_ids, pad_token_id
from alignkit.rollout.config import SamplingConfig
from alignkit.rollout.zero3 import gathered, gathered_parameters


def merged_lora_weights(peft_model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(base checkpoint name, tensor) of every base weight of a PEFT LoRA model with its active adapters
    folded in, as new tensors (the model is not modified). LoRA tensors themselves are left out."""
    deltas: dict[str, torch.Tensor] = {}
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "get_delta_weight") or not hasattr(module, "base_layer"):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            if getattr(module, "use_dora", {}).get(adapter):
                raise ConfigError("syncing a DoRA adapter into vLLM is not supported; use generation.sampler: hf.")
            key = f"{module_name}.base_layer.weight"
            deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter)
    prefix = getattr(peft_model, "prefix", "lora_")
    out = []
    for name, param in peft_model.named_parameters():
        if prefix in name or "original_module" in name:
            continue
        weight = param.data + deltas[name].to(param.dtype) if name in deltas else param.data
        clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
        out.append((clean.replace("modules_to_save.default.", ""), weight))
    return out


class VLLMSampler:
    """Rollouts with vLLM, one instance colocated on each training process (needs ``alignkit[vllm]``).

    Each process builds ``vllm.LLM(..., distributed_executor_backend="external_launcher")`` in-process,
    so the policy's weights can be written straight into vLLM's model: :meth:`sync_weights` runs at the
    start of every :meth:`generate`. With ``vllm_tensor_parallel_size > 1`` consecutive processes form one
    vLLM instance and share their prompts. vLLM schedules its own batches (``batch_size`` is
    not used); it stops at the same eos ids as the HF sampler and samples with the same
    temperature/top-p/top-k. Written against vLLM's in-process ("colocate") API
    (``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights``), as TRL uses it;
    not exercised by alignkit's CPU test suite beyond a stand-in module.
    """

    def __init__(self, model_name_or_path: str, tokenizer, config: SamplingConfig, *, dtype: str = "auto",
                 seed: int = 0):
        try:
            import vllm
        except ImportError as e:
            raise ConfigError("generation.sampler=vllm needs vLLM, which is not installed: "
                              "pip install alignkit[vllm] (or set generation.sampler: hf).") from e
        config.check()
        self.tokenizer, self.config = tokenizer, config
        self._vllm = vllm
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        tp = config.vllm_tensor_parallel_size
        if world % tp:
            raise ConfigError(f"vllm_tensor_parallel_size={tp} must divide the number of processes ({world}).")
        if world == 1:  # external_launcher reads the torch.distributed rendezvous variables
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        self.tp_group = None
        if tp > 1:
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(s, s + tp)) for s in range(0, world, tp)])
        path = assets.resolve_model(model_name_or_path) or model_name_or_path
        self.llm = vllm.LLM(model=str(path), tensor_parallel_size=tp, dtype=dtype,
                            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                            max_model_len=config.vllm_max_model_len, seed=seed + rank // tp,
                            distributed_executor_backend="external_launcher")

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM's model and drop its prefix cache (stale KV).

        ZeRO-3: a plain model is gathered one parameter at a time, a LoRA model whole. A LoRA adapter is
        folded into the copies only (``W + get_delta_weight``): merging into the model and unmerging
        after would add rounding error to the frozen base weights at every rollout.
        """
        inner = unwrap_model(model)
        vllm_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        if hasattr(inner, "peft_config"):
            with gathered_parameters(model):
                vllm_model.load_weights(merged_lora_weights(inner))
        else:
            for name, param in inner.named_parameters():
                with gathered([param]):
                    vllm_model.load_weights([(name, param.data)])
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, seed: int | None = None) -> Rollout:
        """Sync the weights of ``model`` into vLLM, then sample ``num_samples`` responses per prompt."""
        prompts = check_prompts(prompts)
        self.sync_weights(model)
        c = self.config
        inner = unwrap_model(model)
        eos_ids = eos_token_ids(self.tokenizer, inner)
        params = self._vllm.SamplingParams(
            n=c.num_samples, max_tokens=c.max_new_tokens, stop_token_ids=eos_ids, seed=seed,
            temperature=0.0 if c.greedy else c.temperature, top_p=1.0 if c.greedy else c.top_p,
            top_k=-1 if c.greedy or c.top_k == 0 else c.top_k)
        mine = prompts
        if self.tp_group is not None:  # every member of a TP group generates the group's prompts
            everyone: list = [None] * c.vllm_tensor_parallel_size
            torch.distributed.all_gather_object(everyone, prompts, group=self.tp_group)
            mine = [p for group in everyone for p in group]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in mine], sampling_params=params, use_tqdm=False)
        responses = [list(o.token_ids) for out in outputs for o in out.outputs]
        if self.tp_group is not None:  # keep this process's share
            rank = torch.distributed.get_rank(group=self.tp_group)
            start = sum(len(group) for group in everyone[:rank]) * c.num_samples
            responses = responses[start:start + len(prompts) * c.num_samples]
        prompt_index = torch.arange(len(prompts)).repeat_interleave(c.num_samples)
        expanded = [prompts[i] for i in prompt_index.tolist()]
        return build_rollout(expanded, responses, prompt_index, eos_ids, pad_token_id(self.tokenizer, eos_ids),
                             self.tokenizer, model_device(inner))
