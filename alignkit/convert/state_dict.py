"""Raw state dicts -> a Hugging Face model folder, given the base model they were trained from.

Recognised inputs (``checkpoint``):

- a ``.safetensors`` file, or a ``.pt`` / ``.bin`` / ``.pth`` / ``.ckpt`` file written by ``torch.save``;
- a folder or ``*.index.json`` of sharded weights (``model-00001-of-00002.safetensors`` ..., or
  ``pytorch_model-0000N-of-...bin``), e.g. the output of DeepSpeed's ``zero_to_fp32.py``; a folder
  holding exactly one weights file is read as that file.

Inside a torch file the state dict may be bare (DeepSpeed's consolidated fp32 ``pytorch_model.bin``) or
wrapped: under ``"state"`` (HALOs' ``policy.pt``), ``"state_dict"`` (Lightning), ``"model_state_dict"``,
``"module"`` or ``"model"``. Key prefixes added by wrappers (``module.`` from DDP/DeepSpeed, ``_orig_mod.``
from ``torch.compile``, an outer ``model.``) are removed, and a base-model-only state dict (``layers.0...``)
gets the ``model.`` prefix, as long as the result names the base model's parameters.

The base model (HF folder, hub name or ``alignkit assets`` name) gives the architecture, config and
tokenizer. Every parameter must be matched, with the same shape, or the error lists what is missing,
unexpected or mis-shaped. Tied embeddings: a checkpoint without ``lm_head.weight`` (or with a copy equal to
the embeddings) keeps them tied; an ``lm_head.weight`` that differs unties them in the written config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from alignkit.convert.common import (
    ConvertError,
    cast_floating,
    check_output_dir,
    first_line,
    load_tokenizer,
    load_torch_file,
    output_dtype,
    resolve_pretrained,
    save_hf_folder,
    short_list,
)

logger = logging.getLogger(__name__)

WRAPPER_KEYS = ("state", "state_dict", "model_state_dict", "module", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.", "model.")
# Buffers some older checkpoints saved; transformers rebuilds them from the config.
DERIVED_BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)
TORCH_SUFFIXES = (".pt", ".bin", ".pth", ".ckpt")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _is_tensor_dict(obj: object) -> bool:
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) or v is None for v in obj.values())
            and any(isinstance(v, torch.Tensor) for v in obj.values()))


def extract_state_dict(obj: object, where: str) -> dict[str, torch.Tensor]:
    """The tensor dict in a loaded torch file: bare, or under one of the usual wrapper keys."""
    if _is_tensor_dict(obj):
        found = obj
    else:
        found = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and _is_tensor_dict(obj.get(k))), None)
    if found is None:
        keys = short_list([repr(k) for k in obj]) if isinstance(obj, dict) else type(obj).__name__
        raise ConvertError(f"{where}: no state dict found (top level: {keys}); expected a dict of tensors, bare "
                           f"or under one of {', '.join(repr(k) for k in WRAPPER_KEYS)}.")
    return {k: v for k, v in found.items() if v is not None}


def _read_weights_file(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise ConvertError(f"{path}: not a readable safetensors file ({first_line(e)}).") from e
    return extract_state_dict(load_torch_file(path, allow_pickle), str(path))


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{index}: not a weights index (expected JSON with a 'weight_map'): {first_line(e)}.") from e
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise ConvertError(f"{index}: shard(s) {short_list(absent)} listed in the index are missing from {index.parent}.")
    return shards


def weights_files(checkpoint: Path) -> list[Path]:
    """The file(s) holding the weights of ``checkpoint`` (a file, a ``*.index.json`` or a folder)."""
    if checkpoint.is_file():
        return _index_shards(checkpoint) if checkpoint.name.endswith(".index.json") else [checkpoint]
    if not checkpoint.is_dir():
        raise ConvertError(f"{checkpoint}: no such file or folder.")
    for name in INDEX_FILES:
        if (checkpoint / name).is_file():
            return _index_shards(checkpoint / name)
    for name in SINGLE_FILES:
        if (checkpoint / name).is_file():
            return [checkpoint / name]
    candidates = sorted(p for p in checkpoint.iterdir()
                        if p.is_file() and (p.suffix == ".safetensors" or p.suffix in TORCH_SUFFIXES))
    if len(candidates) == 1:
        return candidates
    found = short_list([p.name for p in candidates]) if candidates else "no weights files"
    raise ConvertError(f"{checkpoint}: found {found}; give one weights file or a *.index.json instead of the folder.")


def read_checkpoint(checkpoint: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a raw checkpoint (one file or shards), with their original keys."""
    state: dict[str, torch.Tensor] = {}
    for path in weights_files(Path(checkpoint).expanduser()):
        shard = _read_weights_file(path, allow_pickle)
        duplicated = sorted(state.keys() & shard.keys())
        if duplicated:
            raise ConvertError(f"{path}: key(s) {short_list(duplicated)} also appear in another shard.")
        state.update(shard)
    return state


