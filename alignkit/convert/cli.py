"""``alignkit convert state-dict ...`` and ``alignkit convert megatron ...`` (see docs/convert.md)."""

from __future__ import annotations

import argparse
import logging
import sys

from alignkit.convert.common import ALLOW_PICKLE_HELP, DTYPE_CHOICES, ConvertError


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output-dir", required=True, help="the HF folder to write (must not exist, "
                        "or be empty, unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype of the output (auto: the checkpoint's own)")
    parser.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignkit convert",
                                     description="Convert training checkpoints into Hugging Face model folders.")
    sub = parser.add_subparsers(dest="format", required=True)

    p = sub.add_parser("state-dict", help="a raw state dict (.pt/.bin/.safetensors, HALOs, DeepSpeed fp32) + its base",
                       description="A raw state dict (bare or under 'state'/'state_dict'/'module'/'model', with or "
                                   "without module./model. prefixes; one file, a shard index or a folder) plus the "
                                   "base model it was trained from, which gives the config and tokenizer.")
    p.add_argument("checkpoint", help="weights file, *.index.json or folder")
    p.add_argument("--base", required=True, help="base model: HF folder, hub name or asset name")
    _add_common(p)

    p = sub.add_parser("megatron", help="a Megatron GPT checkpoint (torch_dist or mp_rank_* files), Llama family",
                       description="A Megatron-core / Megatron-LM GPT checkpoint of the Llama/Qwen2/Mistral family "
                                   "(torch_dist, or per-rank iter_N/mp_rank_*/model_optim_rng.pt files, any tensor and "
                                   "pipeline parallel sizes). Values not given come from the checkpoint's args (read "
                                   "only with --allow-pickle) or the tensor shapes.")
    p.add_argument("checkpoint", help="the save folder (with latest_checkpointed_iteration.txt), an iter_* folder "
                   "or one rank's file")
    p.add_argument("--tokenizer", required=True, help="tokenizer: HF folder, hub name or asset name")
    p.add_argument("--iteration", type=int, help="iteration to convert (default: the latest)")
    p.add_argument("--num-attention-heads", type=int, help="attention heads (needed unless args are read)")
    p.add_argument("--num-query-groups", type=int, help="key/value heads (default: from the QKV shape)")
    p.add_argument("--head-dim", type=int, help="Megatron's kv_channels (default: from linear_proj's shape)")
    p.add_argument("--rope-theta", type=float, help="Megatron's rotary_base (default 10000)")
    p.add_argument("--norm-eps", type=float, help="RMSNorm epsilon (Megatron's norm_epsilon; default 1e-5)")
    p.add_argument("--max-position-embeddings", type=int, help="context length recorded in the config (default 4096)")
    p.add_argument("--vocab-size", type=int, help="keep this many embedding rows (drops Megatron's vocab padding)")
    _add_common(p)
    return parser


def convert_main(argv: list[str]) -> int:
    """Run ``alignkit convert`` (argv: the words after ``convert``); 0 on success, 2 on a conversion error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: report the status instead of exiting
        return e.code if isinstance(e.code, int) else 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    from alignkit.convert.megatron import convert_megatron
    from alignkit.convert.state_dict import convert_state_dict

    common = dict(dtype=args.dtype, allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    try:
        if args.format == "state-dict":
            path = convert_state_dict(args.checkpoint, args.base, args.output_dir, **common)
        else:
            path = convert_megatron(
                args.checkpoint, args.tokenizer, args.output_dir, iteration=args.iteration,
                num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                head_dim=args.head_dim, rope_theta=args.rope_theta, norm_eps=args.norm_eps,
                max_position_embeddings=args.max_position_embeddings, vocab_size=args.vocab_size, **common)
    except ConvertError as e:
        print(f"alignkit convert: error: {e}", file=sys.stderr)
        return 2
    print(f"converted model written to {path}")
    return 0
