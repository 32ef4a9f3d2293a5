"""The Accelerator of a run (plain, DDP on gloo/NCCL, DeepSpeed ZeRO-1/2/3, PyTorch FSDP2), placement of
frozen models, and the few collectives the loops need (sums and "any process" flags over all processes)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from alignkit.config import TrainingConfig
from alignkit.errors import TrainingError


def resolve_mixed_precision(name: str) -> str:
    if name != "auto":
        if name == "fp16" and not torch.cuda.is_available():
            raise TrainingError("training.mixed_precision=fp16 needs a CUDA GPU; on CPU use bf16 or no.")
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def deepspeed_config(t: TrainingConfig, mixed_precision: str) -> dict:
    """A DeepSpeed config from the training section (or the user's JSON file)."""
    if t.deepspeed not in ("zero1", "zero2", "zero3"):
        return json.loads(Path(t.deepspeed).read_text())
    stage = int(t.deepspeed[-1])
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # gather the 16-bit weights on save so the checkpoint is a normal HF folder
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if t.zero_offload and stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16", "initial_scale_power": 16},
        # we hand DeepSpeed a torch AdamW; allow it with CPU offload too (no JIT-compiled CPU Adam needed)
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def fsdp_plugin(t: TrainingConfig):
    """accelerate's FSDP2 plugin for ``training.fsdp``: every decoder layer its own shard group (the classes of
    the model's ``_no_split_modules``, set when the model is prepared), full state dicts for the HF folder."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    offload = None
    if t.fsdp_cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=t.fsdp == "full_shard", auto_wrap_policy="transformer_based_wrap",
        cpu_offload=offload or False, state_dict_type="FULL_STATE_DICT", activation_checkpointing=False)


def setup_accelerator(t: TrainingConfig):
    """Create the Accelerator for this process: plain, DDP (gloo on CPU), DeepSpeed or FSDP2."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, set_seed

    mixed_precision = resolve_mixed_precision(t.mixed_precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (t.deepspeed or t.fsdp) and "RANK" not in os.environ:
        # DeepSpeed and FSDP need a process group even for one process: make this process a group of one
        from alignkit.launch import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        if not torch.cuda.is_available():
            PartialState(cpu=True, backend="gloo")
    cpu_multi = world > 1 and not torch.cuda.is_available()
    if cpu_multi:
        # CPU processes: without cpu=True accelerate reports DistributedType.NO and nothing is synced;
        # gloo must be chosen before DeepSpeed initialises its own backend
        PartialState(cpu=True, backend="gloo")
    plugin = None
    if t.deepspeed:
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's own collectives call torch's deprecated names on every step; the warning is DeepSpeed's
        # to fix and would print inside the progress bar
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger",
                                message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`")
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:
            raise TrainingError("training.deepspeed is set but DeepSpeed is not installed: pip install alignkit[deepspeed]") from e
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(t, mixed_precision))
        plugin.set_mixed_precision(mixed_precision)
    fsdp = fsdp_plugin(t) if t.fsdp else None
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
        fsdp_plugin=fsdp,
        cpu=cpu_multi and plugin is None,
    )
    if fsdp is not None and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate turns FSDP on only for GPU-like devices; torch's FSDP2 itself runs on CPU with gloo, so
        # set what accelerate would have set (its FSDP2 prepare, clipping and state-dict paths then apply)
        if mixed_precision != "no":
            fsdp.set_mixed_precision(mixed_precision)
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = fsdp
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what a later state copies
    if world > 1 and accelerator.num_processes > 1 and accelerator.distributed_type.value == "NO":
        raise TrainingError("accelerate did not initialise distributed training across "
                            f"{world} processes; check the launcher environment (WORLD_SIZE, MASTER_ADDR).")
    set_seed(t.seed)
    return accelerator


def is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def is_fsdp2(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def plan_fsdp2(accelerator, model: torch.nn.Module) -> None:
    """Before an FSDP2 model is prepared: shard each decoder layer on its own, also when the model is wrapped
    (LoRA, PPO's policy-and-critic module), whose wrapper does not name its layer classes itself."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.transformer_cls_names_to_wrap is not None:
        return
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    present = {type(m).__name__ for m in model.modules()}
    plugin.transformer_cls_names_to_wrap = sorted(names & present)


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def autocast(accelerator=None) -> contextlib.AbstractContextManager:
    """The accelerator's mixed-precision autocast context, or a no-op without an accelerator."""
    return accelerator.autocast() if accelerator is not None else contextlib.nullcontext()


def prepare_frozen(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Place a frozen model (reference, teacher, reward) for inference on this process.

    Under ZeRO-3 it is partitioned like the policy (its own DeepSpeed engine, no optimizer);
    otherwise (FSDP2 included: a whole copy on each process) it is simply moved to the device.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if zero_stage(accelerator) == 3:
        import deepspeed

        cfg = dict(accelerator.state.deepspeed_plugin.deepspeed_config)
        cfg = {k: v for k, v in cfg.items() if k not in ("optimizer", "scheduler")}
        cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 1e4}
        cfg["train_micro_batch_size_per_gpu"] = cfg.get("train_micro_batch_size_per_gpu", 1)
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        engine.eval()
        return engine
    return model.to(accelerator.device)


def reduce_sum(accelerator, values: list[float]) -> list[float]:
    """``values`` summed over every process (one all-reduce, float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def global_counts(accelerator, *local: float | torch.Tensor) -> list[float]:
    """Counts summed over processes (one all-reduce), each at least 1 (they are denominators)."""
    return [max(x, 1.0) for x in reduce_sum(accelerator, [float(x) for x in local])]
