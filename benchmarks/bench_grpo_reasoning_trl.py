"""The CPU reasoning example side by side with TRL: the same GRPO run in alignkit and in TRL's GRPOTrainer.

Both sides train SmolLM2-135M-Instruct on the example's reasoning-gym task with the settings of
``examples/reasoning/pipeline.yaml`` (read from that file, so the two cannot drift apart), and both are scored
on the example's held-out prompts by the example's own greedy evaluation. The alignkit side runs the
pipeline's ``grpo`` stage itself; the TRL side maps each setting (``MAPPING`` below, written into
docs/benchmarks.md):

- the same training prompts (the task's train split, in chat form) and held-out prompts (its test split);
- the same reward: the task's own verifier on the last number of each completion
  (``alignkit.rewards.answers.extract_answer`` + ``alignkit.data.reasoning_gym.score_answer``);
- the same model, fp32 on CPU, no gradient checkpointing, dropout off; the same learning rate, constant
  schedule, AdamW settings, gradient clipping, seed; per step the same prompts x samples, one optimizer
  update over them, the same max new tokens and temperature, the same KL (k3 as a loss term, beta) and
  loss aggregation (GRPO's per-sequence token mean), group-normalised advantages.

Not made equal: the order in which the prompts are drawn and the sampling random streams (each framework
seeds its own), so the two runs see different samples; with 128 held-out prompts a difference of a few
points between the two after-training accuracies is within noise.

Each side is its own subprocess. Throughput: completions per second over the steps after the first (the
first step carries start-up costs), measured under whatever load the machine has; both sides run in one
invocation, one after the other, so their ratio is fair when the load stays steady. The command of the
measurement in docs/benchmarks.md is written above it (``--set`` items for a shorter run than the example's):

    OMP_NUM_THREADS=1 python benchmarks/bench_grpo_reasoning_trl.py [--set grpo.training.max_steps=8 ...]

Whether the two updates are the same is checked separately, on shared rollouts: compare_grpo_update_trl.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))  # the examples package (the reasoning task's evaluation)

from common import write_section  # noqa: E402

PIPELINE = ROOT / "examples" / "reasoning" / "pipeline.yaml"

MAPPING = """| setting | alignkit (`grpo:` / `training:` of the pipeline file) | TRL `GRPOConfig` |
| --- | --- | --- |
| prompts x samples per step | `rollout_batch_size` x `generation.num_samples` | `generation_batch_size` / `num_generations` x `num_generations` |
| optimizer updates per step | 1: `per_device_batch_size` x `gradient_accumulation_steps` = all samples | 1: `per_device_train_batch_size` x `gradient_accumulation_steps` = `generation_batch_size`, `num_iterations=1` |
| steps | `training.max_steps` (rollouts) | `max_steps` (optimizer updates = generations here) |
| loss aggregation | `loss_agg: seq-mean-token-mean` (default) | `loss_type="grpo"` |
| advantages | `scale_rewards: group` (default): (r - group mean) / (group std + 1e-4) | `scale_rewards="group"` |
| KL | `kl_coef` beta, `kl_penalty: loss`, `kl_estimator: k3`, `kl_ratio_weight: true` (the others defaults) | `beta`, k3 added to the per-token loss, `use_bias_correction_kl=True` (its default) |
| clipping | `clip_eps: 0.2` (ratio is 1: one update per rollout) | `epsilon=0.2` |
| sampling | `generation.temperature`, `top_p: 1`, `top_k: 0`, `max_new_tokens` | `temperature`, `top_p=1.0`, `top_k=0`, `max_completion_length` |
| optimizer | AdamW, `learning_rate`, constant, no warm-up, `weight_decay`, `max_grad_norm` | `adamw_torch`, the same values |
| precision | fp32, no gradient checkpointing | `bf16=False`, `use_cpu=True`, `gradient_checkpointing=False` |"""


OVERRIDES: list[str] = []  # --set items, for the pipeline file (a shorter run, another model)


def example_settings() -> dict:
    """The pipeline file's grpo stage as a full RunConfig, and its held-out evaluation arguments."""
    from alignkit.api import build_config
    from alignkit.pipeline import load_pipeline

    p = load_pipeline(PIPELINE, OVERRIDES)
    grpo = p.stage("grpo")
    cfg = build_config("grpo", {k: v for k, v in grpo.body.items() if k != "method"})
    ev = dict(p.stage("accuracy_before").body["args"])
    ev.pop("model_dir")
    return {"cfg": cfg, "eval": ev}


