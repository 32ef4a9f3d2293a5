"""GRPO with long completions of widely varying length: alignkit vs TRL's GRPOTrainer (TRL 1.16, main venv).

Both sides get the same work per step:

- the same policy (SmolLM2-135M-Instruct), fp32 on CPU, no gradient checkpointing, no reference model
  (TRL's default ``beta=0``; alignkit ``kl_coef: 0``), dropout off;
- the same prompts (short chat questions, SmolLM2's chat template), ``--prompts`` per step x
  ``--generations`` samples each, generated in one HF ``model.generate`` call per step (temperature 1,
  no top-k/top-p);
- the same completion lengths: every ``generate`` call of either side gets one logits processor (installed
  by patching ``GenerationMixin.generate`` in each process) that forbids the eos token before and forces
  it at a predetermined length per row: the rows of the k-th call get a seeded permutation of lengths spread
  evenly from ``--min-new-tokens`` to ``--max-new-tokens`` (the longest always reaching the maximum);
- one AdamW update per step (the whole rollout is one minibatch of micro-batches of ``--micro-batch``
  rows), so neither side runs an "old log-probs" forward; GRPO advantages with the group std, token-mean
  loss (TRL's default ``dapo``), PPO clip 0.2, no gradient clipping; a reward function of the completion's
  length in characters (cheap, the same code on both sides).

Each run is its own subprocess; peak memory = its max RSS at the end of its last step. Throughput counts the
steps after ``--warmup``, each from its start (before its generation) to its end (after its update), in wall-clock
time and in the process's CPU time (the machine these numbers come from was shared). The defaults are the measurement:

    python benchmarks/bench_grpo_trl.py --steps 1 --warmup 0 --prompts 2 --generations 4 --micro-batch 4 \\
        --max-new-tokens 512
    python benchmarks/bench_grpo_trl.py --curve 256,512,1024,2048   # peak memory vs max completion length
"""

from __future__ import annotations

import argparse
import json
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

from common import peak_mb, write_section  # noqa: E402

LEARNING_RATE, SEED, CLIP = 1e-6, 0, 0.2
QUESTIONS = ["What is the capital of France?", "Explain photosynthesis.", "Write a poem about the sea.",
             "How do I sort a list in Python?", "Why is the sky blue?", "Tell me a story about a dragon.",
             "What are prime numbers?", "Describe the water cycle.", "Give me three tips for studying.",
             "What causes earthquakes?", "Summarise the plot of Hamlet.", "How does a bicycle work?",
             "What is machine learning?", "Name the planets of the solar system.", "How do vaccines work?",
             "Write a haiku about autumn."]
REWARD = '''def length_reward(prompts, completions, **_):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(t) % 97 / 97.0 for t in texts]
'''
CURVE_JSON = ROOT / "docs" / "img" / "grpo_memory_vs_length.json"
GENERATION_CPU: list[float] = []  # CPU seconds of each generate call of this process
CURVE_DEFAULTS = {"prompts": 1, "generations": 2, "micro_batch": 2, "steps": 1, "warmup": 0}


# --------------------------------------------------------------------------------------------------
# The same completion lengths on both sides
# --------------------------------------------------------------------------------------------------


def force_lengths(min_new: int, max_new: int, eos_ids: list[int]) -> None:
    """Patch ``GenerationMixin.generate`` in this process: the k-th call's rows end (eos) after a seeded
    permutation of lengths spread evenly over ``[min_new, max_new]``, whatever is sampled before."""
    import torch
    from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

    calls = [0]
    generate = GenerationMixin.generate
    GENERATION_CPU.clear()

    class ForcedLength(LogitsProcessor):
        def __init__(self, lengths: torch.Tensor):
            self.lengths, self.start = lengths, None

        def __call__(self, input_ids, scores):
            if self.start is None:
                self.start = input_ids.shape[1]
            made = input_ids.shape[1] - self.start  # tokens generated so far
            ending = (self.lengths.to(scores.device) - 1) == made
            scores[:, eos_ids] = float("-inf")
            scores[ending] = float("-inf")
            scores[ending, eos_ids[0]] = 0.0
            return scores

    def patched(self, *args, **kwargs):
        rows = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[0]
        n = max(rows - 1, 1)
        lengths = [round(min_new + (max_new - min_new) * i / n) for i in range(rows)]
        random.Random(1000 + calls[0]).shuffle(lengths)
        calls[0] += 1
        kwargs["logits_processor"] = LogitsProcessorList([ForcedLength(torch.tensor(lengths))])
        start = time.process_time()
        try:
            return generate(self, *args, **kwargs)
        finally:
            GENERATION_CPU.append(time.process_time() - start)

    GenerationMixin.generate = patched


