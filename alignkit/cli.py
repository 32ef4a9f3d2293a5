"""The ``alignkit`` command.

    alignkit train METHOD [CONFIG.yaml] [--set section.key=value ...] [--num-processes N] [--deepspeed zero3 | --fsdp full_shard]
    alignkit config METHOD              every option with its default and doc
    alignkit assets list | fetch NAME   the offline cache of real models and data
    alignkit merge ADAPTER_DIR OUT_DIR  merge a LoRA adapter into its base model
    alignkit convert state-dict|megatron ...  raw state dicts / Megatron checkpoints -> HF folders
    alignkit plot RUN_DIR [RUN_DIR ...]  PNG training curves, several runs overlaid
    alignkit chat MODEL [--compare OTHER]  chat in the terminal (reads stdin line by line when piped)
    alignkit generate MODEL --prompts FILE --out FILE.jsonl  sample (and score) responses, resumable
    alignkit pipeline FILE.yaml [--dry-run] [--from STAGE]  named stages (SFT -> RM -> PPO ...) in one file
    alignkit estimate METHOD [CONFIG.yaml] --gpus N --gpu-memory 40GB  will the run fit, and what would
    alignkit serve MODEL [--host 0.0.0.0 --port 8000]  a vLLM server for generation.sampler: vllm_server

Every expected error (:class:`alignkit.errors.AlignkitError`) is one line on stderr, printed once (rank 0,
or the launcher for the processes it started), and the exit code is 2; ``--debug`` (or
``ALIGNKIT_DEBUG=1``) shows the traceback instead. Like ``python -m``, the current folder is importable, so
``reward.functions: [my_rewards:accuracy]`` finds ``./my_rewards.py``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from alignkit.errors import AlignkitError
from alignkit.methods import METHODS

# commands with their own parser: name -> (module, its main(argv) function, one-line summary); imported on use
OWN_PARSERS = {
    "assets": ("alignkit.assets", "assets_main", "list or fetch the offline real assets"),
    "convert": ("alignkit.convert", "convert_main", "convert raw state dicts or Megatron checkpoints into HF folders"),
    "chat": ("alignkit.chat", "chat_main", "chat with a model in the terminal (--compare: two models)"),
    "generate": ("alignkit.generate", "generate_main", "sample (and score) responses for a prompt file into JSONL"),
    "pipeline": ("alignkit.pipeline", "pipeline_main", "run named stages (SFT -> RM -> PPO, ...) from one YAML file"),
    "estimate": ("alignkit.estimate", "estimate_main",
                 "per-GPU memory of a run by phase: will it fit, and what would make it"),
    "plot": ("alignkit.training.plots", "plot_main", "PNG plots of the training curves of one or more runs, overlaid"),
    "serve": ("alignkit.serve", "serve_main",
              "start a vLLM server for generation.sampler: vllm_server (multi-node: docs/distributed.md)"),
}


def _method_list() -> str:
    width = max(len(name) for name in METHODS)
    return "\n".join(f"  {name:<{width}}  {spec.summary}" for name, spec in METHODS.items())


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="alignkit", formatter_class=raw,
        description="Post-training for Hugging Face LLMs: SFT, reward models, the DPO family, KTO, PPO/RLOO/GRPO, "
                    "distillation, rejection sampling.",
        epilog=f"methods (alignkit train METHOD):\n{_method_list()}\n\nalignkit COMMAND --help tells more; "
               "--debug shows tracebacks.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of expected errors (or "
                                                             "ALIGNKIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model with METHOD", formatter_class=raw,
                       description="Train a model with METHOD from a YAML config and/or --set overrides.",
                       epilog=f"methods:\n{_method_list()}\n\nalignkit config METHOD lists every option.")
    p.add_argument("method", metavar="METHOD", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("config", nargs="?", help="YAML config file (optional: defaults + --set work alone)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.learning_rate=1e-5 (repeatable)")
    p.add_argument("--output-dir", help="shortcut for --set training.output_dir=...")
    p.add_argument("--num-processes", type=int, help="processes to launch on this machine (free port chosen)")
    p.add_argument("--deepspeed", help="zero1, zero2, zero3 or a DeepSpeed JSON file")
    p.add_argument("--fsdp", choices=["full_shard", "shard_grad_op"], help="PyTorch FSDP2 instead of DeepSpeed "
                                                                           "(full_shard is like ZeRO-3)")
    p.add_argument("--resume", nargs="?", const="latest", help="resume from the latest checkpoint (or a path)")

    p = sub.add_parser("config", help="print every option of METHOD with its default and doc",
                       formatter_class=raw, epilog=f"methods:\n{_method_list()}")
    p.add_argument("method", nargs="?", default="sft", metavar="METHOD", help="default: sft")
    p.add_argument("--markdown", action="store_true", help="the reference of every method, as docs/config.md")
    for name, (_, _, summary) in OWN_PARSERS.items():  # these parse the rest of the line themselves
        sub.add_parser(name, help=summary, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    p.add_argument("adapter_dir")
    p.add_argument("output_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("ALIGNKIT_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] and argv[0] in OWN_PARSERS:  # their own parsers take the rest
        args = argparse.Namespace(command=argv[0], rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())

    from alignkit.api import setup_logging

    setup_logging()
    debug_before = os.environ.get("ALIGNKIT_DEBUG")
    if debug:
        os.environ["ALIGNKIT_DEBUG"] = "1"  # the processes a launch starts inherit it
    try:
        return _run(args, argv)
    except AlignkitError as e:
        if debug:
            raise
        return report_error(str(e))
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130
    except Exception:
        from alignkit.launch import another_process_failed

        if not debug and another_process_failed():
            return 3  # a collective broke because a peer stopped on an error the launcher prints
        raise
    finally:  # a main() called in-process (API users, tests) leaves the caller's environment as it was
        if debug_before is None:
            os.environ.pop("ALIGNKIT_DEBUG", None)


def report_error(message: str) -> int:
    """Print an expected error as one line, once: from rank 0, or through the launcher that started us."""
    from alignkit.launch import write_error

    line = " ".join(message.split())
    if not write_error(line) and os.environ.get("RANK", "0") == "0":
        print(f"alignkit: error: {line}", file=sys.stderr)
    return 2


def _run(args, argv: list[str]) -> int:
    if args.command == "train":
        return _train(args, argv)
    if args.command == "config":
        from alignkit.config import describe
        from alignkit.methods import config_class, config_reference

        print(config_reference() if args.markdown else describe(args.method, config_class(args.method)))
        return 0
    if args.command in OWN_PARSERS:
        module, function, _ = OWN_PARSERS[args.command]
        return getattr(importlib.import_module(module), function)(args.rest)
    if args.command == "merge":
        from alignkit.models import merge_lora

        merge_lora(args.adapter_dir, args.output_dir)
        print(f"merged model written to {args.output_dir}")
        return 0
    return 1


def _train(args, argv: list[str]) -> int:
    from alignkit.api import load_config, train
    from alignkit.config import ConfigError
    from alignkit.launch import inside_launcher, relaunch

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"training.output_dir={args.output_dir}")
    if args.num_processes is not None:  # 0 too: refused, not ignored
        if args.num_processes < 1:
            raise ConfigError(f"--num-processes {args.num_processes}: must be at least 1 (the processes to start on "
                              "this machine).")
        overrides.append(f"training.num_processes={args.num_processes}")
    if args.deepspeed:
        overrides.append(f"training.deepspeed={args.deepspeed}")
    if args.fsdp:
        overrides.append(f"training.fsdp={args.fsdp}")
    if args.resume:
        overrides.append(f"training.resume={args.resume}")
    cfg = load_config(args.method, args.config, overrides)  # validate before launching anything
    if cfg.training.num_processes > 1 and not inside_launcher():
        return relaunch(cfg.training.num_processes, argv, deepspeed=bool(cfg.training.deepspeed))
    result = train(cfg)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        from alignkit.training.summary import format_summary

        print(format_summary(result), flush=True)  # the full result: output_dir/summary.json
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()  # a clean exit; an open group can abort a worker at shutdown
    return 0


if __name__ == "__main__":
    sys.exit(main())