def evaluate(model_dir: str | Path, out: Path) -> dict:
    from examples.reasoning.evaluate import held_out_accuracy

    return held_out_accuracy(model_dir, **example_settings()["eval"], output_dir=out)


def run_alignkit(work: Path) -> dict:
    """The example's own grpo stage (``alignkit pipeline ... --only grpo``), then the held-out evaluation."""
    from alignkit.pipeline import run_pipeline

    out = work / "alignkit"
    t0 = time.perf_counter()
    summary = run_pipeline(PIPELINE, overrides=[*OVERRIDES, f"output_dir={out}"], only="grpo")
    wall = time.perf_counter() - t0
    run_dir = Path(next(e["output_dir"] for e in summary["stages"] if e["stage"] == "grpo"))
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    logged = [x for x in logged if "reward" in x]
    ends = [x["time"] for x in logged]
    return {"ends": ends, "wall_s": wall, "reward": [x["reward"] for x in logged],
            "kl": [x.get("loss/kl") for x in logged], "after": evaluate(run_dir, work / "alignkit_eval")}


def run_trl(work: Path) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.assets import resolve_model
    from alignkit.data.reasoning_gym import FIELD, read_reasoning_gym, score_answer
    from alignkit.rewards.answers import extract_answer

    s = example_settings()
    cfg = s["cfg"]
    t, g = cfg.training, cfg.method_args
    extract = g.reward.answer_extract
    torch.manual_seed(t.seed)
    rows = [r.data for src in cfg.data.train for r in read_reasoning_gym(src)]
    data = Dataset.from_list([{"prompt": r["prompt"], "spec": json.dumps(r[FIELD])} for r in rows])

    def reasoning_gym_reward(completions, spec, **_):  # the example's reward: verifier on the last number
        return [score_answer(extract_answer(c[0]["content"] if isinstance(c, list) else c, extract), json.loads(sp))
                for c, sp in zip(completions, spec)]

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.time())

    n = g.rollout_batch_size * g.generation.num_samples
    args = GRPOConfig(
        output_dir=str(work / "trl"), max_steps=t.max_steps, per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=n // t.per_device_batch_size, num_generations=g.generation.num_samples,
        num_iterations=g.ppo_epochs, max_completion_length=g.generation.max_new_tokens,
        temperature=g.generation.temperature, top_p=g.generation.top_p, top_k=g.generation.top_k,
        beta=g.kl_coef, use_bias_correction_kl=g.kl_ratio_weight, epsilon=g.clip_eps, loss_type={"seq-mean-token-mean": "grpo", "token-mean": "dapo",
                                                       "seq-mean-token-sum-norm": "dr_grpo"}[g.loss_agg],
        scale_rewards=g.scale_rewards, learning_rate=t.learning_rate, lr_scheduler_type="constant",
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, optim="adamw_torch",
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, disable_dropout=True, seed=t.seed,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0)
    assert (t.lr_scheduler, g.kl_penalty, g.kl_estimator, g.ppo_epochs) == ("constant", "loss", "k3", 1), \
        "the mapping above covers these settings only"
    path = resolve_model(cfg.model.name_or_path) or cfg.model.name_or_path
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reasoning_gym_reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    logged = [x for x in trainer.state.log_history if "reward" in x]
    trainer.save_model(str(work / "trl_model"))
    tok.save_pretrained(str(work / "trl_model"))
    return {"ends": ends, "wall_s": wall, "reward": [x["reward"] for x in logged], "kl": [x.get("kl") for x in logged],
            "after": evaluate(work / "trl_model", work / "trl_eval"), "trl": trl.__version__,
            "transformers": transformers.__version__}


def run_base(work: Path) -> dict:
    from alignkit.pipeline import load_pipeline

    base = load_pipeline(PIPELINE, OVERRIDES).stage("accuracy_before").body["args"]["model_dir"]
    return {"after": evaluate(base, work / "base_eval")}


RUNS = {"base": run_base, "alignkit": run_alignkit, "trl": run_trl}


