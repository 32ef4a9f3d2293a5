"""``alignkit estimate`` the command: the estimate with the config changes that would make a run fit (each
re-estimated), and the command line."""

from __future__ import annotations

import argparse
import copy
import json
import re
from typing import Any

from alignkit.config import RunConfig
from alignkit.errors import AlignkitError
from alignkit.estimate.architecture import PRESETS, EstimateError
from alignkit.estimate.memory import GIB, ONLINE, Estimate, estimate_memory, setup_of, vllm_sleeps


def estimate(cfg: RunConfig, gpus: int | None = None, gpu_memory_gb: float | None = None, *, device: str = "cuda",
             model_config: str | None = None, suggest: bool = True) -> Estimate:
    """Per-GPU memory of ``cfg`` on ``gpus`` GPUs (default: ``training.num_processes``) of ``gpu_memory_gb`` GiB
    (default: this machine's GPU), as :func:`~alignkit.estimate.memory.estimate_memory`; ``suggest`` adds ranked
    config changes, each re-estimated."""
    if gpu_memory_gb is None:
        gpu_memory_gb = _local_gpu_memory()
    result = estimate_memory(cfg, gpus, gpu_memory_gb, device=device, model_config=model_config)
    if suggest:
        result.suggestions = suggestions(cfg, result, model_config=model_config)
    return result


def _local_gpu_memory() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    raise EstimateError("give the memory of one GPU, e.g. --gpu-memory 40GB (there is no GPU here to read it from).")


def candidate_changes(cfg: RunConfig, gpus: int, device: str) -> list[list[str]]:
    """Config changes that can lower the peak, as ``--set`` overrides (one or two that belong together)."""
    m, t, args = cfg.model, cfg.training, cfg.method_args
    out: list[list[str]] = []
    if not m.gradient_checkpointing:
        out.append(["model.gradient_checkpointing=true"])
    if m.finetune == "full":
        out.append(["model.finetune=lora"])
    if m.finetune != "qlora" and device == "cuda":
        out.append(["model.finetune=qlora"])
    stage = int(t.deepspeed[-1]) if t.deepspeed in ("zero1", "zero2", "zero3") else 0
    if not t.deepspeed or stage:
        for higher in range(max(stage + 1, 2 if gpus > 1 else 3), 4):
            out.append([f"training.deepspeed=zero{higher}"])
        if stage >= 2 and not t.zero_offload:
            out.append(["training.zero_offload=true"])
        if stage < 2:
            out.append(["training.deepspeed=zero3", "training.zero_offload=true"])
    if t.per_device_batch_size > 1:
        half = t.per_device_batch_size // 2
        accumulation = t.gradient_accumulation_steps * t.per_device_batch_size // half
        out.append([f"training.per_device_batch_size={half}", f"training.gradient_accumulation_steps={accumulation}"])
    if cfg.method in ONLINE or cfg.method in ("seqkd", "rejection_sampling", "gkd"):
        g = args.generation
        sequences = (getattr(args, "rollout_batch_size", 0) or getattr(args, "sampling_batch_size", 0) or
                     t.per_device_batch_size) * g.num_samples
        current = g.batch_size or sequences
        if g.sampler == "hf" and current > 1:
            out.append([f"{cfg.method}.generation.batch_size={max(1, current // 2)}"])
        if g.sampler == "vllm" and not vllm_sleeps(g, setup_of(cfg, gpus, device)) and device == "cuda":
            out.append([f"{cfg.method}.generation.vllm_sleep_mode=true"])
        if g.sampler == "vllm" and not g.vllm_kv_cache_gb and g.vllm_gpu_memory_utilization > 0.1:
            out.append([f"{cfg.method}.generation.vllm_gpu_memory_utilization="
                        f"{round(g.vllm_gpu_memory_utilization / 2, 2)}"])
        if stage == 3 and g.zero3_gather and g.sampler == "hf":
            out.append([f"{cfg.method}.generation.zero3_gather=false"])
        if g.max_new_tokens > 16:
            out.append([f"{cfg.method}.generation.max_new_tokens={g.max_new_tokens // 2}"])
    if cfg.method == "dpo" and m.finetune == "full" and args.precompute_ref_logps is not True:
        out.append(["dpo.precompute_ref_logps=true"])
    if cfg.data.max_length > 64:
        out.append([f"data.max_length={cfg.data.max_length // 2}"])
    return out


