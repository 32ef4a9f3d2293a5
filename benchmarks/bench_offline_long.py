"""Offline methods at realistic lengths: alignkit vs TRL 1.16, in one invocation.

Preference data of realistic shape, built from the offline ``alpaca-demo`` asset: Alpaca instructions as
prompts (some lengthened with a context passage, so prompts run from tens to hundreds of tokens) and
completions of hundreds of tokens made of Alpaca outputs (chosen: the instruction's own answer continued),
lengths drawn log-uniformly so that a batch has a wide spread. Three parts:

- ``speed``: DPO, SimPO and KTO, full fine-tuning and LoRA, SmolLM2-135M-Instruct, ``--max-length`` 1024:
  samples/s (pairs; KTO: rows) over the steps after ``--warmup``, and peak memory.
- ``memory``: peak memory of DPO (full) against max_length (512, 1024, 2048), alignkit and TRL; a PNG.
- ``gpu`` (only where CUDA is present): bf16 DPO on a random-init ~0.7B Llama config at max_length 2048.

Settings shared by both sides: same model, rows, batch, max_length, precision (fp32 on CPU), LoRA r=16
alpha=32 dropout 0 on all linear layers, gradient checkpointing off, dropout off. alignkit runs with its
defaults (padding-free batches, shared prompt ``auto``, chunked log-probs, DPO reference precomputed
``auto``, which the run's size turns on). TRL runs with its best CPU settings: DPO
``precompute_ref_log_probs=True`` (like alignkit's), ``padding_free`` is not offered (TRL 1.16 falls back
to padding; it needs FlashAttention); KTO keeps a live reference on both sides (alignkit's KTO has no
precompute). SimPO is TRL's CPOTrainer with ``loss_type="simpo"`` and ``cpo_alpha=0``. Each run is its own
subprocess: peak memory is its max RSS (CPU) or max CUDA allocation.

    python benchmarks/bench_offline_long.py --steps 4 --warmup 1 --batch 2 --max-length 1024

``--model tiny`` runs everything on a tiny random model and short lengths (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import cuda, peak_mb, write_section  # noqa: E402

METHODS = ("dpo", "simpo", "kto")
FINETUNES = ("full", "lora")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "tiny": "a tiny random Llama (smoke test only)",
               "gpu": "a random-init ~0.7B Llama"}
GPU_CONFIG = {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 12,
              "num_key_value_heads": 4, "max_position_embeddings": 4096, "tie_word_embeddings": True}


# --------------------------------------------------------------------------------------------------
# Data: realistic prompt and completion lengths from the Alpaca asset
# --------------------------------------------------------------------------------------------------


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    hi = max(hi, lo + 1)
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def _prepared(name: str) -> Path | None:
    """A file or folder of ``--assets`` (``bench_gpu.py --prepare``, for a machine without the asset cache)."""
    folder = os.environ.get("ALIGNKIT_BENCH_ASSETS")
    return Path(folder) / name if folder else None


def preference_rows(tokenizer, n: int, max_length: int, seed: int = 0) -> list[dict]:
    """``n`` conversational preference pairs: prompt ~ log-uniform in [16, max_length/4] tokens, each
    completion ~ log-uniform in [max_length/8, max_length - prompt] tokens."""
    from alignkit.assets import fetch

    source = _prepared("alpaca.json") or Path(fetch("alpaca-demo"))  # the asset is the JSON file
    records = json.loads(source.read_text())
    records = [r for r in records if r["output"].strip()]
    rng = random.Random(seed)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_of(n_tokens: int, start: str = "") -> str:
        ids = encode(start)
        while len(ids) < n_tokens:
            ids += encode("\n\n" + rng.choice(records)["output"])
        return tokenizer.decode(ids[:n_tokens])

    rows = []
    for _ in range(n):
        rec = rng.choice(records)
        instruction = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"].strip() else "")
        prompt_len = _log_uniform(rng, 16, max_length // 4)
        extra = prompt_len - len(encode(instruction))
        prompt = f"Context:\n{text_of(extra)}\n\n{instruction}" if extra > 8 else instruction
        room = max_length - prompt_len
        chosen = text_of(_log_uniform(rng, max_length // 8, room), start=rec["output"])
        rejected = text_of(_log_uniform(rng, max_length // 8, room))
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def unpaired_rows(pairs: list[dict]) -> list[dict]:
    """KTO rows: each pair's chosen completion (desirable) and rejected one (undesirable), alternating."""
    out = []
    for p in pairs:
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return out