# --------------------------------------------------------------------------------------------------
# Matching against the base model
# --------------------------------------------------------------------------------------------------


def _hf_name(key: str, expected: set[str]) -> str:
    """``key`` with wrapper prefixes removed (or ``model.`` added) when that names an expected parameter."""
    name = key
    while True:
        if name in expected:
            return name
        if "model." + name in expected:  # the inner model's own state dict (LlamaModel, not ...ForCausalLM)
            return "model." + name
        if not name.startswith(WRAPPER_PREFIXES):
            return key
        name = name.split(".", 1)[1]


def rename_to_hf(state: dict[str, torch.Tensor], expected: set[str], where: str) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, tensor in state.items():
        if key.endswith(DERIVED_BUFFER_SUFFIXES):
            continue
        name = _hf_name(key, expected)
        if name in renamed:
            raise ConvertError(f"{where}: keys {sources[name]!r} and {key!r} both name {name!r}; keep one of them.")
        renamed[name], sources[name] = tensor, key
    return renamed


def _expected_parameters(config) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """The base architecture's state-dict shapes and its tied pairs {tied copy: source}, without allocating."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return shapes, dict(getattr(model, "all_tied_weights_keys", None) or {})


def resolve_tied(state: dict[str, torch.Tensor], tied: dict[str, str], config) -> dict[str, torch.Tensor]:
    """Drop tied copies equal to their source; a copy that differs unties the embeddings in ``config``."""
    differing = [t for t, s in tied.items() if t in state and s in state and not torch.equal(state[t], state[s])]
    if differing:
        logger.warning("%s differ(s) from the embeddings although the base config ties them: writing the model "
                       "with tie_word_embeddings=False.", ", ".join(differing))
        config.tie_word_embeddings = False
        return state
    return {k: v for k, v in state.items() if k not in tied}


def check_keys_and_shapes(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], optional: set[str],
                          where: str, base: str) -> None:
    missing = sorted(k for k in shapes.keys() - state.keys() if k not in optional)
    unexpected = sorted(state.keys() - shapes.keys())
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {short_list(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {short_list(unexpected)}"] if unexpected else []
        raise ConvertError(f"{where} does not match the base model {base}: {'; '.join(parts)}. Give the base model the "
                           "checkpoint was trained from (--base), or the checkpoint of that model.")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(shapes[k])}" for k in sorted(state) if state[k].shape != shapes[k]]
    if wrong:
        raise ConvertError(f"{where}: {len(wrong)} tensor(s) differ in shape from the base model {base} (checkpoint vs "
                           f"base): {short_list(wrong, 4)}. Is --base the model this checkpoint was trained from?")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def convert_state_dict(checkpoint: str | Path, base_model: str, output_dir: str | Path, dtype: str = "auto",
                       allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Convert a raw state dict trained from ``base_model`` into an HF folder at ``output_dir``; returns its path.

    ``dtype``: ``auto`` (the checkpoint's own floating dtype), ``float32``, ``bfloat16`` or ``float16``.
    """
    from transformers import AutoConfig, GenerationConfig

    output_dir = Path(output_dir).expanduser()
    check_output_dir(output_dir, overwrite)  # fail before reading gigabytes
    source = resolve_pretrained(base_model, "base model")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConvertError(f"base model {base_model!r}: no config.json could be loaded ({first_line(e)}).") from e
    tokenizer = load_tokenizer(source, "base model")
    try:
        generation_config = GenerationConfig.from_pretrained(source)
    except OSError:
        generation_config = None  # optional: transformers derives one from the config

    where = str(checkpoint)
    state = read_checkpoint(checkpoint, allow_pickle)
    shapes, tied = _expected_parameters(config)
    state = rename_to_hf(state, set(shapes), where)
    state = resolve_tied(state, tied, config)
    optional = set(tied) if getattr(config, "tie_word_embeddings", False) else set()
    check_keys_and_shapes(state, shapes, optional, where, base_model)

    state = cast_floating(state, output_dtype(dtype, state))
    return save_hf_folder(config, state, output_dir, tokenizer, generation_config, overwrite=overwrite)
