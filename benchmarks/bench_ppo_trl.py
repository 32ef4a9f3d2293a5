"""PPO throughput and peak memory: alignkit's PPO vs TRL's PPOTrainer (TRL 0.24.0, in its own virtualenv).

TRL has no PPOTrainer any more: ``trl.PPOTrainer`` exists up to 0.25.x, ``trl.experimental.ppo`` up to 1.12.0,
none from 1.13.0. So TRL runs in ``.venv-trl-ppo``, which this script builds on first use (torch 2.13.0
first, then ``TRL_PINS``; a few minutes). 0.24.0 is the newest release inside LLaMA-Factory 0.9.5's pin
(``trl>=0.18.0,<=0.24.0``; every release in it ships the top-level PPOTrainer) and needs transformers 4.x
(4.57.6 here; the main venv has 5.x). LLaMA-Factory's own PPO code still wants the old ``trl<=0.9.6`` API,
whose policy and value share one backbone, so it could not get the same separate critic as alignkit.

Both sides get the same work per step (details in ``WORK`` below, written into docs/benchmarks.md):

- the same policy (SmolLM2-135M-Instruct), reference (a frozen copy), reward model and critic init (one
  sequence classifier: the policy's backbone + a seeded random one-output head, sharing the tokenizer),
  fp32 on CPU, no gradient checkpointing, dropout off;
- the same prompts (openings of real movie reviews, all of one token length, so no padding) and
  exactly ``--max-new-tokens`` response tokens: the models' folder makes ``<empty_output>``, a token neither
  side samples in practice, the eos and pad token (TRL generates without a stop token anyway); the folders
  also spell the rope theta the 4.x way, so both transformers versions compute the same outputs;
- ``--prompts`` sequences per rollout; generation and every no-grad forward in batches of one minibatch;
  ``--ppo-epochs`` x ``--minibatches`` AdamW updates per rollout (clipped policy loss + 0.1 x clipped value
  loss); KL penalty k1 x 0.05 in the reward, GAE(1, 0.95), advantages whitened; no gradient clipping.

Each run is its own subprocess (peak memory = its max RSS at the end of its last step, before alignkit
writes its final model). Throughput counts the steps after ``--warmup``. The defaults are the measurement:

    python benchmarks/bench_ppo_trl.py --steps 6 --warmup 2 --prompts 16 --minibatches 2 --ppo-epochs 2 \\
        --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))  # the examples package (the sentiment task)

from common import peak_mb, write_section  # noqa: E402

TRL_VENV = ROOT / ".venv-trl-ppo"
TORCH_PIN = "torch==2.13.0"
TRL_PINS = [TORCH_PIN, "trl==0.24.0", "transformers==4.57.6", "accelerate==1.15.0", "datasets==5.0.1"]
NEVER_SAMPLED = "<empty_output>"  # the eos and pad token of the benchmark's model folders
KL_COEF, LEARNING_RATE, SEED = 0.05, 1e-6, 0
CLIP, VALUE_CLIP, VF_COEF, GAMMA, LAM = 0.2, 0.2, 0.1, 1.0, 0.95

WORK = """| per step (N sequences, M = N / minibatches) | alignkit PPO | TRL PPOTrainer |
| --- | --- | --- |
| generation | N x R tokens, `model.generate` with KV cache, batches of M | the same |
| old-policy log-probs | from the sampler's scores (fp32, full softmax: no forward) | from the generation logits (no forward) |
| values | a no-grad critic forward, batches of M | a separate no-grad value-model forward, batches of M |
| reference log-probs | no-grad forward, batches of M | the same |
| reward | reward-model forward, batches of M | the same |
| KL penalty, GAE, whitening | k1 x 0.05 per token in the reward; GAE(1, 0.95); whitened advantages | the same |
| updates | epochs x minibatches AdamW updates, each a forward + backward of policy and critic on M rows | the same |
| LM head | on the response positions only, chunked | on every position (`[M, P+R, V]` logits), all hidden states kept |
| optimizer | torch AdamW, no gradient clipping (`max_grad_norm: 0`) | torch AdamW (`optim: adamw_torch`), never clips |
| logging extras | entropy of the response tokens | entropy from full softmax; `gc.collect()` twice per step |"""


# --------------------------------------------------------------------------------------------------
# TRL's virtualenv
# --------------------------------------------------------------------------------------------------


def trl_python(venv: Path) -> Path:
    """The venv's python with the pinned TRL, built (or completed) when missing; build time is printed."""
    python = venv / "bin" / "python"
    pins = {p.split("==")[0]: p.split("==")[1] for p in TRL_PINS}
    check = ("import importlib.metadata as m, sys; pins = " + repr(pins) +
             "; bad = [k for k, v in pins.items() if not m.version(k).startswith(v)]; sys.exit(1 if bad else 0)")
    if python.exists() and subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0:
        return python
    start = time.perf_counter()
    print(f"building {venv} ({' '.join(TRL_PINS)}); several minutes", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for cmd in (pip + [TORCH_PIN], pip + TRL_PINS):  # torch first, so nothing after it resolves another torch
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"building {venv} failed: {' '.join(cmd[1:])}")
    print(f"built {venv} in {time.perf_counter() - start:.0f} s", flush=True)
    return python


