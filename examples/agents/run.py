"""GRPO on a multi-turn calculator task, sized for a CPU, then the held-out success before -> after.

    python -m examples.agents.run [--output-dir outputs/agents] [--steps 10] [--from STAGE] [--set KEY=VALUE]

It runs the pipeline file ``examples/agents/pipeline.yaml`` (the same as ``alignkit pipeline
examples/agents/pipeline.yaml``): the data, the base model's greedy held-out episodes, GRPO with the calculator
environment (examples/agents/calculator.py), the trained policy's held-out episodes on the same questions, and
the reward of each step. Finished stages are skipped when you run it again, so the numbers print at once.
"""

from __future__ import annotations

from pathlib import Path

PIPELINE = Path(__file__).with_name("pipeline.yaml")


def _show(title: str, lines: list[str]) -> None:
    print(f"  {title}")
    for line in lines:
        print(f"    {line}")


def run(output_dir: str | Path = "outputs/agents", steps: int | None = None,
        start_from: str | None = None, overrides: list[str] | None = None) -> dict:
    """Run the pipeline and print its numbers; returns the pipeline's summary."""
    from alignkit.pipeline import run_pipeline
    from examples.agents.evaluate import paired
    from examples.reasoning.evaluate import sparkline

    print("== alignkit agents example: GRPO with a calculator tool, multi-turn, SmolLM2-135M-Instruct (CPU-sized) ==")
    print(f"pipeline file: {PIPELINE}", flush=True)
    overrides = [f"output_dir={output_dir}"] + ([f"grpo.training.max_steps={steps}"] if steps else []) + list(overrides or [])
    summary = run_pipeline(PIPELINE, overrides=overrides, start_from=start_from)
    stage = {e["stage"]: e for e in summary["stages"]}
    before, after = stage["success_before"]["outputs"], stage["success_after"]["outputs"]
    curve = stage["reward_curve"]["outputs"]
    pairs = paired(stage["success_before"]["output_dir"], stage["success_after"]["output_dir"])
    print(f"\nheld-out success (greedy whole episodes, {pairs['questions']} held-out questions): "
          f"{before['success']:.1%} (base model) -> {after['success']:.1%} (after {len(curve['steps'])} GRPO steps)")
    print(f"  paired: {pairs['fixed']} fixed, {pairs['broken']} broken, {pairs['both']} solved both times, "
          f"{pairs['neither']} neither")
    print(f"episodes that call the tool: {before['called_tool']:.0%} -> {after['called_tool']:.0%}; "
          f"valid tool calls: {before['tool_call_validity']:.0%} of {before['tool_calls']} -> "
          f"{after['tool_call_validity']:.0%} of {after['tool_calls']}; "
          f"assistant turns per episode: {before['turns']:.2f} -> {after['turns']:.2f}")
    print(f"training reward (mean per step, 1 = solved): {curve['first']:.3f} (first 5 steps) -> "
          f"{curve['last']:.3f} (last 5)\n  {sparkline(curve['values'])}")
    plot = Path(stage["reward_curve"]["output_dir"]) / "reward_curve.png"
    if plot.is_file():
        print(f"  plot: {plot}")
    print("\nheld-out episodes, the same questions before and after:")
    for b, a in zip(before["samples"], after["samples"]):
        _show(f"before ({'solved' if b['reward'] >= 1 else 'not solved'}, answer {b['answer']}):", b["lines"])
        _show(f"after  ({'solved' if a['reward'] >= 1 else 'not solved'}, answer {a['answer']}):", a["lines"])
    for kind, ex in pairs["examples"].items():
        print(f"\na {kind} question:")
        _show("before:", ex["before"])
        _show("after:", ex["after"])
    samples = Path(stage["grpo"]["output_dir"]) / "samples.jsonl"
    print(f"\nfinished in {summary['seconds']:.0f} s; the trained model is in {stage['grpo']['output_dir']}; "
          f"training episodes in {samples}")
    return summary


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=f"GRPO with a calculator tool (CPU-sized), as the pipeline file "
                                             f"{PIPELINE.name}, then held-out success before -> after.")
    ap.add_argument("--output-dir", default="outputs/agents")
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the pipeline file's)")
    ap.add_argument("--from", dest="start_from", metavar="STAGE", help="start STAGE and the later stages over")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the pipeline file, as alignkit pipeline --set does "
                         "(grpo.training.learning_rate=1e-5); repeatable")
    args = ap.parse_args()
    run(args.output_dir, steps=args.steps, start_from=args.start_from, overrides=args.overrides)


if __name__ == "__main__":
    main()