# --------------------------------------------------------------------------------------------------
# The two runs (each in its own process)
# --------------------------------------------------------------------------------------------------


class StepClock:
    """Wall-clock and process CPU time of each step, from its beginning to its end."""

    def __init__(self):
        self.steps: list[tuple[float, float]] = []
        self.at = (0.0, 0.0)

    def begin(self) -> None:
        self.at = (time.perf_counter(), time.process_time())

    def end(self) -> None:
        self.steps.append((time.perf_counter() - self.at[0], time.process_time() - self.at[1]))

    def rates(self, n: int, warmup: int) -> dict:
        timed = self.steps[warmup:]
        return {"samples_per_s": n * len(timed) / sum(w for w, _ in timed),
                "samples_per_cpu_s": n * len(timed) / sum(c for _, c in timed), "steps_timed": len(timed),
                "step_cpu_s": sum(c for _, c in timed) / len(timed),
                "generate_cpu_s": sum(GENERATION_CPU[warmup:]) / len(timed)}


def _setup(args):
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tok = AutoTokenizer.from_pretrained(args.model)
    force_lengths(args.min_new_tokens, args.max_new_tokens, [tok.eos_token_id])
    return tok


def run_alignkit(args) -> dict:
    import alignkit
    from alignkit.methods import online_rl
    from alignkit.training import Checkpointer

    _setup(args)
    peaks: list[float] = []
    save_model = Checkpointer.save_model
    clock = StepClock()  # a step starts with a new MetricSums and ends when the loop takes its means (once)
    init, means = online_rl.MetricSums.__init__, online_rl.MetricSums.means

    def started(self, *a, **k):
        clock.begin()
        init(self, *a, **k)

    def ended(self, *a, **k):
        clock.end()
        return means(self, *a, **k)

    online_rl.MetricSums.__init__, online_rl.MetricSums.means = started, ended

    def measure_then_save(self, path):  # peak of the training alone: TRL's run writes no final model
        peaks.append(peak_mb())
        return save_model(self, path)

    Checkpointer.save_model = measure_then_save
    work, n = Path(args.work), args.prompts * args.generations
    out = work / "alignkit"
    alignkit.train("grpo", model={"name_or_path": args.model, "dtype": "float32"},
                   data={"train": [str(work / "prompts.jsonl")], "max_length": 4096},
                   training={"output_dir": str(out), "max_steps": args.steps + args.warmup,
                             "per_device_batch_size": args.micro_batch,
                             "gradient_accumulation_steps": n // args.micro_batch, "learning_rate": LEARNING_RATE,
                             "lr_scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 0.0,
                             "mixed_precision": "no", "report_to": ["jsonl"], "logging_steps": 1,
                             "overwrite_output_dir": True, "seed": SEED},
                   grpo={"generation": {"num_samples": args.generations, "max_new_tokens": args.max_new_tokens,
                                        "temperature": 1.0, "top_k": 0, "top_p": 1.0},
                         "rollout_batch_size": args.prompts, "kl_coef": 0.0, "clip_eps": CLIP,
                         "loss_agg": "token-mean", "scale_rewards": "group", "padding_free": args.padding_free,
                         "reward": {"functions": [f"{work / 'reward.py'}:length_reward"]}})
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in logged if "response_length" in x]
    return {**clock.rates(n, args.warmup), "peak_mb": peaks[0], "gen_share": logged[-1]["gen_share"],
            "completion_tokens": sum(x["response_length"] for x in logged[args.warmup:]) * n}