def suggestions(cfg: RunConfig, base: Estimate, *, model_config: str | None = None) -> list[dict[str, Any]]:
    """Every candidate change that lowers the peak, re-estimated with the change applied through
    :func:`alignkit.config.build_config`, ranked by the memory it saves."""
    from alignkit.config import build_config as build
    from alignkit.methods import config_class

    raw = cfg.to_dict()
    raw.pop("method")
    found = []
    for change in candidate_changes(cfg, base.gpus, base.device):
        try:
            # a deep copy: build_config's overrides write into the nested sections of the dict they get
            changed = build(cfg.method, config_class(cfg.method), copy.deepcopy(raw), change)
            new = estimate_memory(changed, base.gpus, base.gpu_memory_gb, device=base.device,
                                  model_config=model_config)
        except AlignkitError:
            continue  # the change is not valid for this run (e.g. a batch that no longer divides the rollout)
        saves = base.per_gpu_peak_gb - new.per_gpu_peak_gb
        if saves > 0.005:
            found.append({"set": change, "saves_gb": round(saves, 3), "peak_gb": round(new.per_gpu_peak_gb, 3),
                          "fits": new.fits, "note": _NOTES.get(change[0].split("=")[0].split(".")[-1], "")})
    return sorted(found, key=lambda x: -x["saves_gb"])


_NOTES = {
    "gradient_checkpointing": "recomputes activations in backward (~30% slower)",
    "finetune": "trains adapters instead of all weights",
    "deepspeed": "partitions optimizer state (ZeRO-1), gradients (ZeRO-2) and weights (ZeRO-3) over the GPUs",
    "zero_offload": "keeps optimizer state (and ZeRO-3 weights) in CPU memory; slower steps",
    "per_device_batch_size": "same global batch, more accumulation steps",
    "batch_size": "generates the rollout in smaller chunks",
    "vllm_gpu_memory_utilization": "a smaller vLLM KV cache (fewer sequences in flight)",
    "vllm_sleep_mode": "frees vLLM's weights and KV cache while the policy trains",
    "zero3_gather": "generates with per-layer gathers (slow) instead of gathering the whole policy",
    "max_new_tokens": "shorter responses",
    "precompute_ref_logps": "scores the data with the reference once, then frees it",
    "max_length": "truncates longer rows",
}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_gib(value: str) -> float:
    """``40GB``, ``40G``, ``40GiB``, ``40960MiB``, ``40`` (GiB) -> GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    units = {"": 1, "g": 1, "gb": 1, "gib": 1, "m": 1 / 1024, "mb": 1 / 1024, "mib": 1 / 1024, "t": 1024, "tb": 1024,
             "tib": 1024}
    if not match or match.group(2).lower() not in units or float(match.group(1)) <= 0:
        raise EstimateError(f"--gpu-memory {value!r}: give the memory of one GPU, e.g. 40GB, 80GB or 24576MiB.")
    return float(match.group(1)) * units[match.group(2).lower()]


def build_parser() -> argparse.ArgumentParser:
    from alignkit.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="alignkit estimate",
        description="Estimate the per-GPU memory of a run from its config (no weights are loaded) and suggest "
                    "changes that make it fit. Sizes are GiB.")
    parser.add_argument("method", metavar="METHOD", help=f"one of: {', '.join(METHODS)}")
    parser.add_argument("config", nargs="?", help="YAML config file (optional, as for alignkit train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable), as for alignkit train")
    parser.add_argument("--gpus", type=int, help="GPUs = training processes (default: training.num_processes)")
    parser.add_argument("--gpu-memory", help="memory of one GPU, e.g. 40GB (default: this machine's GPU)")
    parser.add_argument("--deepspeed", help="zero1, zero2, zero3 or a DeepSpeed JSON file")
    parser.add_argument("--model-config", help="the policy's config.json (a file, a folder or a preset: "
                                               f"{', '.join(PRESETS)}) instead of model.name_or_path's")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default) or cpu: model a CPU run (fp32, no autocast), as the measurements do")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-suggestions", action="store_true", help="skip the re-estimated suggestions")
    return parser


def estimate_main(argv: list[str]) -> int:
    """``alignkit estimate ...`` (argv: the words after ``estimate``); expected errors raise AlignkitError."""
    from alignkit.api import load_config

    args = build_parser().parse_args(argv)
    gpu_memory = parse_gib(args.gpu_memory) if args.gpu_memory else None
    overrides = list(args.overrides)
    if args.deepspeed:
        overrides.append(f"training.deepspeed={args.deepspeed}")
    if args.gpus is not None:
        if args.gpus < 1:
            raise EstimateError(f"--gpus {args.gpus}: give at least 1.")
        overrides.append(f"training.num_processes={args.gpus}")
    cfg = load_config(args.method, args.config, overrides)
    result = estimate(cfg, args.gpus, gpu_memory, device=args.device, model_config=args.model_config,
                      suggest=not args.no_suggestions)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.table())
    return 0


