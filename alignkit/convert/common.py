"""Pieces shared by the converters: the error type, safe file reading, dtype choice and writing the HF folder.

Reading is safe by default: ``torch.load(weights_only=True)`` refuses any pickled Python object other
than tensors and plain containers, so a checkpoint cannot run code while it is read. A file that needs
more (Megatron-LM pickles its ``args`` Namespace and numpy RNG state) loads only when the caller passes
``allow_pickle=True`` (``--allow-pickle``), because unpickling a file can execute arbitrary code from it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.errors import AlignkitError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ALLOW_PICKLE_HELP = (
    "also read pickled Python objects (e.g. Megatron-LM's args). Unpickling can run arbitrary code "
    "from the file: use this only for checkpoints you trust."
)
DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes; torch loads only when a conversion runs
DTYPE_CHOICES = ["auto", *DTYPES]


class ConvertError(AlignkitError, ValueError):
    """A checkpoint cannot be converted; the message names the file or key and the fix."""


class PickleRequired(ConvertError):
    """The file holds pickled Python objects and ``allow_pickle`` was not given."""


def first_line(error: BaseException) -> str:
    """An exception's first line (up to 200 characters): errors here stay one line."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _weights_only_refusal(error: Exception) -> str:
    """What weights_only refused (e.g. ``argparse.Namespace``), from torch's long multi-line message."""
    text = str(error)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match:
        return match.group(1)
    match = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    return match.group(1).strip()[:200] if match else first_line(error)


def load_torch_file(path: Path, allow_pickle: bool = False) -> Any:
    """``torch.load`` on the CPU, tensors and plain containers only unless ``allow_pickle``."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        refusal = _weights_only_refusal(e)
        if allow_pickle or refusal.startswith("Unsupported operand"):  # not a pickle at all
            raise ConvertError(f"{path}: not a readable torch checkpoint ({refusal}).") from e
        raise PickleRequired(
            f"{path}: holds pickled Python objects ({refusal}), which are not read by default; pass "
            "--allow-pickle (allow_pickle=True) only if you trust the file, since unpickling can run arbitrary "
            "code from it."
        ) from None
    except ModuleNotFoundError as e:
        raise ConvertError(f"{path}: its pickled objects need the Python module {e.name!r}; install the package "
                           f"that provides it (for Megatron-LM checkpoints: pip install megatron-core).") from e
    except Exception as e:  # torch.load fails in many ways on a damaged or foreign file (KeyError, RuntimeError...)
        raise ConvertError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first_line(e)}).") from e


def output_dtype(choice: str, tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    """``auto``: the floating dtype holding most of the checkpoint's elements; else the named dtype."""
    import torch

    if choice != "auto":
        if choice not in DTYPES:
            raise ConvertError(f"dtype {choice!r} is not one of: {', '.join(DTYPE_CHOICES)}.")
        return getattr(torch, choice)
    elements: dict[torch.dtype, int] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.numel()
    return max(elements, key=elements.get) if elements else torch.float32


def cast_floating(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def resolve_pretrained(name_or_path: str, what: str) -> str:
    """A model asset name, a local HF folder or a hub name -> what ``from_pretrained`` takes."""
    from alignkit.assets import resolve_model

    asset = resolve_model(name_or_path)
    if asset is not None:
        return str(asset)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists() or name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        raise ConvertError(f"{what} {name_or_path!r}: no such folder; give an HF model folder, a hub name or a "
                           "model asset (`alignkit assets list`).")
    return name_or_path


def load_tokenizer(source: str, what: str) -> Any:
    """The tokenizer of a resolved folder / hub name, unchanged (it is copied into the output as is)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{what} {source!r}: no tokenizer could be loaded from it ({first_line(e)}).") from e


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ConvertError(f"{output_dir}: already exists and is not empty; choose another output folder "
                           "or pass --overwrite.")


def save_hf_folder(config: Any, state_dict: dict[str, torch.Tensor], output_dir: Path, tokenizer: Any,
                   generation_config: Any = None, overwrite: bool = False) -> Path:
    """Write ``state_dict`` (HF names, final dtype) as a normal HF folder with ``config`` and ``tokenizer``.

    The model is built on the meta device and takes the tensors as they are (no second copy, no random
    init); the folder is assembled next to ``output_dir`` and renamed into place when complete.
    """
    import torch
    from transformers import AutoModelForCausalLM

    check_output_dir(output_dir, overwrite)
    dtypes = {t.dtype for t in state_dict.values() if t.is_floating_point()}
    config.dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:  # the converters check keys first: this is a converter bug
        raise RuntimeError(f"converted weights do not fit {type(model).__name__}: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    if generation_config is not None:
        model.generation_config = generation_config

    output_dir = output_dir.expanduser().resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.converting-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if output_dir.is_dir():
            shutil.rmtree(output_dir)
        elif output_dir.exists():  # a file, replaced with --overwrite
            output_dir.unlink()
        os.rename(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Wrote %s (%s, %s, %d tensors).", output_dir, type(model).__name__,
                str(config.dtype).removeprefix("torch."), len(state_dict))
    return output_dir


def short_list(items: list[str], limit: int = 6) -> str:
    """``a, b, c (+N more)``: keeps one-line errors one line."""
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
