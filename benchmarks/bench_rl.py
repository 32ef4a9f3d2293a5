"""Online RL throughput and peak memory: alignkit GRPO / RLOO vs TRL's GRPOTrainer / RLOOTrainer.

Same model (SmolLM2-135M-Instruct), same prompts (openings of real movie reviews), samples per prompt,
prompts per step, response length, temperature, KL coefficient (so both keep a reference model), one
optimisation pass per rollout, the same function reward, fp32 on CPU (bf16 on CUDA), no gradient
checkpointing. Each run is its own subprocess (peak memory = its max RSS, or max CUDA allocation).

    python benchmarks/bench_rl.py --steps 6 --prompts 4 --samples 4 --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))  # the examples package (the sentiment task)

from common import bf16, cuda, peak_mb, write_section  # noqa: E402


def positive_words(prompts, completions, **kwargs) -> list[float]:
    """The benchmark's reward: share of words from a small positive lexicon (cheap, identical for both)."""
    good = {"good", "great", "love", "best", "wonderful", "fun", "beautiful", "excellent", "enjoy", "amazing"}
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c  # TRL passes messages for chat prompts
        words = text.lower().split()
        out.append(sum(w.strip(".,!?") in good for w in words) / max(len(words), 1))
    return out


def _setup(args) -> tuple[str, Path]:
    from alignkit.assets import fetch
    from examples.sentiment.task import load_reviews, prompts, split_reviews, write_jsonl

    train, _ = split_reviews(load_reviews())
    rows = prompts(train, args.prompts * (args.steps + args.warmup))
    return str(fetch("smollm2-135m-instruct")), write_jsonl(rows, Path(args.work) / "prompts.jsonl")


