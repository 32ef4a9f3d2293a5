"""Real runs for distillation and rejection sampling.

1. Distillation: SmolLM2-135M-Instruct (teacher) into a half-depth student (every other layer of the
   teacher, so it starts close) on the Alpaca demo instructions; the student's held-out per-token
   KL(teacher || student) before and after, for supervised KD and for on-policy GKD.
2. Best-of-N: on openings of real movie reviews, sample N responses per prompt from SmolLM2 and keep the
   one the sentiment reward model scores highest; mean reward of best-of-N vs a single sample.

    python -m examples.sentiment.distill_and_best_of_n --out outputs/distill [--reward-model outputs/sentiment/rm]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import alignkit
from examples.sentiment.task import train_reward_model, write_task_files


def half_depth_student(teacher_dir: Path, out: Path) -> Path:
    """Keep layers 0, 2, 4, ... of the teacher: a student sharing its tokenizer and most of its knowledge."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    keep = list(range(0, teacher.config.num_hidden_layers, 2))
    teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in keep])
    for new_index, layer in enumerate(teacher.model.layers):
        layer.self_attn.layer_idx = new_index
    teacher.config.num_hidden_layers = len(keep)
    if getattr(teacher.config, "layer_types", None):
        teacher.config.layer_types = [teacher.config.layer_types[i] for i in keep]
    teacher.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def distill(method: str, student: Path, out: Path, steps: int, lr: float, gkd_beta: float = 0.5) -> dict:
    section = {"teacher": "smollm2-135m-instruct", "eval_before": True}
    if method == "gkd":
        section.update({"lmbda": 0.5, "beta": gkd_beta, "generation": {"max_new_tokens": 32, "temperature": 0.9}})
    else:
        section.update({"divergence": "forward_kl"})
    res = alignkit.train(method, model={"name_or_path": str(student), "dtype": "float32"},
                         data={"train": [{"path": "alpaca-demo", "limit": 600}], "eval_split": 48, "max_length": 192},
                         training={"output_dir": str(out), "max_steps": steps, "per_device_batch_size": 4,
                                   "learning_rate": lr, "warmup_steps": 3, "overwrite_output_dir": True},
                         **{method: section})
    return {"kl_to_teacher_before": res["eval_before"].get("eval/kl_to_teacher"),
            "kl_to_teacher_after": res["eval"].get("eval/kl_to_teacher"), "steps": steps, "lr": lr,
            **({"beta": gkd_beta} if method == "gkd" else {})}


def best_of_n(files: dict, rm: Path, out: Path, n: int) -> dict:
    res = alignkit.train("rejection_sampling", model={"name_or_path": "smollm2-135m-instruct", "dtype": "float32"},
                         data={"train": [str(files["prompts_eval"])], "max_length": 96},
                         training={"output_dir": str(out), "overwrite_output_dir": True},
                         rejection_sampling={"reward": {"model": str(rm)},
                                             "generation": {"num_samples": n, "max_new_tokens": 24},
                                             "train_sft": False})
    return res["best_of_n"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/distill")
    ap.add_argument("--reward-model", help="sentiment RM folder (python -m examples.sentiment.preference_runs makes one)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gkd-beta", type=float, default=0.5, help="GKD beta: 0 forward KL, 1 reverse KL, else JSD")
    ap.add_argument("--parts", default="kd,gkd,best_of_n")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    from alignkit.assets import fetch

    results: dict = {}
    parts = args.parts.split(",")
    if {"kd", "gkd"} & set(parts):
        student = half_depth_student(fetch("smollm2-135m-instruct"), out / "student-init")
        for method in ("kd", "gkd"):
            if method in parts:
                results[method] = distill(method, student, out / method, args.steps, args.lr, args.gkd_beta)
                print(f"{method}:", results[method], flush=True)
    if "best_of_n" in parts:
        files = write_task_files(out / "data")
        rm = (Path(args.reward_model) if args.reward_model
              else train_reward_model(files["rm_train"], out / "rm", steps=100))
        results["best_of_n"] = best_of_n(files, rm, out / "best_of_n", args.n)
        print("best_of_n:", results["best_of_n"], flush=True)
    results["minutes"] = round((time.time() - t0) / 60, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
