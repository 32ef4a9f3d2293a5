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
    (default: this machine's GPU; with ``device="cpu"``, its memory shared by the processes), as
    :func:`~alignkit.estimate.memory.estimate_memory`. ``suggest`` adds ranked config changes, each
    re-estimated, and, when the run does not fit, a combination of them that fits (or the closest one)."""
    if gpu_memory_gb is None:
        if device == "cpu":
            processes = gpus or cfg.training.num_processes
            gpu_memory_gb = _local_cpu_memory() / max(1, processes)
        else:
            gpu_memory_gb = _local_gpu_memory()
    result = estimate_memory(cfg, gpus, gpu_memory_gb, device=device, model_config=model_config)
    if suggest:
        result.suggestions = suggestions(cfg, result, model_config=model_config)
        if not result.fits:
            result.plan = fitting_plan(cfg, result, model_config=model_config)
    return result


def _local_gpu_memory() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    raise EstimateError("give the memory of one GPU, e.g. --gpu-memory 40GB (there is no GPU here to read it from; "
                        "--device cpu models a CPU run in this machine's memory).")


def _local_cpu_memory() -> float:
    """This machine's memory in GiB (what a ``--device cpu`` run's processes share)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):  # not POSIX
        raise EstimateError("give the memory a CPU run may use, e.g. --gpu-memory 64GB (this system does not "
                            "say how much it has).") from None


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
    if t.fsdp:  # FSDP2's own ways down; a DeepSpeed suggestion would conflict with it
        if t.fsdp != "full_shard":
            out.append(["training.fsdp=full_shard"])
        if not t.fsdp_cpu_offload:
            out.append(["training.fsdp_cpu_offload=true"])
    elif not t.deepspeed or stage:
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


def _changed(cfg: RunConfig, change: list[str]) -> RunConfig:
    """``cfg`` with ``--set`` overrides applied through :func:`alignkit.config.build_config` (and validated)."""
    from alignkit.config import build_config as build
    from alignkit.methods import config_class

    raw = cfg.to_dict()
    raw.pop("method")
    # a deep copy: build_config's overrides write into the nested sections of the dict they get
    return build(cfg.method, config_class(cfg.method), copy.deepcopy(raw), change)


def _options(cfg: RunConfig, base: Estimate, model_config: str | None) -> list[tuple[list[str], RunConfig, Estimate]]:
    """(change, changed config, its estimate) for every candidate change that lowers ``base``'s peak."""
    out = []
    for change in candidate_changes(cfg, base.gpus, base.device):
        try:
            changed = _changed(cfg, change)
            new = estimate_memory(changed, base.gpus, base.gpu_memory_gb, device=base.device,
                                  model_config=model_config)
        except AlignkitError:
            continue  # the change is not valid for this run (e.g. a batch that no longer divides the rollout)
        if base.per_gpu_peak_gb - new.per_gpu_peak_gb > 0.005:
            out.append((change, changed, new))
    return out


def _key(change: list[str]) -> str:
    return change[0].split("=")[0].split(".")[-1]


def suggestions(cfg: RunConfig, base: Estimate, *, model_config: str | None = None) -> list[dict[str, Any]]:
    """Every candidate change that lowers the peak, re-estimated with the change applied through
    :func:`alignkit.config.build_config`, ranked by the memory it saves."""
    found = []
    for change, _, new in _options(cfg, base, model_config):
        saves = base.per_gpu_peak_gb - new.per_gpu_peak_gb
        found.append({"set": change, "saves_gb": round(saves, 3), "peak_gb": round(new.per_gpu_peak_gb, 3),
                      "fits": new.fits, "note": _NOTES.get(_key(change), "")})
    return sorted(found, key=lambda x: -x["saves_gb"])


