"""Launch N training processes on this machine, on a free port (never 'port 29500 in use').

``alignkit train ... --num-processes N`` re-runs itself under ``torch.distributed.run`` with a port
the OS just reported free. Inside an existing launcher (``accelerate launch``, ``torchrun``, SLURM)
nothing is re-launched: the environment's ``WORLD_SIZE`` wins.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inside_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_env(num_processes: int, deepspeed: bool) -> dict[str, str]:
    env = dict(os.environ)
    if deepspeed:
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    if not torch.cuda.is_available():
        # share the cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return env


def relaunch(num_processes: int, argv: list[str], deepspeed: bool) -> int:
    """Run ``alignkit <argv>`` in ``num_processes`` local processes; returns the exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_processes}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "alignkit.cli", *argv]
    return subprocess.run(cmd, env=launch_env(num_processes, deepspeed)).returncode
