"""Launch N training processes on this machine, on a free port (never 'port 29500 in use').

``alignkit train ... --num-processes N`` starts N copies of itself with the torch.distributed variables
set (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and a port the OS just
reported free. When one process fails the others are stopped, and one line says why: an expected error
(:class:`~alignkit.errors.AlignkitError`) of the lowest failing rank is written to a file the launcher
prints, instead of every process printing its traceback. Inside an existing launcher (``torchrun``,
``accelerate launch``, SLURM) nothing is re-launched: the environment's ``WORLD_SIZE`` wins.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ERROR_DIR_ENV = "ALIGNKIT_ERROR_DIR"  # set for the processes this launcher starts


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


def write_error(message: str) -> bool:
    """Under this launcher: leave ``message`` for it to print (True); elsewhere do nothing (False)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return False
    Path(folder, f"rank-{int(os.environ.get('RANK', '0')):05d}.txt").write_text(message)
    return True


def another_process_failed() -> bool:
    """Under this launcher: whether another process already stopped on an expected error (then this one's
    failure is a consequence, e.g. a collective whose peer is gone, and not worth a traceback)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    return bool(folder) and any(Path(folder).glob("rank-*.txt"))


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def relaunch(num_processes: int, argv: list[str], deepspeed: bool) -> int:
    """Run ``alignkit <argv>`` in ``num_processes`` local processes; returns the exit code (the first
    failure's, 0 when all succeed)."""
    env = launch_env(num_processes, deepspeed)
    port = str(free_port())
    with tempfile.TemporaryDirectory(prefix="alignkit-errors-") as errors:
        procs = []
        for rank in range(num_processes):
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_processes),
                            LOCAL_WORLD_SIZE=str(num_processes), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port, **{ERROR_DIR_ENV: errors})
            procs.append(subprocess.Popen([sys.executable, "-m", "alignkit.cli", *argv], env=rank_env))
        try:
            while True:
                codes = [p.poll() for p in procs]
                failed = [c for c in codes if c not in (None, 0)]
                if failed or all(c == 0 for c in codes):
                    code = failed[0] if failed else 0
                    break
                time.sleep(0.2)
        except KeyboardInterrupt:
            code = 130
        finally:
            _stop(procs)
        messages = sorted(Path(errors).glob("rank-*.txt"))
        if messages:
            print(f"alignkit: error: {messages[0].read_text()}", file=sys.stderr)
    return code