# --------------------------------------------------------------------------------------------------
# Shared inputs, made once in the main venv: model folders and prompts
# --------------------------------------------------------------------------------------------------


def make_policy_folder(src: Path, dst: Path) -> None:
    """The policy with ``NEVER_SAMPLED`` as its eos and pad token, and a tokenizer class that both
    transformers 4.x and 5.x load (the asset says ``TokenizersBackend``, a 5.x name)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("tokenizer_config.json", "config.json", "generation_config.json"):
            (dst / f.name).symlink_to(f)
    added = json.loads((src / "tokenizer.json").read_text())["added_tokens"]
    token_id = next(t["id"] for t in added if t["content"] == NEVER_SAMPLED)
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok.pop("backend", None)
    tok.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=NEVER_SAMPLED, pad_token=NEVER_SAMPLED)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((src / name).read_text())
        cfg.update(eos_token_id=token_id, pad_token_id=token_id)
        (dst / name).write_text(json.dumps(cfg, indent=2))
    readable_by_transformers_4(dst / "config.json")


def readable_by_transformers_4(config: Path) -> None:
    """Add the 4.x ``rope_theta`` next to 5.x's ``rope_parameters``: 4.x ignores the latter and would
    silently use its default theta (10,000 instead of SmolLM2's 100,000), a different model."""
    cfg = json.loads(config.read_text())
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"{config}: rope_type {rope['rope_type']!r} has no transformers 4.x spelling here.")
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    config.write_text(json.dumps(cfg, indent=2))


