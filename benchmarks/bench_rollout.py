"""Rollout throughput: the hf sampler (model.generate on the policy; with and without its shared prompt prefill)
vs the vllm sampler (vLLM in-process).

Same model (SmolLM2-135M-Instruct, fp32), same chat prompts, samples per prompt, response length and seeds;
both stop at EOS, so tokens/s counts the response tokens each produced. The vllm sampler's weight sync
(which precedes every rollout in training) is timed on its own and included in "rollout tok/s".
Needs vLLM (``.venv-vllm``, see ``make test-vllm``); run on a quiet machine:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=2 .venv-vllm/bin/python benchmarks/bench_rollout.py \\
        --prompts 16 --samples 4 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM in this process, before it is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import write_section  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name three colors.", "Write a haiku about the sea.", "What is 12 times 7?",
    "Tell me a fun fact about cats.", "How do plants make food?", "Give me a synonym for happy.",
    "What does a thermometer measure?", "Describe a rainy day.", "Why is the sky blue?",
    "List two fruits that are red.", "What is the opposite of cold?", "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?", "Say hello in Spanish.", "What is the boiling point of water?",
]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for q in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def timed_rollouts(sampler, policy, prompts, repeats: int) -> dict:
    """Median seconds and tokens of ``repeats`` rollouts (after one warm-up), seeds 1..repeats."""
    sampler.generate(policy, prompts[:2], seed=0)
    seconds, tokens = [], []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        rollout = sampler.generate(policy, prompts, seed=seed)
        seconds.append(time.perf_counter() - start)
        tokens.append(int(rollout.response_mask.sum()))
    return {"s": statistics.median(seconds), "tokens": statistics.median(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()

    import torch
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.assets import fetch
    from alignkit.rollout import SamplingConfig, build_sampler

    model_dir = fetch("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = chat_prompts(tokenizer, args.prompts)
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, num_samples=args.samples, temperature=1.0)

    apart = timed_rollouts(build_sampler(dataclasses.replace(config, share_prefill=False), tokenizer), policy,
                           prompts, args.repeats)
    print(f"hf, prefill per row  {apart['tokens'] / apart['s']:8.1f} tok/s ({apart['tokens']} tokens in "
          f"{apart['s']:.2f} s)", flush=True)
    hf = timed_rollouts(build_sampler(config, tokenizer), policy, prompts, args.repeats)
    print(f"hf, shared prefill   {hf['tokens'] / hf['s']:8.1f} tok/s ({hf['tokens']} tokens in {hf['s']:.2f} s)",
          flush=True)

    start = time.perf_counter()
    sampler = build_sampler(dataclasses.replace(config, sampler="vllm"), tokenizer,
                            model_name_or_path=str(model_dir), dtype="float32", seed=0)
    startup = time.perf_counter() - start
    syncs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sampler.sync_weights(policy)
        syncs.append(time.perf_counter() - start)
    sync = statistics.median(syncs)
    policy.requires_grad_(False)  # a frozen policy is synced once: the rollouts below time generation alone
    ours = timed_rollouts(sampler, policy, prompts, args.repeats)
    sampler.close()
    print(f"vllm  {ours['tokens'] / ours['s']:8.1f} tok/s ({ours['tokens']} tokens in {ours['s']:.2f} s), "
          f"sync {sync:.2f} s, start-up {startup:.1f} s", flush=True)

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    rows = [("hf, one prefill per row (`share_prefill: false`; before)", apart, 0.0),
            ("hf, one prefill per prompt (default)", hf, 0.0), (f"vllm {vllm.__version__}", ours, sync)]
    lines = [f"### Rollouts: hf vs vllm sampler ({time.strftime('%Y-%m-%d')}, {device}, OMP_NUM_THREADS={threads}, "
             f"torch {torch.__version__}, Python {platform.python_version()})", "",
             f"SmolLM2-135M-Instruct in fp32, {args.prompts} chat prompts x {args.samples} samples, up to "
             f"{args.max_new_tokens} new tokens (temperature 1, stop at EOS), median of {args.repeats} rollouts "
             f"after a warm-up. vLLM start-up: {startup:.1f} s, once per run. Rollout = weight sync + generation "
             "(the vllm sampler syncs before every rollout in training). \"vs hf\" compares with the hf "
             "sampler's default.", "",
             "| sampler | response tokens | generation s | generation tok/s | sync s | rollout tok/s | vs hf |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    hf_rate = hf["tokens"] / hf["s"]
    for name, r, sync_s in rows:
        rollout_rate = r["tokens"] / (r["s"] + sync_s)
        lines.append(f"| {name} | {r['tokens']} | {r['s']:.2f} | {r['tokens'] / r['s']:.1f} | {sync_s:.2f} | "
                     f"{rollout_rate:.1f} | {rollout_rate / hf_rate:.2f}x |")
    section = "\n".join(lines) + "\n"
    print("\n" + section)
    command = (f"VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS={threads} .venv-vllm/bin/python "
               f"benchmarks/bench_rollout.py --prompts {args.prompts} --samples {args.samples} "
               f"--max-new-tokens {args.max_new_tokens} --repeats {args.repeats}")
    write_section(args.out, "rollout", command, section)


if __name__ == "__main__":
    main()
