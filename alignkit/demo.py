"""``alignkit demo``: a real run on embedded defaults, sized for a laptop CPU (a few minutes).

Stage 1 (SFT): fine-tune SmolLM2-135M-Instruct on a slice of the Alpaca demo data, save a standard
HF folder, reload it with plain transformers and print its answer to a held-out instruction.
"""

from __future__ import annotations

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


def sft_stage_config(output_dir: Path, steps: int) -> dict:
    return {
        "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "float32"},
        "data": {"train": [{"path": "alpaca-demo", "limit": 400}], "eval_split": 32, "max_length": 256},
        "training": {"output_dir": str(output_dir), "max_steps": steps, "per_device_batch_size": 4,
                     "gradient_accumulation_steps": 2, "learning_rate": 2e-5, "warmup_steps": 2,
                     "eval_steps": max(1, steps // 2), "overwrite_output_dir": True,
                     "report_to": ["jsonl", "tensorboard"]},
    }


def run_demo(output_dir: str | Path = "outputs/demo", steps: int | None = None) -> dict:
    from alignkit.api import train
    from alignkit.assets import fetch

    out = Path(output_dir)
    t0 = time.time()
    print("== alignkit demo: SmolLM2-135M-Instruct, Alpaca demo data, CPU-sized ==")
    print("fetching real assets (cached after the first run) ...")
    fetch("smollm2-135m-instruct")
    fetch("alpaca-demo")

    print("\n[1/1] SFT: full fine-tuning on Alpaca instructions")
    sft = train("sft", **sft_stage_config(out / "sft", steps or 24))
    print(f"SFT done: train loss {sft['train'].get('loss', float('nan')):.3f}, "
          f"eval loss {sft['eval'].get('eval/loss', float('nan')):.3f}, saved to {sft['output_dir']}")

    question = "Give three tips for staying healthy."
    answer = generate_answer(sft["output_dir"], question)
    print(f"\nQ: {question}\nA (trained model): {answer}\n")
    print(f"demo finished in {time.time() - t0:.0f} s; outputs under {out}/")
    return {"sft": sft, "answer": answer}