def make_reward_folder(policy: Path, dst: Path) -> None:
    """Reward model and critic init of both sides: the policy's backbone and a seeded random score head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    torch.nn.init.normal_(model.score.weight, std=model.config.initializer_range)
    model.save_pretrained(dst)
    readable_by_transformers_4(dst / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (dst / name).write_text((policy / name).read_text())


def make_prompts(args, work: Path) -> int:
    """``--prompts x (steps + warmup)`` review openings of one token length (the most common one), as
    alignkit's prompt rows and as TRL's ``input_ids`` rows (the ids alignkit's data layer makes). Returns
    the prompt length."""
    from alignkit.config import DataConfig, DataSource, ModelConfig
    from alignkit.data import build_datasets
    from alignkit.models import load_tokenizer
    from examples.sentiment.task import load_reviews, prompts, split_reviews, write_jsonl

    need = args.prompts * (args.steps + args.warmup)
    train, _ = split_reviews(load_reviews())
    candidates = write_jsonl(prompts(train, min(len(train) // 2, 20 * need)), work / "candidates.jsonl")
    tok = load_tokenizer(ModelConfig(name_or_path=str(work / "policy")))
    rows = build_datasets(DataConfig(train=[DataSource(path=str(candidates))], max_length=4096), tok, "prompt").train
    length, count = Counter(len(r["prompt_ids"]) for r in rows).most_common(1)[0]
    if count < need:
        raise SystemExit(f"only {count} prompts of {length} tokens; lower --steps or --prompts (need {need}).")
    keep = [r for r in rows if len(r["prompt_ids"]) == length][:need]
    prompt_rows = write_jsonl([{k: v for k, v in r.items() if k != "prompt_ids"} for r in keep], work / "prompts.jsonl")
    write_jsonl([{"input_ids": r["prompt_ids"]} for r in keep], work / "prompt_ids.jsonl")
    again = build_datasets(DataConfig(train=[DataSource(path=str(prompt_rows))], max_length=4096), tok, "prompt").train
    if sorted(r["prompt_ids"] for r in again) != sorted(r["prompt_ids"] for r in keep):
        raise SystemExit("alignkit tokenizes prompts.jsonl to other ids than TRL gets; the prompts would differ.")
    return length


# --------------------------------------------------------------------------------------------------
# The two runs (each in its own process; the TRL one in TRL's venv)
# --------------------------------------------------------------------------------------------------


def run_alignkit(args) -> dict:
    import transformers

    import alignkit
    from alignkit.critic import PolicyCriticCheckpointer

    peaks: list[float] = []
    save_model = PolicyCriticCheckpointer.save_model

    def measure_then_save(self, path):  # peak memory of the training alone: TRL's run writes no final model
        peaks.append(peak_mb())
        return save_model(self, path)

    PolicyCriticCheckpointer.save_model = measure_then_save
    work, n = Path(args.work), args.prompts
    m = n // args.minibatches
    out = work / "alignkit"
    alignkit.train("ppo", model={"name_or_path": str(work / "policy"), "dtype": "float32"},
                   data={"train": [str(work / "prompts.jsonl")], "max_length": 4096},
                   training={"output_dir": str(out), "max_steps": args.steps + args.warmup,
                             "per_device_batch_size": m, "gradient_accumulation_steps": 1,
                             "learning_rate": LEARNING_RATE, "lr_scheduler": "constant", "weight_decay": 0.0,
                             "max_grad_norm": 0.0, "mixed_precision": "no", "report_to": ["jsonl"],
                             "logging_steps": 1, "overwrite_output_dir": True, "seed": SEED},
                   ppo={"generation": {"num_samples": 1, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                                       "top_k": 0, "top_p": 1.0, "batch_size": m},
                        "rollout_batch_size": n, "ppo_epochs": args.ppo_epochs, "clip_eps": CLIP,
                        "kl_coef": KL_COEF, "kl_penalty": "reward", "kl_estimator": "k1", "whiten_advantages": True,
                        "critic_init": "reward_model", "gamma": GAMMA, "lam": LAM, "vf_coef": VF_COEF,
                        "value_clip": True, "value_clip_range": VALUE_CLIP,
                        "reward": {"model": str(work / "reward"), "model_batch_size": m}})
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in logged if "response_length" in x]
    elapsed = logged[-1]["time"] - logged[args.warmup - 1]["time"]
    return {"samples_per_s": n * args.steps / elapsed, "peak_mb": peaks[0], "transformers": transformers.__version__,
            "full_length": all(x["response_length"] == args.max_new_tokens for x in logged)}


def run_trl(args) -> dict:
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # 0.24 warns that PPOTrainer is moving to trl.experimental
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import PPOConfig, PPOTrainer

    work, n = Path(args.work), args.prompts
    marks: list[float] = []
    peaks: list[float] = []
    sampled_never: list[float] = []  # TRL counts eos (= NEVER_SAMPLED) tokens in the responses

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())
            peaks.append(peak_mb())

        def on_log(self, *a, logs=None, **k):
            if logs and "val/num_eos_tokens" in logs:
                sampled_never.append(logs["val/num_eos_tokens"])

    cfg = PPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=n, gradient_accumulation_steps=1,
                    num_mini_batches=args.minibatches, num_ppo_epochs=args.ppo_epochs,
                    local_rollout_forward_batch_size=n // args.minibatches,
                    total_episodes=n * (args.steps + args.warmup), response_length=args.max_new_tokens,
                    temperature=1.0, stop_token=None, missing_eos_penalty=None, kl_coef=KL_COEF, kl_estimator="k1",
                    cliprange=CLIP, cliprange_value=VALUE_CLIP, vf_coef=VF_COEF, gamma=GAMMA, lam=LAM,
                    whiten_rewards=False, learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
                    optim="adamw_torch", weight_decay=0.0, gradient_checkpointing=False, bf16=False, fp16=False,
                    use_cpu=True, num_sample_generations=0, report_to="none", logging_steps=1, save_strategy="no",
                    seed=SEED, dataloader_num_workers=0, sft_model_path=str(work / "policy"),
                    reward_model_path=str(work / "reward"))
    tok = AutoTokenizer.from_pretrained(work / "policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(work / "reward", num_labels=1, dtype=torch.float32)
    rows = [json.loads(x) for x in (work / "prompt_ids.jsonl").read_text().splitlines()]
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
    trainer.train()
    elapsed = marks[-1] - marks[args.warmup - 1]
    return {"samples_per_s": n * args.steps / elapsed, "peak_mb": peaks[-1], "full_length": not any(sampled_never),
            "transformers": transformers.__version__, "trl": trl.__version__}


RUNS = {"alignkit": run_alignkit, "trl": run_trl}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed rollout steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    ap.add_argument("--prompts", type=int, default=16, help="sequences per rollout (one sample per prompt)")
    ap.add_argument("--minibatches", type=int, default=2, help="minibatches per PPO epoch (each one update)")
    ap.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="response tokens (every response has exactly this)")
    ap.add_argument("--trl-venv", default=str(TRL_VENV), help="TRL's virtualenv (built when missing)")
    ap.add_argument("--only", choices=list(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.prompts % args.minibatches:
        ap.error("--steps and --warmup must be at least 1 and --prompts a multiple of --minibatches")
    if args.only:  # child process: one framework
        print("RESULT " + json.dumps(RUNS[args.only](args)), flush=True)
        return
    pythons = {"alignkit": Path(sys.executable), "trl": trl_python(Path(args.trl_venv))}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from alignkit.assets import fetch

        make_policy_folder(fetch("smollm2-135m-instruct"), work / "policy")
        make_reward_folder(work / "policy", work / "reward")
        args.prompt_length = make_prompts(args, work)
        for name in RUNS:
            cmd = [str(pythons[name]), __file__, "--only", name, "--work", tmp, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--prompts", str(args.prompts), "--minibatches",
                   str(args.minibatches), "--ppo-epochs", str(args.ppo_epochs), "--max-new-tokens",
                   str(args.max_new_tokens)]
            env = dict(os.environ, WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                       TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-2000:], proc.stderr[-6000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            results[name] = json.loads(line[0][7:])
            print(f"{name:9s} {results[name]['samples_per_s']:8.3f} samples/s  peak {results[name]['peak_mb']:8.0f} MB",
                  flush=True)
    write_report(args, results)


def write_report(args, results: dict) -> None:
    import torch

    a, t = results["alignkit"], results["trl"]
    speed, memory = a["samples_per_s"] / t["samples_per_s"], a["peak_mb"] / t["peak_mb"]
    met = "met" if speed >= 1.5 and memory <= 1.0 else "not met"
    m = args.prompts // args.minibatches
    lengths = ("every response had exactly that length" if a["full_length"] and t["full_length"] else
               "WARNING: some responses sampled the eos/pad token, so not all had that length; rerun")
    lines = [
        f"### PPO vs TRL's PPOTrainer ({time.strftime('%Y-%m-%d')}, CPU ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, Python {platform.python_version()})", "",
        f"SmolLM2-135M-Instruct policy and reference; reward model and critic init: the same backbone with one "
        f"seeded random one-output head; fp32, no gradient checkpointing. {args.prompts} prompts of "
        f"{args.prompt_length} tokens per rollout, {args.max_new_tokens} new tokens each ({lengths}); "
        f"{args.ppo_epochs} PPO epoch(s) x {args.minibatches} minibatch(es) of {m} rows = "
        f"{args.ppo_epochs * args.minibatches} optimizer updates per rollout; {args.steps} timed steps after "
        f"{args.warmup} warm-up steps. alignkit with transformers {a['transformers']}; TRL {t['trl']} with "
        f"transformers {t['transformers']} (`.venv-trl-ppo`). Samples = prompt + response sequences. Peak "
        "memory: max RSS of each run's process at the end of its last step.", "",
        "| run | samples/s | peak memory (MB) | throughput vs TRL | memory vs TRL |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| alignkit PPO | {a['samples_per_s']:.3f} | {a['peak_mb']:.0f} | {speed:.2f}x | {memory:.2f}x |",
        f"| TRL {t['trl']} PPOTrainer | {t['samples_per_s']:.3f} | {t['peak_mb']:.0f} | 1.00x | 1.00x |", "",
        f"Target (at least 1.5x TRL's samples/s at no more peak memory): {met}.", "",
        "What each side does per step:", "", WORK, "",
        "Not made equal: the LM-head coverage; the transformers version, so `generate` and the model code "
        "differ between the two runs (same weights, same outputs).", ""]
    section = "\n".join(lines)
    print("\n" + section)
    write_section(args.out, "ppo-trl", f"python benchmarks/bench_ppo_trl.py --steps {args.steps} --warmup "
                  f"{args.warmup} --prompts {args.prompts} --minibatches {args.minibatches} --ppo-epochs "
                  f"{args.ppo_epochs} --max-new-tokens {args.max_new_tokens}", section)


if __name__ == "__main__":
    main()
