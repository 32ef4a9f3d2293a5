"""Is alignkit's GRPO update TRL's? Both frameworks train on the very same rollouts, then their weights are compared.

The side-by-side run of ``bench_grpo_reasoning_trl.py`` cannot say whether a difference between the two runs
comes from the update or from the samples: each framework samples its own. Here the samples are shared.
alignkit runs the reasoning example's GRPO stage (settings read from ``examples/reasoning/pipeline.yaml``) on
a training set of as many prompts as it draws per step, so that every step draws all of them; its sampler's responses are
recorded step by step. TRL 1.16's GRPOTrainer then trains the same base model with the same settings, its
generation replaced (through its own ``rollout_func`` hook) by the responses alignkit sampled at that step
for that prompt. Both compute the rewards themselves, with the same verifier.

Written to docs/benchmarks.md: per step, the reward, the KL to the reference and the gradient norm each
framework logged; at the end, the distance between the two trained models relative to how far they moved from
the base model, beside a control: TRL against itself with another micro-batch size (the same update summed in
another order, so float32 round-off only). When the updates are the same, both distances are tiny::

    OMP_NUM_THREADS=1 python benchmarks/compare_grpo_update_trl.py [--steps 8] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import bench_grpo_reasoning_trl as side_by_side  # noqa: E402  (its settings and TRL mapping are reused)
from common import write_section  # noqa: E402


def recording_build_sampler(real_build, record: list):
    """``build_sampler`` whose sampler keeps every rollout's (prompt ids, response ids) per call."""

    def build(*a, **k):
        sampler = real_build(*a, **k)
        generate = sampler.generate

        def generate_and_record(model, prompts, **kw):
            rollout = generate(model, prompts, **kw)
            step: dict[str, list[list[int]]] = {}
            for i in range(len(rollout)):
                p = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist()
                r = rollout.response_ids[i][rollout.response_mask[i].bool()].tolist()
                step.setdefault(json.dumps(p), []).append(r)
            record.append(step)
            return rollout

        sampler.generate = generate_and_record
        return sampler

    return build


