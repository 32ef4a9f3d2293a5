"""The ``alignkit`` command.

    alignkit train METHOD [CONFIG.yaml] [--set section.key=value ...] [--num-processes N] [--deepspeed zero3]
    alignkit config METHOD              every option with its default and doc
    alignkit assets list | fetch NAME   the offline cache of real models and data
    alignkit merge ADAPTER_DIR OUT_DIR  merge a LoRA adapter into its base model
"""

from __future__ import annotations

import argparse
import sys


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model with METHOD (sft, ...)")
    p.add_argument("method")
    p.add_argument("config", nargs="?", help="YAML config file (optional: defaults + --set work alone)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.learning_rate=1e-5 (repeatable)")
    p.add_argument("--output-dir", help="shortcut for --set training.output_dir=...")
    p.add_argument("--num-processes", type=int, help="processes to launch on this machine (free port chosen)")
    p.add_argument("--deepspeed", help="zero1, zero2, zero3 or a DeepSpeed JSON file")
    p.add_argument("--resume", nargs="?", const="latest", help="resume from the latest checkpoint (or a path)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="alignkit", description="Post-training for Hugging Face LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("config", help="print every option of METHOD with default and doc")
    p.add_argument("method", nargs="?", default="sft")
    p.add_argument("--markdown", action="store_true", help="the reference of every method, as docs/config.md")
    p = sub.add_parser("assets", help="list or fetch the offline real assets")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    p.add_argument("adapter_dir")
    p.add_argument("output_dir")
    args = parser.parse_args(argv)

    from alignkit.api import setup_logging
    from alignkit.config import ConfigError

    setup_logging()
    try:
        if args.command == "train":
            return _train(args, argv)
        if args.command == "config":
            from alignkit.config import describe
            from alignkit.methods import config_class, config_reference

            print(config_reference() if args.markdown else describe(args.method, config_class(args.method)))
            return 0
        if args.command == "assets":
            from alignkit.assets import assets_main

            return assets_main(args.rest)
        if args.command == "merge":
            from alignkit.models import merge_lora

            merge_lora(args.adapter_dir, args.output_dir)
            print(f"merged model written to {args.output_dir}")
            return 0
    except ConfigError as e:
        print(f"alignkit: config error: {e}", file=sys.stderr)
        return 2
    return 1


def _train(args, argv: list[str]) -> int:
    from alignkit.api import load_config, train
    from alignkit.launch import inside_launcher, relaunch

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"training.output_dir={args.output_dir}")
    if args.num_processes:
        overrides.append(f"training.num_processes={args.num_processes}")
    if args.deepspeed:
        overrides.append(f"training.deepspeed={args.deepspeed}")
    if args.resume:
        overrides.append(f"training.resume={args.resume}")
    cfg = load_config(args.method, args.config, overrides)  # validate before launching anything
    if cfg.training.num_processes > 1 and not inside_launcher():
        return relaunch(cfg.training.num_processes, argv, deepspeed=bool(cfg.training.deepspeed))
    result = train(cfg)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        shown = ("step", "train", "eval", "eval_before", "best_of_n", "output_dir")
        summary = {k: v for k, v in result.items() if k in shown}
        print(f"alignkit: done: {summary}")
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()  # a clean exit; an open group can abort a worker at shutdown
    return 0


if __name__ == "__main__":
    sys.exit(main())
