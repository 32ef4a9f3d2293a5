"""Pieces every benchmark shares: device facts, peak memory, and writing a section of docs/benchmarks.md."""

from __future__ import annotations

import resource
from pathlib import Path


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def peak_mb() -> float:
    """Peak memory of this process: max CUDA allocation on a GPU, else max RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_section(out: str | Path, name: str, command: str, section: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers, headed by the command that made it."""
    out = Path(out)
    text = out.read_text() if out.exists() else "# Benchmarks\n\nRegenerate with the commands in each section.\n\n"
    marker = f"<!-- {name} -->"
    block = f"{marker}\n`{command}`\n\n{section.rstrip()}\n{marker}"
    if marker in text:
        pre, _, rest = text.partition(marker)
        text = pre + block + rest.partition(marker)[2]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