def run_alignkit(work: Path, steps: int, data: str) -> tuple[list[dict], list[dict], Path]:
    import alignkit.methods.online_rl as online_rl
    from alignkit.api import train
    from alignkit.config import DataSource

    cfg = side_by_side.example_settings()["cfg"]
    cfg.data.train = [DataSource(path=data)]
    cfg.training.max_steps = steps
    cfg.training.output_dir = str(work / "alignkit")
    record: list[dict] = []
    real = online_rl.build_sampler
    online_rl.build_sampler = recording_build_sampler(real, record)
    try:
        train(cfg)
    finally:
        online_rl.build_sampler = real
    logged = [json.loads(x) for x in (work / "alignkit" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return record, [x for x in logged if "reward" in x], work / "alignkit"


def run_trl(work: Path, steps: int, data: str, record: list[dict], micro: int | None = None,
            name: str = "trl") -> tuple[list[dict], Path]:
    """TRL on alignkit's recorded rollouts; ``micro``: another micro-batch size (the same update, summed in
    another order: the control for float32 round-off)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.assets import resolve_model
    from alignkit.config import DataSource
    from alignkit.data.reasoning_gym import FIELD, read_reasoning_gym, score_answer
    from alignkit.rewards.answers import extract_answer

    cfg = side_by_side.example_settings()["cfg"]
    t, g = cfg.training, cfg.method_args
    rows = [r.data for r in read_reasoning_gym(DataSource(path=data))]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "spec": json.dumps(r[FIELD])} for r in rows])
    path = resolve_model(cfg.model.name_or_path) or cfg.model.name_or_path
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")

    def reward(completions, spec, **_):
        return [score_answer(extract_answer(c[0]["content"] if isinstance(c, list) else c, g.reward.answer_extract),
                             json.loads(sp)) for c, sp in zip(completions, spec)]

    calls = {"n": 0}

    def replay(prompts, trainer):  # alignkit's responses of this step, in TRL's order of prompts
        step = record[calls["n"]]
        calls["n"] += 1
        used: dict[str, int] = {}
        prompt_ids, completion_ids = [], []
        for p in prompts:
            ids = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
            key = json.dumps(ids)
            if key not in step:
                raise SystemExit("TRL's prompt tokens differ from alignkit's: the comparison needs the same prompts")
            k = used.get(key, 0)
            used[key] = k + 1
            prompt_ids.append(ids)
            completion_ids.append(step[key][k])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
                "logprobs": [[0.0] * len(c) for c in completion_ids]}

    n = g.rollout_batch_size * g.generation.num_samples
    micro = micro or t.per_device_batch_size
    args = GRPOConfig(
        output_dir=str(work / name), max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=n // micro, num_generations=g.generation.num_samples,
        num_iterations=1, max_completion_length=g.generation.max_new_tokens, temperature=g.generation.temperature,
        top_p=g.generation.top_p, top_k=g.generation.top_k, beta=g.kl_coef, use_bias_correction_kl=g.kl_ratio_weight, epsilon=g.clip_eps,
        loss_type="grpo", scale_rewards=g.scale_rewards, learning_rate=t.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, optim="adamw_torch",
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, disable_dropout=True, seed=t.seed,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0)
    assert (g.loss_agg, t.lr_scheduler, t.warmup_steps, g.kl_penalty, g.kl_estimator) == (
        "seq-mean-token-mean", "constant", 0, "loss", "k3"), "the mapping above covers these settings only"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tok,
                          rollout_func=replay)
    trainer.train()
    trainer.save_model(str(work / f"{name}_model"))
    return [x for x in trainer.state.log_history if "reward" in x], work / f"{name}_model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--keep", default=None, help="keep both trained models in this folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the example's pipeline file (grpo.grpo.kl_ratio_weight=false)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    side_by_side.OVERRIDES[:] = args.overrides
    from transformers import AutoModelForCausalLM

    from alignkit.assets import resolve_model

    cfg = side_by_side.example_settings()["cfg"]
    n_prompts = cfg.method_args.rollout_batch_size  # a training set of one step's prompts: every step draws all
    data = re.sub(r"size=\d+", f"size={n_prompts}", cfg.data.train[0].path)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        record, ak_log, ak_dir = run_alignkit(work, args.steps, data)
        trl_log, trl_dir = run_trl(work, args.steps, data, record)
        micro = cfg.training.per_device_batch_size // 2
        _, control_dir = run_trl(work, args.steps, data, record, micro=micro, name="trl_control")
        path = resolve_model(cfg.model.name_or_path) or cfg.model.name_or_path
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        weights = {name: AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).state_dict()
                   for name, d in (("alignkit", ak_dir), ("trl", trl_dir), ("control", control_dir))}
        base_sd = base.state_dict()

        def distance(a: dict, b: dict) -> float:
            return sum(float((a[k] - b[k]).pow(2).sum()) for k in base_sd) ** 0.5

        moved = {name: distance(sd, base_sd) for name, sd in weights.items()}
        apart, control = distance(weights["alignkit"], weights["trl"]), distance(weights["trl"], weights["control"])
        t, g = cfg.training, cfg.method_args
        section = "\n".join([
            f"### GRPO update: alignkit vs TRL on the same rollouts ({time.strftime('%Y-%m-%d')}, CPU, torch "
            f"{torch.__version__}, TRL {trl_version()}, Python {platform.python_version()})", "",
            f"Model `{cfg.model.name_or_path}`, fp32; the reasoning example's settings ({g.rollout_batch_size} prompts x "
            f"{g.generation.num_samples} samples, learning rate {t.learning_rate:g}, beta {g.kl_coef:g}, k3, "
            f"`kl_ratio_weight: {str(g.kl_ratio_weight).lower()}` = TRL's `use_bias_correction_kl`, temperature "
            f"{g.generation.temperature:g}), {args.steps} steps on a training set of {n_prompts} prompts. alignkit "
            "samples; TRL replays alignkit's responses of each step through its `rollout_func`.", "",
            "| step | reward | KL, alignkit `loss/kl` (sequence mean) | KL, TRL `kl` (token mean) | grad norm alignkit | "
            "grad norm TRL |", "| ---: | ---: | ---: | ---: | ---: | ---: |",
            *[f"| {i} | {a['reward']:.3f} | {a.get('loss/kl', float('nan')):.4f} | {b.get('kl', float('nan')):.4f} | "
              f"{a.get('grad_norm', float('nan')):.4f} | {b.get('grad_norm', float('nan')):.4f} |"
              for i, (a, b) in enumerate(zip(ak_log, trl_log), 1)], "",
            f"Weights moved from the base model (L2): alignkit {moved['alignkit']:.4e}, TRL {moved['trl']:.4e}. "
            f"alignkit vs TRL: {apart:.3e} apart ({apart / moved['trl']:.2%} of TRL's move); TRL vs TRL with "
            f"micro-batches of {micro} (float32 round-off only): {control:.3e} ({control / moved['trl']:.3%})."])
        print("\n" + section)
        command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/compare_grpo_update_trl.py", f"--steps {args.steps}",
                            *(f"--set {o}" for o in args.overrides)])
        write_section(args.out, "grpo-update-trl", command, section)


def trl_version() -> str:
    import trl

    return trl.__version__

if __name__ == "__main__":
    main()