def fitting_plan(cfg: RunConfig, base: Estimate, *, model_config: str | None = None,
                 max_changes: int = 12) -> dict[str, Any] | None:
    """A combination of the suggestions that makes the run fit, or, when none does, the one that comes closest.

    Each round re-estimates every candidate change on the run as changed so far and applies the cheapest one
    that makes it fit (the order of :data:`_NOTES`: changes that only cost speed before those that change what
    is trained), else the one that saves the most; once it fits, every change the fit does not need is
    dropped again, the costliest first. Returns ``{"set": [--set items], "peak_gb", "fits", "gpus_needed"}``
    (``gpus_needed``: when nothing fits on GPUs, the fewest GPUs of this size the closest combination fits on,
    if up to 64 do), or None when no change lowers the peak.
    """
    current, est, applied = cfg, base, []
    while len(applied) < max_changes and not est.fits:
        options = _options(current, est, model_config)
        if not options:
            break
        fitting = [o for o in options if o[2].fits]
        change, current, est = (min(fitting, key=lambda o: _cost(o[0])) if fitting
                                else min(options, key=lambda o: o[2].per_gpu_peak_gb))
        applied.append(change)
    if not applied:
        return None
    if est.fits:
        for change in sorted(applied, key=_cost, reverse=True):
            rest = [c for c in applied if c is not change]
            try:
                new = estimate_memory(_changed(cfg, _flat(rest)), base.gpus, base.gpu_memory_gb,
                                      device=base.device, model_config=model_config)
            except AlignkitError:
                continue
            if new.fits:
                applied, est = rest, new
    plan = {"set": _flat(applied), "peak_gb": round(est.per_gpu_peak_gb, 3), "fits": est.fits, "gpus_needed": None}
    if not est.fits and base.device == "cuda":
        changed = _changed(cfg, plan["set"])
        for gpus in (2, 4, 8, 16, 32, 64):
            if gpus > base.gpus and estimate_memory(changed, gpus, base.gpu_memory_gb, device=base.device,
                                                    model_config=model_config).fits:
                plan["gpus_needed"] = gpus
                break
    return plan


def _cost(change: list[str]) -> int:
    """The rank in :data:`_NOTES` of the costliest item of ``change`` (ZeRO-3 with offload costs as offload)."""
    keys = [item.split("=")[0].split(".")[-1] for item in change]
    return max(list(_NOTES).index(k) for k in keys if k in _NOTES)


def _flat(changes: list[list[str]]) -> list[str]:
    """The ``--set`` items of several changes, a key set twice (a batch halved twice) once with its last value."""
    last = {item.split("=", 1)[0]: item for change in changes for item in change}
    return list(last.values())


# what each change does; their order is the plan's preference: changes that only cost speed first, then those
# that change what is trained or seen
_NOTES = {
    "gradient_checkpointing": "recomputes activations in backward (~30% slower)",
    "per_device_batch_size": "same global batch, more accumulation steps",
    "batch_size": "generates the rollout in smaller chunks",
    "vllm_sleep_mode": "frees vLLM's weights and KV cache while the policy trains",
    "deepspeed": "partitions optimizer state (ZeRO-1), gradients (ZeRO-2) and weights (ZeRO-3) over the GPUs",
    "precompute_ref_logps": "scores the data with the reference once, then frees it",
    "vllm_gpu_memory_utilization": "a smaller vLLM KV cache (fewer sequences in flight)",
    "zero_offload": "keeps optimizer state (and ZeRO-3 weights) in CPU memory; slower steps",
    "zero3_gather": "generates with per-layer gathers (slow) instead of gathering the whole policy",
    "finetune": "trains adapters instead of all weights",
    "max_new_tokens": "shorter responses",
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
    parser.add_argument("--gpu-memory", help="memory of one GPU, e.g. 40GB (default: this machine's GPU; with "
                                             "--device cpu, this machine's memory shared by the processes)")
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

    # argparse takes "-5GB" after --gpu-memory for an option of its own ("expected one argument"): hand it to
    # --gpu-memory, whose check says what is wrong with it
    argv = list(argv)
    for i in range(len(argv) - 2, -1, -1):
        if argv[i] == "--gpu-memory" and re.match(r"-[0-9.]", argv[i + 1]):
            argv[i:i + 2] = [f"--gpu-memory={argv[i + 1]}"]
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