# --------------------------------------------------------------------------------------------------
# One run (a child process): framework x method x fine-tuning x max_length
# --------------------------------------------------------------------------------------------------


def _model_dir(args) -> str:
    if args.model == "tiny":
        from alignkit.testing import save_tiny_llama

        return str(save_tiny_llama(Path(args.work) / "tiny"))
    if args.model == "gpu":
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from alignkit.assets import fetch

        tok = AutoTokenizer.from_pretrained(_prepared("tokenizer") or fetch("smollm2-135m-instruct"))
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **GPU_CONFIG)
        path = Path(args.work) / "random-llama"
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        tok.save_pretrained(path)
        return str(path)
    from alignkit.assets import fetch

    return str(fetch("smollm2-135m-instruct"))


def _setup(args) -> tuple[str, Path, int]:
    """(model folder, data file, rows per step) for this run."""
    from transformers import AutoTokenizer

    model_dir = _model_dir(args)
    pairs = preference_rows(AutoTokenizer.from_pretrained(model_dir), args.batch * (args.steps + args.warmup),
                            args.max_length, seed=0)
    rows = unpaired_rows(pairs)[:len(pairs)] if args.method == "kto" else pairs
    path = Path(args.work) / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, path, args.batch


def _bf16(args) -> bool:
    return args.model == "gpu" and cuda()


def _result(args, per_step: int, marks: list[float]) -> dict:
    """Samples/s over the steps after the warm-up (none without warm-up: memory-only runs), peak memory."""
    rate = per_step * args.steps / (marks[-1] - marks[args.warmup - 1]) if args.warmup and args.steps else None
    return {"samples_per_s": rate, "peak_mb": peak_mb()}


