"""Real run for online RL: controlled sentiment on SmolLM2-135M-Instruct (PPO and GRPO).

Prompts are openings of real movie-review snippets ("Continue this movie review: <opening>"); the reward
is a sentiment reward model trained on the human scores (all-MiniLM-L6-v2, its own tokenizer: responses
are decoded and re-tokenized for it). Reports the mean reward on held-out prompts before and after,
the KL to the reference at the end, and saves ``reward_kl.png`` (reward and KL against step).

    python -m examples.sentiment.rl_runs --out outputs/sentiment_rl [--reward-model outputs/sentiment/rm]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import alignkit
from examples.sentiment.evaluation import mean_policy_reward
from examples.sentiment.task import train_reward_model, write_task_files


def run_method(method: str, files: dict, rm: Path, out: Path, steps: int) -> list[dict]:
    common = {"reward": {"model": str(rm)}, "rollout_batch_size": 8, "kl_coef": 0.05, "log_samples": 2}
    generation = {"max_new_tokens": 20, "temperature": 1.0}
    if method == "grpo":
        section = {**common, "generation": {**generation, "num_samples": 4}, "rollout_batch_size": 4,
                   "kl_penalty": "loss", "kl_estimator": "k3", "ppo_epochs": 1}
    else:
        section = {**common, "generation": generation, "ppo_epochs": 2}
    alignkit.train(method, model={"name_or_path": "smollm2-135m-instruct", "dtype": "float32"},
                   data={"train": [str(files["prompts_train"])], "max_length": 96},
                   training={"output_dir": str(out), "max_steps": steps, "per_device_batch_size": 8,
                             "learning_rate": 3e-6, "lr_scheduler": "constant", "overwrite_output_dir": True},
                   **{method: section})
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]


def plot(histories: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in histories.items():
        steps = [r["step"] for r in rows]
        ax_r.plot(steps, [r["reward"] for r in rows], marker="o", ms=3, label=name.upper())
        ax_k.plot(steps, [r.get("kl", float("nan")) for r in rows], marker="o", ms=3, label=name.upper())
    ax_r.set(title="mean reward (sentiment RM) per rollout", xlabel="step", ylabel="reward")
    ax_k.set(title="KL(policy || reference) per sequence", xlabel="step", ylabel="KL")
    for ax in (ax_r, ax_k):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/sentiment_rl")
    ap.add_argument("--reward-model", help="a trained sentiment RM folder (default: train one, ~2 min)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--methods", default="ppo,grpo")
    ap.add_argument("--plot", default=None, help="where to write the PNG (default: OUT/reward_kl.png)")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    files = write_task_files(out / "data")
    rm = Path(args.reward_model) if args.reward_model else train_reward_model(files["rm_train"], out / "rm")
    from alignkit.assets import fetch

    evaluate = dict(reward_model=str(rm), max_new_tokens=20)
    results = {"before": mean_policy_reward(fetch("smollm2-135m-instruct"), files["prompts_eval"], **evaluate)}
    print("before:", results["before"], flush=True)
    histories = {}
    for method in args.methods.split(","):
        histories[method] = run_method(method, files, rm, out / method, args.steps)
        after = mean_policy_reward(out / method, files["prompts_eval"], **evaluate)
        last = histories[method][-3:]
        results[method] = {"heldout_after": after, "steps": args.steps,
                           "train_reward_first": histories[method][0]["reward"],
                           "train_reward_last3": sum(r["reward"] for r in last) / len(last),
                           "kl_last3": sum(r.get("kl", 0.0) for r in last) / len(last)}
        print(f"{method}:", results[method], flush=True)
    plot(histories, Path(args.plot) if args.plot else out / "reward_kl.png")
    results["minutes"] = round((time.time() - t0) / 60, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
