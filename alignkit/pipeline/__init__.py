"""Pipelines: one YAML file that chains training stages and Python steps (SFT -> RM -> PPO, SFT -> DPO, ...).

    alignkit pipeline FILE.yaml [--dry-run] [--from STAGE | --only STAGE] [--set KEY=VALUE ...]
                                [--num-processes N] [--deepspeed zero1|zero2|zero3|FILE.json]

A file lists named stages in order. A training stage names a method and has that method's usual sections,
on top of the file's ``defaults`` (deep-merged: a stage's keys win). A Python stage runs
``fn(**args, output_dir=<its folder>)`` and returns a dict whose keys later stages can use::

    output_dir: outputs/my-pipeline         # stage folders: <output_dir>/<stage name>
    defaults:
      model: {dtype: bfloat16}
    stages:
      - name: sft
        method: sft
        model: {name_or_path: Qwen/Qwen2.5-0.5B-Instruct}
        data: {train: [chat.jsonl]}
      - name: ppo
        method: ppo
        model:
          name_or_path: ${sft.output_dir}    # an earlier stage's output folder
        ppo:
          reward: {model: my-rm-folder}
      - name: eval
        run: my_eval.py:evaluate             # or package.module:function
        args: {model: "${ppo.output_dir}"}
        outputs: [accuracy]                  # the returned keys later stages may use: ${eval.accuracy}

Before anything runs, every reference is checked and every stage's config is built and validated.
Finished stages are recorded in ``<output_dir>/pipeline_state.json`` and skipped on the next run; an
interrupted stage resumes from its latest complete checkpoint. The full story is docs/pipeline.md.

The package: :mod:`~alignkit.pipeline.spec` reads and checks the file and builds each stage's config;
:mod:`~alignkit.pipeline.runner` keeps the state, decides, runs the stages and holds the command line.
"""

from alignkit.pipeline.runner import (
    SUMMARY_FILE,
    ProcessesFailed,
    build_parser,
    format_plan,
    format_summary,
    pipeline_main,
    plan,
    read_state,
    run_pipeline,
)
from alignkit.pipeline.spec import STATE_FILE, Pipeline, Stage, load_pipeline

__all__ = ["STATE_FILE", "SUMMARY_FILE", "Pipeline", "ProcessesFailed", "Stage", "build_parser", "format_plan",
           "format_summary", "load_pipeline", "pipeline_main", "plan", "read_state", "run_pipeline"]