def paired(before: Path, after: Path) -> tuple[int, int]:
    """(fixed, broken): held-out prompts wrong before and right after, and the reverse."""
    from examples.reasoning.evaluate import paired_counts

    return paired_counts(before / "answers.jsonl", after / "answers.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=list(RUNS), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--keep", default=None, help="keep the runs (models, answers) in this folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the pipeline file on both sides (grpo.training.max_steps=5)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    OVERRIDES[:] = args.overrides
    if args.only:  # child process: one side
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print("RESULT " + json.dumps(RUNS[args.only](Path(args.work))), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in RUNS:
            env = dict(os.environ, WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                       TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            t0 = time.perf_counter()
            sets = [x for o in args.overrides for x in ("--set", o)]
            proc = subprocess.run([sys.executable, __file__, "--only", name, "--work", str(work), *sets],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            results[name] = json.loads(line[0][7:])
            print(f"{name}: held-out accuracy {results[name]['after']['accuracy']:.1%} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        for name in ("alignkit", "trl"):
            results[name]["paired"] = paired(work / "base_eval", work / f"{name}_eval")
        (work / "results.json").write_text(json.dumps(results, indent=1))
    write_report(args, results)


def write_report(args, results: dict) -> None:
    import torch

    cfg = example_settings()["cfg"]
    g, t = cfg.method_args, cfg.training
    n = g.rollout_batch_size * g.generation.num_samples
    base = results["base"]["after"]
    prompts = base["prompts"]

    def acc(a: dict) -> str:
        p = a["accuracy"]
        return f"{p:.1%} ± {math.sqrt(p * (1 - p) / prompts):.1%} ({round(p * prompts)}/{prompts})"

    def speed(r: dict) -> float:
        e = r["ends"]
        return n * (len(e) - 1) / (e[-1] - e[0])

    def first_last(v: list[float]) -> str:
        k = min(5, len(v))
        return f"{sum(v[:k]) / k:.3f} -> {sum(v[-k:]) / k:.3f}"

    rows = []
    for name, label in (("alignkit", "alignkit GRPO"), ("trl", f"TRL {results['trl']['trl']} GRPOTrainer")):
        r = results[name]
        fixed, broken = r["paired"]
        kl = [x for x in r["kl"] if x is not None]
        rows.append(f"| {label} | {acc(r['after'])} | {fixed} / {broken} | {r['after']['distinct_2']:.3f} | "
                    f"{first_last(r['reward'])} | {kl[-1] if kl else float('nan'):.3f} | {speed(r):.2f} | "
                    f"{r['wall_s']:.0f} |")
    ratio = speed(results["alignkit"]) / speed(results["trl"])
    lines = [
        f"### GRPO on the reasoning example vs TRL's GRPOTrainer ({time.strftime('%Y-%m-%d')}, CPU "
        f"({os.cpu_count()} cores, shared, measured under load), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, "
        f"torch {torch.__version__}, transformers {results['trl']['transformers']}, Python {platform.python_version()})",
        "",
        f"Model `{cfg.model.name_or_path}`, fp32. Task: `{cfg.data.train[0].path}`. {t.max_steps} steps of "
        f"{g.rollout_batch_size} prompts x {g.generation.num_samples} samples ({n} completions, one AdamW update "
        f"per step), learning rate {t.learning_rate:g} constant, beta (KL) {g.kl_coef:g}, temperature "
        f"{g.generation.temperature:g}, {g.generation.max_new_tokens} new tokens at most, seed {t.seed}. Held-out: "
        f"greedy answers to the test split's first {prompts} prompts, scored by the task's verifier on the last "
        f"number (± is the binomial standard error). Base model: {acc(base)}, distinct-2 {base['distinct_2']:.3f}.",
        "",
        "| run | held-out accuracy after | fixed / broken vs base | distinct-2 | reward (first 5 -> last 5 steps) "
        "| KL per token at the last step | completions/s | training wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows, "",
        f"alignkit's throughput is {ratio:.2f}x TRL's (completions per second over steps 2 to {t.max_steps}). "
        "Fixed / broken: held-out prompts the base model got wrong and the trained one right, and the reverse. "
        "The two runs draw prompts and samples from their own random streams, so their accuracies differ by "
        "chance as well. KL per token: k3 to the base model, averaged over each sequence's tokens and then "
        "the sequences (alignkit's `loss/kl`) or over all tokens of the batch (TRL's `kl`).", "",
        "How the settings map:", "", MAPPING, ""]
    section = "\n".join(lines)
    print("\n" + section)
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/bench_grpo_reasoning_trl.py",
                        *(f"--set {o}" for o in args.overrides)])
    write_section(args.out, "grpo-reasoning-trl", command, section)


if __name__ == "__main__":
    main()