def run_alignkit(args) -> dict:
    import alignkit

    model_dir, data, per_step = _setup(args)
    out = Path(args.work) / "alignkit"
    model = {"name_or_path": model_dir, "dtype": "bfloat16" if _bf16(args) else "float32", "finetune": args.finetune,
             "lora_r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"]}
    method = {"dpo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}, "kto": {"beta": 0.1}}
    alignkit.train(args.method, model=model, data={"train": [str(data)], "max_length": args.max_length},
                   training={"output_dir": str(out), "max_steps": args.steps + args.warmup,
                             "per_device_batch_size": per_step, "learning_rate": 1e-6, "report_to": ["jsonl"],
                             "mixed_precision": "bf16" if _bf16(args) else "no", "overwrite_output_dir": True,
                             "seed": 0, "lr_scheduler": "constant"},
                   **{args.method: method[args.method]})
    times = [json.loads(x)["time"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return _result(args, per_step, times)


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    model_dir, data, per_step = _setup(args)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    bf16 = _bf16(args)
    common = dict(output_dir=str(Path(args.work) / "trl"), per_device_train_batch_size=per_step,
                  max_steps=args.steps + args.warmup, learning_rate=1e-6, max_length=args.max_length,
                  gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no", bf16=bf16,
                  use_cpu=not cuda(), seed=0, dataloader_num_workers=0, lr_scheduler_type="constant")
    peft_config = None
    if args.finetune == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    if args.method == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

        cfg = Config(beta=0.1, precompute_ref_log_probs=True, **common)
    elif args.method == "simpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

        cfg = Config(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0, **common)
    else:
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        cfg = Config(beta=0.1, **common)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    trainer = Trainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      peft_config=peft_config, callbacks=[Clock()])
    trainer.train()
    return _result(args, per_step, marks)


RUNNERS = {"alignkit": run_alignkit, "trl": run_trl}


def child(args, framework: str, method: str, finetune: str, max_length: int, batch: int, steps: int,
          warmup: int, model: str) -> dict:
    """Run one configuration in its own process; returns its RESULT."""
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, __file__, "--only", framework, "--method", method, "--finetune", finetune,
               "--work", work, "--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch),
               "--max-length", str(max_length), "--model", model]
        env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{framework} {method} {finetune} max_length={max_length} failed")
        result = json.loads(line[0][7:])
    rate = "" if result["samples_per_s"] is None else f"{result['samples_per_s']:8.3f} samples/s  "
    print(f"{framework:9s} {method:6s} {finetune:5s} L={max_length:5d} {rate}peak {result['peak_mb']:8.0f} MB",
          flush=True)
    return result


# --------------------------------------------------------------------------------------------------
# Suites and the report
# --------------------------------------------------------------------------------------------------


def _environment() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, Python {platform.python_version()}"


def speed_suite(args) -> str:
    results = {}
    for method in METHODS:
        for finetune in FINETUNES:
            for framework in RUNNERS:
                results[method, finetune, framework] = child(args, framework, method, finetune, args.max_length,
                                                             args.batch, args.steps, args.warmup, args.model)
    lines = [f"### DPO, SimPO, KTO at realistic lengths ({_environment()})", "",
             f"{MODEL_NAMES[args.model]}, realistic-length Alpaca pairs (prompts 16 to {args.max_length // 4} tokens, "
             f"completions {args.max_length // 8} to ~{args.max_length} tokens, log-uniform), max_length "
             f"{args.max_length}, batch {args.batch} (pairs; KTO: rows), fp32, no gradient checkpointing, "
             f"{args.steps} timed steps after {args.warmup} warm-up. Peak memory: max RSS. TRL: DPO with "
             "precomputed reference log-probs, its padding_free unavailable in 1.16; KTO live reference on both "
             "sides.", "",
             "| method | fine-tuning | alignkit samples/s | TRL samples/s | throughput vs TRL | alignkit peak MB | "
             "TRL peak MB | memory vs TRL |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in METHODS:
        for finetune in FINETUNES:
            a, t = results[method, finetune, "alignkit"], results[method, finetune, "trl"]
            lines.append(f"| {method} | {finetune} | {a['samples_per_s']:.3f} | {t['samples_per_s']:.3f} | "
                         f"{a['samples_per_s'] / t['samples_per_s']:.2f}x | {a['peak_mb']:.0f} | {t['peak_mb']:.0f} | "
                         f"{a['peak_mb'] / t['peak_mb']:.2f}x |")
    return "\n".join(lines)


def memory_suite(args) -> str:
    lengths = [int(x) for x in args.curve_lengths.split(",")]
    curve = {fw: [child(args, fw, "dpo", "full", n, args.curve_batch, 1, 0, args.model)["peak_mb"] for n in lengths]
             for fw in RUNNERS}
    _plot(lengths, curve, Path(args.img), MODEL_NAMES[args.model])
    lines = [f"### Peak memory against max_length, DPO full fine-tuning ({_environment()})", "",
             f"{MODEL_NAMES[args.model]}, the same data recipe scaled to each max_length, batch {args.curve_batch} "
             "pairs, one step (reference log-probs precomputed on both sides). Max RSS in MB.",
             "", "| max_length | alignkit | TRL | alignkit vs TRL |", "| ---: | ---: | ---: | ---: |"]
    for i, n in enumerate(lengths):
        a, t = curve["alignkit"][i], curve["trl"][i]
        lines.append(f"| {n} | {a:.0f} | {t:.0f} | {a / t:.2f}x |")
    rel = os.path.relpath(args.img, Path(args.out).parent)
    lines += ["", f"![peak memory against max_length]({rel})"]
    return "\n".join(lines)


def gpu_suite(args) -> str:
    results = {fw: child(args, fw, "dpo", "full", 2048, args.gpu_batch, args.steps, args.warmup, "gpu")
               for fw in RUNNERS}
    a, t = results["alignkit"], results["trl"]
    hidden, layers = GPU_CONFIG["hidden_size"], GPU_CONFIG["num_hidden_layers"]
    return "\n".join([
        f"### GPU: bf16 DPO at max_length 2048 ({_environment()})", "",
        f"Random-init Llama (hidden {hidden}, {layers} layers, SmolLM2 vocabulary, ~0.7B parameters), bf16 weights "
        f"and autocast, full fine-tuning, batch {args.gpu_batch} pairs, {args.steps} timed steps after "
        f"{args.warmup} warm-up. Peak memory: torch.cuda.max_memory_allocated.", "",
        "| run | samples/s | peak memory (MB) | throughput vs TRL | memory vs TRL |", "| --- | ---: | ---: | ---: | ---: |",
        f"| alignkit | {a['samples_per_s']:.2f} | {a['peak_mb']:.0f} | {a['samples_per_s'] / t['samples_per_s']:.2f}x | "
        f"{a['peak_mb'] / t['peak_mb']:.2f}x |",
        f"| TRL DPOTrainer | {t['samples_per_s']:.2f} | {t['peak_mb']:.0f} | 1.00x | 1.00x |"])


def _plot(lengths: list[int], curve: dict[str, list[float]], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, label in (("alignkit", "alignkit"), ("trl", "TRL DPOTrainer")):
        ax.plot(lengths, [v / 1024 for v in curve[name]], marker="o", label=label)
    ax.set_xlabel("max_length (tokens)")
    ax.set_ylabel("peak memory (GiB, max RSS)")
    ax.set_xticks(lengths)
    ax.set_title(f"DPO full fine-tuning, {model}, CPU", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2, help="pairs per step (KTO: rows)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--suite", choices=["all", "speed", "memory", "gpu"], default="all",
                    help="all: speed and memory, and gpu where CUDA is present")
    ap.add_argument("--curve-lengths", default="512,1024,2048")
    ap.add_argument("--curve-batch", type=int, default=2)
    ap.add_argument("--gpu-batch", type=int, default=8)
    ap.add_argument("--model", choices=["smollm2", "tiny", "gpu"], default="smollm2")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--img", default=str(ROOT / "docs" / "img" / "offline_memory_vs_length.png"))
    ap.add_argument("--only", choices=list(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, default="dpo", help=argparse.SUPPRESS)
    ap.add_argument("--finetune", choices=FINETUNES, default="full", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--assets", help="offline assets from `bench_gpu.py --prepare` (tokenizer/, alpaca.json) "
                                     "instead of the asset cache (the GPU machine has none)")
    args = ap.parse_args()
    if args.assets:
        os.environ["ALIGNKIT_BENCH_ASSETS"] = str(Path(args.assets).resolve())  # the runs' processes inherit it
    if args.only:  # child process: one framework, one configuration
        print("RESULT " + json.dumps(RUNNERS[args.only](args)), flush=True)
        return
    command = "python benchmarks/bench_offline_long.py " + " ".join(sys.argv[1:])
    if args.suite in ("all", "speed"):
        write_section(args.out, "offline-long", command, speed_suite(args))
    if args.suite in ("all", "memory"):
        write_section(args.out, "offline-long-memory", command, memory_suite(args))
    if args.suite == "gpu" or (args.suite == "all" and cuda()):
        write_section(args.out, "offline-long-gpu", command, gpu_suite(args))


if __name__ == "__main__":
    main()
