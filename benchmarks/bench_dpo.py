"""DPO throughput and peak memory: alignkit vs TRL's DPOTrainer vs a bare PyTorch floor, in one invocation.

All three use the same model (SmolLM2-135M-Instruct), the same preference pairs (real movie reviews),
batch size, max length, precision (fp32 on CPU, bf16 on CUDA), full fine-tuning with a frozen reference
copy, and gradient checkpointing off. Each runs in its own subprocess, so peak memory is its own
(max RSS on CPU, max allocated on CUDA). Throughput is timed over the steps after ``--warmup``.

    python benchmarks/bench_dpo.py --steps 12 --batch 4 --max-length 128
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))  # the examples package (the sentiment task)

from common import bf16, cuda, peak_mb, write_section  # noqa: E402


def _setup(args) -> tuple[str, Path]:
    from alignkit.assets import fetch
    from examples.sentiment.task import dpo_pairs, load_reviews, split_reviews, write_jsonl

    model_dir = str(fetch("smollm2-135m-instruct"))
    train, _ = split_reviews(load_reviews())
    data = write_jsonl(dpo_pairs(train, args.batch * (args.steps + args.warmup)), Path(args.work) / "pairs.jsonl")
    return model_dir, data


def _precision() -> str:
    return "bf16" if bf16() else "no"


def run_alignkit(args) -> dict:
    import alignkit

    model_dir, data = _setup(args)
    out = Path(args.work) / "alignkit"
    alignkit.train("dpo", model={"name_or_path": model_dir, "dtype": "float32"},
                   data={"train": [str(data)], "max_length": args.max_length},
                   training={"output_dir": str(out), "max_steps": args.steps + args.warmup,
                             "per_device_batch_size": args.batch, "learning_rate": 1e-6, "report_to": ["jsonl"],
                             "mixed_precision": _precision(), "overwrite_output_dir": True, "seed": 0},
                   dpo={"beta": 0.1, "precompute_ref_logps": False})  # a live reference, as TRL and the floor
    times = [json.loads(x)["time"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = times[-1] - times[args.warmup - 1]
    return {"samples_per_s": args.batch * args.steps / elapsed, "peak_mb": peak_mb()}


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model_dir, data = _setup(args)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    bf16 = _precision() == "bf16"
    cfg = DPOConfig(output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=args.batch,
                    max_steps=args.steps + args.warmup, learning_rate=1e-6, beta=0.1, max_length=args.max_length,
                    gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
                    bf16=bf16, use_cpu=not cuda(), seed=0, dataloader_num_workers=0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()])
    trainer.train()
    elapsed = marks[-1] - marks[args.warmup - 1]
    return {"samples_per_s": args.batch * args.steps / elapsed, "peak_mb": peak_mb()}


def run_floor(args) -> dict:
    """The passes DPO cannot avoid: policy forward+backward on chosen+rejected, reference forward, AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import DataConfig, DataSource
    from alignkit.data import build_datasets, padded_batch

    model_dir, data = _setup(args)
    device = "cuda" if cuda() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = build_datasets(DataConfig(train=[DataSource(path=str(data))], max_length=args.max_length), tok,
                          "preference").train
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).train()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if _precision() == "bf16" else torch.autocast("cpu", enabled=False)
    marks = []
    for step in range(args.steps + args.warmup):
        chunk = rows[step * args.batch:(step + 1) * args.batch]
        seqs = [r["prompt_ids"] + r["chosen_ids"] for r in chunk] + [r["prompt_ids"] + r["rejected_ids"] for r in chunk]
        labels = [[-100] * len(r["prompt_ids"]) + r[k] for k in ("chosen_ids", "rejected_ids") for r in chunk]
        batch = {k: v.to(device) for k, v in padded_batch(seqs, labels, tok.pad_token_id).items()}
        mask = batch["labels"][:, 1:] != -100

        def logps(model, batch=batch, mask=mask):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            nll = F.cross_entropy(logits.float().transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100,
                                  reduction="none")
            return -(nll * mask).sum(-1)

        with amp:
            with torch.no_grad():
                r = logps(ref)
            p = logps(policy)
        n = len(chunk)
        loss = -F.logsigmoid(0.1 * ((p[:n] - r[:n]) - (p[n:] - r[n:]))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    elapsed = marks[-1] - marks[args.warmup - 1]
    return {"samples_per_s": args.batch * args.steps / elapsed, "peak_mb": peak_mb()}


RUNNERS = {"alignkit": run_alignkit, "trl": run_trl, "floor": run_floor}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--only", choices=list(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if args.only:  # child process: one framework
        print("RESULT " + json.dumps(RUNNERS[args.only](args)), flush=True)
        return
    results = {}
    for name in RUNNERS:
        with tempfile.TemporaryDirectory() as work:
            cmd = [sys.executable, __file__, "--only", name, "--work", work, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            results[name] = json.loads(line[0][7:])
            print(f"{name:9s} {results[name]['samples_per_s']:8.2f} samples/s  peak {results[name]['peak_mb']:8.0f} MB",
                  flush=True)
    write_report(args, results)


def write_report(args, results: dict) -> None:
    import torch

    a, t, f = results["alignkit"], results["trl"], results["floor"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    memkind = "max allocated (CUDA)" if torch.cuda.is_available() else "max RSS"
    lines = [
        f"### DPO ({time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, Python {platform.python_version()})",
        "",
        f"SmolLM2-135M-Instruct, full fine-tuning + frozen reference copy, batch {args.batch} pairs, "
        f"max_length {args.max_length}, {'bf16' if _precision() == 'bf16' else 'fp32'}, no gradient checkpointing, "
        f"{args.steps} timed steps after {args.warmup} warm-up steps. Peak memory: {memkind}.",
        "",
        "| run | samples/s | peak memory (MB) | throughput vs TRL | memory vs TRL |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in (("alignkit", a), ("TRL DPOTrainer", t), ("bare PyTorch floor", f)):
        lines.append(f"| {name} | {r['samples_per_s']:.2f} | {r['peak_mb']:.0f} | "
                     f"{r['samples_per_s'] / t['samples_per_s']:.2f}x | {r['peak_mb'] / t['peak_mb']:.2f}x |")
    lines += ["", f"alignkit reaches {a['samples_per_s'] / f['samples_per_s']:.0%} of the floor's throughput.", ""]
    section = "\n".join(lines)
    print("\n" + section)
    write_section(args.out, "dpo", f"python benchmarks/bench_dpo.py --steps {args.steps} --batch {args.batch} "
                  f"--max-length {args.max_length}", section)

if __name__ == "__main__":
    main()
