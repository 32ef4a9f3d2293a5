"""GRPO on a reasoning-gym task, sized for a CPU, then the held-out accuracy before -> after and the reward curve.

    python -m examples.reasoning.run [--output-dir outputs/reasoning] [--steps 10] [--from STAGE] [--set KEY=VALUE]

It runs the pipeline file ``examples/reasoning/pipeline.yaml`` (the same as ``alignkit pipeline
examples/reasoning/pipeline.yaml``): the base model's greedy held-out accuracy, GRPO with the task's own
verifier as the reward, the trained policy's held-out accuracy on the same prompts, and the reward of each
step. Finished stages are skipped when you run it again, so the numbers print at once.
"""

from __future__ import annotations

import math
from pathlib import Path

PIPELINE = Path(__file__).with_name("pipeline.yaml")


def _show(label: str, acc: dict) -> None:
    for s in acc["samples"]:
        mark = "correct" if s["score"] >= 1.0 else f"wrong, expected {s['reference']}"
        print(f"  {label}: {s['question'].rsplit(':', 1)[-1].strip()} -> {s['completion']!r} ({mark})")


def run(output_dir: str | Path = "outputs/reasoning", steps: int | None = None,
        start_from: str | None = None, overrides: list[str] | None = None) -> dict:
    """Run the pipeline and print its numbers; returns the pipeline's summary."""
    from alignkit.pipeline import run_pipeline
    from examples.reasoning.evaluate import paired_counts, sparkline

    print("== alignkit reasoning example: GRPO on reasoning-gym chain_sum, SmolLM2-135M-Instruct (CPU-sized) ==")
    print(f"pipeline file: {PIPELINE}", flush=True)
    overrides = [f"output_dir={output_dir}"] + ([f"grpo.training.max_steps={steps}"] if steps else []) + list(overrides or [])
    summary = run_pipeline(PIPELINE, overrides=overrides, start_from=start_from)
    stage = {e["stage"]: e for e in summary["stages"]}
    before, after = stage["accuracy_before"]["outputs"], stage["accuracy_after"]["outputs"]
    curve = stage["reward_curve"]["outputs"]
    answers = [Path(stage[s]["output_dir"]) / "answers.jsonl" for s in ("accuracy_before", "accuracy_after")]
    n = len(answers[0].read_text().splitlines())
    se = [math.sqrt(a * (1 - a) / n) for a in (before["accuracy"], after["accuracy"])]
    print(f"\nheld-out accuracy (greedy, {n} held-out prompts): {before['accuracy']:.1%} ± {se[0]:.1%} (base model) -> "
          f"{after['accuracy']:.1%} ± {se[1]:.1%} (after {len(curve['steps'])} GRPO steps; ± = binomial standard error)")
    fixed, broken = paired_counts(*answers)
    print(f"the same {n} prompts: {fixed} answered wrong before and right after, {broken} right before and wrong "
          f"after (net {fixed - broken:+d})")
    print(f"held-out answers with a number: {before['answered']:.0%} -> {after['answered']:.0%}; "
          f"distinct-2 {before['distinct_2']:.3f} -> {after['distinct_2']:.3f} (low = answers collapse into one text)")
    print(f"training reward (mean per step, 1 = correct): {curve['first']:.3f} (first 5 steps) -> "
          f"{curve['last']:.3f} (last 5)\n  {sparkline(curve['values'])}")
    plot = Path(stage["reward_curve"]["output_dir"]) / "reward_curve.png"
    if plot.is_file():
        print(f"  plot: {plot}")
    print("\nheld-out answers, the same prompts before and after:")
    _show("before", before)
    _show("after ", after)
    print(f"\nfinished in {summary['seconds']:.0f} s; the trained model is in {stage['grpo']['output_dir']}")
    return summary


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=f"GRPO on a reasoning-gym task (CPU-sized), as the pipeline file "
                                             f"{PIPELINE.name}, then held-out accuracy before -> after.")
    ap.add_argument("--output-dir", default="outputs/reasoning")
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the pipeline file's)")
    ap.add_argument("--from", dest="start_from", metavar="STAGE", help="start STAGE and the later stages over")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the pipeline file, as alignkit pipeline --set does "
                         "(grpo.training.learning_rate=5e-6); repeatable")
    args = ap.parse_args()
    run(args.output_dir, steps=args.steps, start_from=args.start_from, overrides=args.overrides)


if __name__ == "__main__":
    main()