def run_trl(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = _setup(args)
    work, n = Path(args.work), args.prompts * args.generations
    clock = StepClock()
    peaks: list[float] = []
    lengths: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):  # before the step's generation (inside its first micro-batch)
            clock.begin()

        def on_step_end(self, *a, **k):
            clock.end()
            peaks.append(peak_mb())

        def on_log(self, *a, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    sys.path.insert(0, str(work))
    from reward import length_reward

    cfg = GRPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.micro_batch,
                     gradient_accumulation_steps=n // args.micro_batch, num_generations=args.generations,
                     max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                     beta=0.0, epsilon=CLIP, loss_type="dapo", scale_rewards="group", num_iterations=1,
                     learning_rate=LEARNING_RATE, lr_scheduler_type="constant", optim="adamw_torch",
                     weight_decay=0.0, max_grad_norm=0.0, gradient_checkpointing=False, bf16=False, fp16=False,
                     use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", seed=SEED,
                     max_steps=args.steps + args.warmup, disable_dropout=True, dataloader_num_workers=0,
                     shuffle_dataset=False)
    policy = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(x) for x in (work / "prompts.jsonl").read_text().splitlines()]
    trainer = GRPOTrainer(model=policy, reward_funcs=length_reward, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {**clock.rates(n, args.warmup), "peak_mb": peaks[-1], "trl": trl.__version__,
            "completion_tokens": sum(lengths[args.warmup:]) * n}


RUNS = {"alignkit": run_alignkit, "trl": run_trl}


def make_inputs(args, work: Path) -> int:
    """prompts.jsonl (chat prompts, both sides) and reward.py; checks both sides tokenize the prompts alike.
    Returns the longest prompt in tokens."""
    from transformers import AutoTokenizer

    from alignkit.config import DataConfig, DataSource, ModelConfig
    from alignkit.data import build_datasets
    from alignkit.models import load_tokenizer

    need = args.prompts * (args.steps + args.warmup)
    rows = [{"prompt": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]} for i in range(need)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "reward.py").write_text(REWARD)
    ours = build_datasets(DataConfig(train=[DataSource(path=str(work / "prompts.jsonl"))], max_length=4096),
                          load_tokenizer(ModelConfig(name_or_path=args.model)), "prompt").train
    tok = AutoTokenizer.from_pretrained(args.model)
    theirs = tok.apply_chat_template([r["prompt"] for r in rows], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    if sorted(r["prompt_ids"] for r in ours) != sorted(list(t) for t in theirs):
        raise SystemExit("alignkit and TRL tokenize the prompts differently; the prompts would differ.")
    return max(len(t) for t in theirs)


def run_child(name: str, args, work: Path, max_new: int, sizes: dict, padding_free: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--only", name, "--work", str(work), "--model", args.model,
           "--max-new-tokens", str(max_new), "--min-new-tokens", str(args.min_new_tokens),
           "--steps", str(sizes["steps"]), "--warmup", str(sizes["warmup"]), "--prompts", str(sizes["prompts"]),
           "--generations", str(sizes["generations"]), "--micro-batch", str(sizes["micro_batch"])]
    if not padding_free:
        cmd.append("--padded")
    env = dict(os.environ, WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stdout[-2000:], proc.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"{name} failed")
    result = json.loads(line[0][7:])
    print(f"{name:9s} L={max_new:5d} step {result['step_cpu_s']:.1f} CPU-s, of which generate "
          f"{result['generate_cpu_s']:.1f}", flush=True)
    print(f"{name:9s} L={max_new:5d} {result['samples_per_s']:8.4f} samples/s  "
          f"{result['samples_per_cpu_s']:8.4f} samples/CPU-s  peak {result['peak_mb']:8.0f} MB  "
          f"completion tokens {result['completion_tokens']:.0f}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1, help="timed steps (each timed from its start to its end)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="samples per prompt (TRL's num_generations)")
    ap.add_argument("--micro-batch", type=int, default=4, help="rows per forward/backward (per_device_batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="longest completion")
    ap.add_argument("--min-new-tokens", type=int, default=16, help="shortest completion")
    ap.add_argument("--curve", default=None, help="comma-separated max completion lengths: the peak-memory curve "
                                                  "instead (1 prompt x 2 samples, micro-batch 2, 1 step each)")
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=list(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--padded", dest="padding_free", action="store_false", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    if args.only:  # child process: one framework
        print("RESULT " + json.dumps(RUNS[args.only](args)), flush=True)
        return
    from alignkit.assets import fetch

    args.model = str(fetch("smollm2-135m-instruct"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.curve:
            lengths = [int(x) for x in args.curve.split(",")]
            sizes = dict(CURVE_DEFAULTS)
            args.steps, args.warmup, args.prompts = sizes["steps"], sizes["warmup"], sizes["prompts"]
            args.prompt_length = make_inputs(args, work)
            # kept beside the plot, so lengths measured by separate invocations join one curve
            curve = {name: {int(L): r for L, r in runs.items()} for name, runs in json.loads(
                CURVE_JSON.read_text()).items()} if CURVE_JSON.exists() else {name: {} for name in RUNS}
            for L in lengths:  # the section and plot are rewritten after each length
                for name in RUNS:
                    curve[name][L] = run_child(name, args, work, L, sizes)
                CURVE_JSON.write_text(json.dumps(curve, indent=1))
                write_curve(args, sorted(set(curve["alignkit"]) & set(curve["trl"])), curve)
            return
        if (args.prompts * args.generations) % args.micro_batch:
            ap.error("prompts x generations must be a multiple of --micro-batch")
        args.prompt_length = make_inputs(args, work)
        sizes = {"steps": args.steps, "warmup": args.warmup, "prompts": args.prompts,
                 "generations": args.generations, "micro_batch": args.micro_batch}
        results = {name: run_child(name, args, work, args.max_new_tokens, sizes) for name in RUNS}
    write_report(args, results)


def _header(what: str) -> str:
    import torch
    import transformers
    import trl

    return (f"### {what} ({time.strftime('%Y-%m-%d')}, CPU ({os.cpu_count()} cores, shared: measured under load), "
            f"{os.environ.get('OMP_NUM_THREADS', '1')} thread(s), torch {torch.__version__}, transformers "
            f"{transformers.__version__}, TRL {trl.__version__}, Python {platform.python_version()})")


def write_report(args, results: dict) -> None:
    a, t = results["alignkit"], results["trl"]
    speed, memory = a["samples_per_s"] / t["samples_per_s"], a["peak_mb"] / t["peak_mb"]
    cpu_speed = a["samples_per_cpu_s"] / t["samples_per_cpu_s"]
    n = args.prompts * args.generations
    met = [f"samples/s {'met' if min(speed, cpu_speed) >= 1.5 else 'NOT met'} ({speed:.2f}x wall, "
           f"{cpu_speed:.2f}x CPU time; target >= 1.5x)",
           f"peak memory {'met' if memory <= 0.7 else 'NOT met'} ({memory:.2f}x, target <= 0.7x)"]
    lines = [
        _header("GRPO, long completions of varying length, vs TRL's GRPOTrainer"), "",
        f"SmolLM2-135M-Instruct, fp32, no gradient checkpointing, no reference model (beta 0). {args.prompts} "
        f"chat prompts (up to {args.prompt_length} tokens) x {args.generations} samples = {n} sequences per step; "
        f"completions forced to lengths spread evenly over {args.min_new_tokens}..{args.max_new_tokens} new tokens "
        f"(identical on both sides); one HF `generate` call per step; one AdamW update per step over micro-batches "
        f"of {args.micro_batch} rows; {args.steps} timed steps after {args.warmup} warm-up step(s). Peak memory: "
        "max RSS of each run's process at the end of its last step. The machine was shared, so samples per "
        "CPU-second of the run's process (one thread: its compute) are given beside wall-clock samples/s.", "",
        "| run | samples/s (wall) | samples / CPU-s | peak memory (MB) | wall vs TRL | CPU vs TRL | memory vs TRL |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| alignkit GRPO (padding-free, chunked LM head) | {a['samples_per_s']:.4f} | {a['samples_per_cpu_s']:.4f} | "
        f"{a['peak_mb']:.0f} | {speed:.2f}x | {cpu_speed:.2f}x | {memory:.2f}x |",
        f"| TRL {t['trl']} GRPOTrainer | {t['samples_per_s']:.4f} | {t['samples_per_cpu_s']:.4f} | "
        f"{t['peak_mb']:.0f} | 1.00x | 1.00x | 1.00x |", "",
        f"Targets: {'; '.join(met)}.", "",
        "Where the CPU time of a step goes (seconds per step):", "",
        "| run | step | HF `generate` | the rest (log-probs, loss, backward, update) |", "| --- | ---: | ---: | ---: |",
        *[f"| {label} | {r['step_cpu_s']:.1f} | {r['generate_cpu_s']:.1f} | {r['step_cpu_s'] - r['generate_cpu_s']:.1f} |"
          for label, r in (("alignkit", a), ("TRL", t))], "",
        f"Both sides run the same HF `generate` to the longest completion of the batch (finished rows keep "
        f"computing): {a['generate_cpu_s'] / a['step_cpu_s']:.0%} of alignkit's step. Outside generation alignkit's "
        f"step is {(t['step_cpu_s'] - t['generate_cpu_s']) / (a['step_cpu_s'] - a['generate_cpu_s']):.2f}x faster "
        f"(packed rows without padding, LM head chunked on the response positions only); with this generation even "
        f"a free update would give at most {t['step_cpu_s'] / a['generate_cpu_s']:.2f}x TRL's samples/s.", ""]
    section = "\n".join(lines)
    print("\n" + section)
    write_section(args.out, "grpo-trl", f"python benchmarks/bench_grpo_trl.py --steps {args.steps} --warmup "
                  f"{args.warmup} --prompts {args.prompts} --generations {args.generations} --micro-batch "
                  f"{args.micro_batch} --max-new-tokens {args.max_new_tokens}", section)


def write_curve(args, lengths: list[int], curve: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = ROOT / "docs" / "img" / "grpo_memory_vs_length.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("alignkit", "alignkit GRPO"), ("trl", "TRL GRPOTrainer")):
        ax.plot(lengths, [curve[name][L]["peak_mb"] / 1024 for L in lengths], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("max completion length (new tokens)")
    ax.set_ylabel("peak memory (GiB, max RSS)")
    ax.set_title("GRPO peak memory, SmolLM2-135M fp32 CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(img, dpi=120)
    s = CURVE_DEFAULTS
    rows = [f"| {L} | {curve['alignkit'][L]['peak_mb']:.0f} | {curve['trl'][L]['peak_mb']:.0f} | "
            f"{curve['alignkit'][L]['peak_mb'] / curve['trl'][L]['peak_mb']:.2f}x |" for L in lengths]
    lines = [_header("GRPO peak memory vs max completion length"), "",
             f"As above, but {s['prompts']} prompt x {s['generations']} samples, micro-batch {s['micro_batch']}, "
             f"{s['steps']} step per run; completions of {args.min_new_tokens} and L new tokens. The floor "
             "(about 2.7 GiB) is the weights, their gradients and AdamW's two states (allocated after the first "
             "backward): below it a one-step run's activations do not show.", "",
             "![GRPO peak memory vs max completion length](img/grpo_memory_vs_length.png)", "",
             "| max completion length L | alignkit peak (MB) | TRL peak (MB) | alignkit vs TRL |",
             "| ---: | ---: | ---: | ---: |", *rows, ""]
    section = "\n".join(lines)
    print("\n" + section)
    write_section(args.out, "grpo-trl-memory", "python benchmarks/bench_grpo_trl.py --curve "
                  + ",".join(map(str, lengths)), section)


if __name__ == "__main__":
    main()