def run_alignkit(args, method: str) -> dict:
    import alignkit

    model_dir, data = _setup(args)
    out = Path(args.work) / method
    section = {"generation": {"num_samples": args.samples, "max_new_tokens": args.max_new_tokens, "temperature": 1.0},
               "rollout_batch_size": args.prompts, "kl_coef": 0.04, "ppo_epochs": 1,
               "reward": {"functions": ["bench_rl:positive_words"]}}
    if method == "grpo":
        section.update({"kl_penalty": "loss", "kl_estimator": "k3", "loss_agg": "seq-mean-token-mean"})
    alignkit.train(method, model={"name_or_path": model_dir, "dtype": "float32"},
                   data={"train": [str(data)], "max_length": 64},
                   training={"output_dir": str(out), "max_steps": args.steps + args.warmup,
                             "per_device_batch_size": args.prompts * args.samples, "learning_rate": 1e-6,
                             "report_to": ["jsonl"], "mixed_precision": "bf16" if bf16() else "no",
                             "overwrite_output_dir": True, "lr_scheduler": "constant"},
                   **{method: section})
    times = [json.loads(x)["time"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    elapsed = times[-1] - times[args.warmup - 1]
    return {"samples_per_s": args.prompts * args.samples * args.steps / elapsed, "peak_mb": peak_mb()}


def run_trl(args, method: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    model_dir, data = _setup(args)
    rows = [{"prompt": json.loads(x)["prompt"]} for x in data.read_text().splitlines()]
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    common = dict(output_dir=str(Path(args.work) / f"trl-{method}"), per_device_train_batch_size=args.prompts * args.samples,
                  num_generations=args.samples, max_completion_length=args.max_new_tokens, temperature=1.0,
                  max_steps=args.steps + args.warmup, learning_rate=1e-6, beta=0.04, num_iterations=1,
                  steps_per_generation=1, gradient_checkpointing=False, report_to="none", logging_steps=1,
                  save_strategy="no", bf16=bf16(), use_cpu=not cuda(), seed=0, lr_scheduler_type="constant")
    if method == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        common["loss_type"] = "grpo"
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    trainer = Trainer(model=model, reward_funcs=positive_words, args=Config(**common),
                      train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()])
    trainer.train()
    elapsed = marks[-1] - marks[args.warmup - 1]
    return {"samples_per_s": args.prompts * args.samples * args.steps / elapsed, "peak_mb": peak_mb()}


def run_alignkit_ppo(args) -> dict:
    import alignkit

    model_dir, data = _setup(args)
    out = Path(args.work) / "ppo"
    alignkit.train("ppo", model={"name_or_path": model_dir, "dtype": "float32"},
                   data={"train": [str(data)], "max_length": 64},
                   training={"output_dir": str(out), "max_steps": args.steps + args.warmup,
                             "per_device_batch_size": args.prompts * args.samples, "learning_rate": 1e-6,
                             "report_to": ["jsonl"], "mixed_precision": "bf16" if bf16() else "no",
                             "overwrite_output_dir": True, "lr_scheduler": "constant"},
                   ppo={"generation": {"num_samples": 1, "max_new_tokens": args.max_new_tokens, "temperature": 1.0},
                        "rollout_batch_size": args.prompts * args.samples, "ppo_epochs": 1, "kl_coef": 0.04,
                        "reward": {"functions": ["bench_rl:positive_words"]}})
    times = [json.loads(x)["time"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    elapsed = times[-1] - times[args.warmup - 1]
    return {"samples_per_s": args.prompts * args.samples * args.steps / elapsed, "peak_mb": peak_mb()}


def run_floor_ppo(args) -> dict:
    """What one PPO step cannot avoid: generate; reference, policy and critic forwards for the rollout;
    one clipped policy + value update (forward and backward of policy and critic); AdamW."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_dir, data = _setup(args)
    device = "cuda" if cuda() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    critic = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32).to(device)
    critic.config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=1e-6)
    prompts = [json.loads(x)["prompt"] for x in data.read_text().splitlines()]
    n = args.prompts * args.samples
    marks = []
    for step in range(args.steps + args.warmup):
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in (prompts * n)[step * n:(step + 1) * n]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        policy.eval()
        with torch.no_grad():
            seq = policy.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0,
                                  pad_token_id=tok.pad_token_id)
        P = enc["input_ids"].shape[1]
        attn = torch.cat([enc["attention_mask"], torch.ones_like(seq[:, P:])], 1)
        completions = tok.batch_decode(seq[:, P:], skip_special_tokens=True)
        reward = torch.tensor(positive_words(texts, completions), device=device)

        def logps(model, seq=seq, attn=attn, P=P):
            logits = model(input_ids=seq, attention_mask=attn).logits[:, P - 1:-1].float()
            return torch.gather(logits.log_softmax(-1), 2, seq[:, P:].unsqueeze(-1)).squeeze(-1)

        def values(seq=seq, attn=attn, P=P):
            h = critic.model(input_ids=seq, attention_mask=attn).last_hidden_state
            return critic.score(h).squeeze(-1)[:, P - 1:-1]

        with torch.no_grad():
            ref_lp, old_lp, old_v = logps(ref), logps(policy), values()
        adv = (reward.unsqueeze(1) - 0.04 * (old_lp - ref_lp)) - old_v
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        policy.train()
        lp = logps(policy)
        ratio = (lp - old_lp).exp()
        p_loss = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
        v_loss = 0.5 * (values() - (adv + old_v)).pow(2).mean()
        (p_loss + 0.1 * v_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    elapsed = marks[-1] - marks[args.warmup - 1]
    return {"samples_per_s": n * args.steps / elapsed, "peak_mb": peak_mb()}


RUNS = {"alignkit-grpo": lambda a: run_alignkit(a, "grpo"), "trl-grpo": lambda a: run_trl(a, "grpo"),
        "alignkit-rloo": lambda a: run_alignkit(a, "rloo"), "trl-rloo": lambda a: run_trl(a, "rloo"),
        "alignkit-ppo": run_alignkit_ppo, "floor-ppo": run_floor_ppo}
SUITES = {"grpo-rloo": ["alignkit-grpo", "trl-grpo", "alignkit-rloo", "trl-rloo"],
          "ppo": ["alignkit-ppo", "floor-ppo"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--suite", choices=list(SUITES), default="grpo-rloo")
    ap.add_argument("--only", choices=list(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if args.only:
        print("RESULT " + json.dumps(RUNS[args.only](args)), flush=True)
        return
    results = {}
    for name in SUITES[args.suite]:
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, __file__, "--only", name, "--work", work, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--prompts", str(args.prompts), "--samples", str(args.samples),
                   "--max-new-tokens", str(args.max_new_tokens)]
            env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT / "benchmarks"))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-2000:], proc.stderr[-5000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            results[name] = json.loads(line[0][7:])
            print(f"{name:14s} {results[name]['samples_per_s']:8.2f} samples/s  peak {results[name]['peak_mb']:8.0f} MB",
                  flush=True)
    write_report(args, results)


def write_report(args, results: dict) -> None:
    if args.suite == "ppo":
        return write_ppo_report(args, results)
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    lines = [f"### GRPO and RLOO ({time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, "
             f"Python {platform.python_version()})", "",
             f"SmolLM2-135M-Instruct, {args.prompts} prompts x {args.samples} samples per step, "
             f"{args.max_new_tokens} new tokens, KL coefficient 0.04 (reference model kept), one update per "
             f"rollout, function reward, {'bf16' if bf16() else 'fp32'}, no gradient checkpointing, "
             f"{args.steps} timed steps after {args.warmup} warm-up steps. Samples = completions.", "",
             "| run | samples/s | peak memory (MB) | throughput vs TRL | memory vs TRL |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for method in ("grpo", "rloo"):
        a, t = results[f"alignkit-{method}"], results[f"trl-{method}"]
        lines.append(f"| alignkit {method.upper()} | {a['samples_per_s']:.2f} | {a['peak_mb']:.0f} | "
                     f"{a['samples_per_s'] / t['samples_per_s']:.2f}x | {a['peak_mb'] / t['peak_mb']:.2f}x |")
        lines.append(f"| TRL {method.upper()}Trainer | {t['samples_per_s']:.2f} | {t['peak_mb']:.0f} | 1.00x | 1.00x |")
    section = "\n".join(lines) + "\n"
    print("\n" + section)
    write_section(args.out, "rl", f"python benchmarks/bench_rl.py --steps {args.steps} --prompts {args.prompts} "
                  f"--samples {args.samples} --max-new-tokens {args.max_new_tokens}", section)


def write_ppo_report(args, results: dict) -> None:
    import platform

    import torch

    a, f = results["alignkit-ppo"], results["floor-ppo"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    section = "\n".join([
        f"### PPO vs its floor ({time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, "
        f"Python {platform.python_version()})", "",
        f"SmolLM2-135M-Instruct policy, critic and reference; {args.prompts * args.samples} prompts per step, "
        f"{args.max_new_tokens} new tokens, one PPO epoch of one minibatch, function reward, "
        f"{'bf16' if bf16() else 'fp32'}. The floor is plain PyTorch doing only generation, the reference / "
        "old-policy / critic forwards and one policy + value update.", "",
        "| run | samples/s | peak memory (MB) | throughput vs floor | memory vs floor |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| alignkit PPO | {a['samples_per_s']:.2f} | {a['peak_mb']:.0f} | {a['samples_per_s'] / f['samples_per_s']:.2f}x "
        f"| {a['peak_mb'] / f['peak_mb']:.2f}x |",
        f"| bare PyTorch floor | {f['samples_per_s']:.2f} | {f['peak_mb']:.0f} | 1.00x | 1.00x |", ""])
    print("\n" + section)
    write_section(args.out, "ppo", f"python benchmarks/bench_rl.py --suite ppo --steps {args.steps} --prompts {args.prompts} "
                  f"--samples {args.samples} --max-new-tokens {args.max_new_tokens}", section)


if __name__ == "__main__":
    main()
