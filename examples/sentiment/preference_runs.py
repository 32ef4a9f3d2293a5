"""Real runs for reward modelling and offline preference optimisation on human-labelled movie reviews.

1. Reward model: all-MiniLM-L6-v2 (an encoder with its own tokenizer) trained pairwise on review pairs
   ordered by their mean human sentiment score; held-out pairwise accuracy.
2. DPO and KTO on SmolLM2-135M-Instruct: "Write a short movie review." with positive reviews preferred
   over negative ones; held-out preference accuracy (log-likelihood of chosen > rejected) before/after.

    python -m examples.sentiment.preference_runs --out outputs/sentiment   # ~15 min on 2 CPU cores

Writes ``results.json`` in ``--out``; the numbers we got are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import alignkit
from examples.sentiment.evaluation import policy_preference_accuracy, reward_model_accuracy
from examples.sentiment.task import write_task_files


def train_reward_model(files: dict, out: Path, steps: int) -> dict:
    res = alignkit.train(
        "rm",
        model={"name_or_path": "all-minilm-l6-v2", "dtype": "float32"},
        data={"train": [str(files["rm_train"])], "eval": [str(files["rm_eval"])], "max_length": 128},
        training={"output_dir": str(out), "max_steps": steps, "per_device_batch_size": 16,
                  "learning_rate": 5e-5, "warmup_steps": 10, "eval_steps": max(1, steps // 3),
                  "overwrite_output_dir": True},
    )
    acc = reward_model_accuracy(out, files["rm_eval"], max_length=128)
    return {"heldout_accuracy": acc["accuracy"], "heldout_mean_margin": acc["mean_margin"],
            "heldout_pairs": acc["pairs"], "reward_mean": res.get("alignkit_reward_mean"),
            "reward_std": res.get("alignkit_reward_std"), "steps": steps}


def train_policy(method: str, files: dict, out: Path, steps: int) -> dict:
    data_key = "kto_train" if method == "kto" else "dpo_train"
    res = alignkit.train(
        method,
        model={"name_or_path": "smollm2-135m-instruct", "dtype": "float32"},
        data={"train": [str(files[data_key])], "max_length": 128},
        training={"output_dir": str(out), "max_steps": steps, "per_device_batch_size": 4,
                  "gradient_accumulation_steps": 2, "learning_rate": 5e-6, "warmup_steps": 4,
                  "overwrite_output_dir": True},
        **{method: {"beta": 0.1}},
    )
    after = policy_preference_accuracy(out, files["dpo_eval"], max_length=128)
    return {"steps": steps, "final_train_metrics": res["train"],
            "heldout_accuracy_after": after["accuracy"],
            "heldout_accuracy_length_normalised_after": after["accuracy_length_normalised"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/sentiment")
    ap.add_argument("--rm-steps", type=int, default=120)
    ap.add_argument("--policy-steps", type=int, default=40)
    ap.add_argument("--methods", default="dpo,kto")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    files = write_task_files(out / "data")
    results: dict = {"reward_model": train_reward_model(files, out / "rm", args.rm_steps)}
    print("reward model:", results["reward_model"], flush=True)

    from alignkit.assets import fetch

    before = policy_preference_accuracy(fetch("smollm2-135m-instruct"), files["dpo_eval"], max_length=128)
    results["policy_before"] = before
    print("SmolLM2 before:", before, flush=True)
    for method in args.methods.split(","):
        results[method] = train_policy(method, files, out / method, args.policy_steps)
        print(f"{method}:", results[method], flush=True)
    results["minutes"] = round((time.time() - t0) / 60, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
