"""Megatron GPT checkpoints of the Llama / Qwen2 / Mistral family -> a Hugging Face model folder.

Supported models: RMSNorm, SwiGLU MLP, RoPE (non-interleaved, full rotary), grouped-query attention,
tied or untied embeddings, optional biases. Two checkpoint formats are read:

- ``torch_dist`` (megatron-core ``dist_checkpointing``; ``.metadata``, ``__R_N.distcp``, ``common.pt``,
  ``metadata.json``). Tensors are stored globally, so tensor- and pipeline-parallel shards are already
  merged; layers are either stacked on a leading axis (``decoder.layers.self_attention...``) or one key
  per layer (``decoder.layers.3....``, with SwiGLU halves as ``linear_fc1.weight_w`` / ``_v``). The
  ``.metadata`` pickle is read with an unpickler that only accepts torch's checkpoint record classes.
- per-rank files ``iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt`` (``{"model": state_dict, "args": ...}``):
  tensor-parallel shards are concatenated (column-parallel on dim 0, row-parallel on dim 1, SwiGLU
  gate/up halves taken from each shard), pipeline stages renumbered and joined.

Both the current megatron-core names (``embedding.``, ``decoder.layers.N.self_attention.linear_qkv``,
``mlp.linear_fc1`` ..., norms either separate or fused into ``linear_qkv.layer_norm_weight``) and the
older Megatron-LM ones (``language_model.encoder.layers.N.self_attention.query_key_value``,
``dense_h_to_4h``, ``input_norm`` / ``input_layernorm`` ...) are recognised.

``checkpoint`` may be the save folder (``latest_checkpointed_iteration.txt`` picks the iteration, or
``iteration=``), an ``iter_*`` folder, or one rank's file. Megatron has no HF config: it is built from
the tensor shapes (hidden size, layers, FFN size, vocabulary, head size and query groups once the number
of heads is known) plus the architecture arguments, taken from the caller or from the ``args`` Megatron-LM
stores in the checkpoint. Those args are pickled, so they are read only with ``allow_pickle=True``;
without them ``num_attention_heads`` must be given. The tokenizer comes from a folder, hub name or asset.
The fused QKV weight is laid out per query group, ``[q_1 .. q_h/g, k, v]`` for each group, which is
split into HF's ``q_proj`` / ``k_proj`` / ``v_proj``; RoPE is the same rotate-half form as HF Llama's.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

from alignkit.convert.common import (
    ConvertError,
    PickleRequired,
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

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?$")
RANK_FILES = ("model_optim_rng.pt", "model_rng.pt")
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "language_model.", "word_embeddings_for_head.")
LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
MEGATRON_DEFAULTS = {"rope_theta": 10000.0, "norm_eps": 1e-5, "max_position_embeddings": 4096}

# Older Megatron-LM names -> megatron-core names, for whole keys (prefixes) and for the part after layers.N.
_PREFIX_ALIASES = [
    ("language_model.embedding.word_embeddings.", "embedding.word_embeddings."),
    ("language_model.encoder.final_norm.", "decoder.final_layernorm."),
    ("language_model.encoder.final_layernorm.", "decoder.final_layernorm."),
    ("language_model.transformer.final_layernorm.", "decoder.final_layernorm."),
    ("language_model.encoder.layers.", "decoder.layers."),
    ("language_model.transformer.layers.", "decoder.layers."),
    ("language_model.output_layer.", "output_layer."),
    ("word_embeddings_for_head.", "output_layer."),  # the tied head's copy on the last pipeline stage
    ("decoder.final_norm.", "decoder.final_layernorm."),
]
_LAYER_ALIASES = [
    # Transformer-Engine layers fuse the norm into the following linear layer.
    ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
    ("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm."),
    ("input_norm.", "input_layernorm."),
    ("post_attention_norm.", "pre_mlp_layernorm."),
    ("post_attention_layernorm.", "pre_mlp_layernorm."),
    ("self_attention.query_key_value.", "self_attention.linear_qkv."),
    ("self_attention.dense.", "self_attention.linear_proj."),
    ("mlp.dense_h_to_4h.", "mlp.linear_fc1."),
    ("mlp.dense_4h_to_h.", "mlp.linear_fc2."),
]
_LAYER_PARTS = {
    "input_layernorm.weight", "pre_mlp_layernorm.weight",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
}
_GLOBAL_KEYS = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"}


# --------------------------------------------------------------------------------------------------
# Key names
# --------------------------------------------------------------------------------------------------


def _is_ignored(key: str) -> bool:
    """Non-weights: Transformer-Engine/fp8 extra state, and RoPE frequencies (rebuilt from rope theta)."""
    return "_extra_state" in key or key.endswith("inv_freq") or "rotary_pos_emb." in key


def canonical_name(key: str) -> str | None:
    """The megatron-core name of a Megatron key (older Megatron-LM names included); None for non-weights."""
    if _is_ignored(key):
        return None
    for old, new in _PREFIX_ALIASES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    match = LAYER_KEY.match(key)
    if match:
        index, part = match.groups()
        for old, new in _LAYER_ALIASES:
            if part.startswith(old):
                part = new + part[len(old):]
                break
        key = f"decoder.layers.{index}.{part}"
    return key


def canonical_state(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Rename to megatron-core names; refuse keys outside the Llama family with a list of them."""
    renamed: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        name = canonical_name(key)
        if name is None:
            continue
        match = LAYER_KEY.match(name)
        if name not in _GLOBAL_KEYS and not (match and match.group(2) in _LAYER_PARTS):
            unknown.append(key)
        renamed[name] = tensor
    if unknown:
        raise ConvertError(f"{where}: key(s) {short_list(unknown)} are not part of a Llama-family GPT (RMSNorm, SwiGLU, "
                           "RoPE; norm biases, MoE, MLA and QK-norm are not supported).")
    return renamed


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (older Megatron-LM's ``{"language_model": {"encoder": {...}}}``) -> dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------------------------------
# Finding the checkpoint
# --------------------------------------------------------------------------------------------------


def _is_iteration_dir(path: Path) -> bool:
    return (path / ".metadata").is_file() or any(RANK_DIR.match(p.name) for p in path.glob("mp_rank_*"))


def find_iteration_dir(checkpoint: Path, iteration: int | None = None) -> Path:
    """The ``iter_*`` (or ``release``) folder to read from a save folder, an iteration folder or a rank file."""
    if checkpoint.is_file():
        checkpoint = checkpoint.parent.parent if RANK_DIR.match(checkpoint.parent.name) else checkpoint.parent
    if not checkpoint.is_dir():
        raise ConvertError(f"{checkpoint}: no such Megatron checkpoint folder.")
    if _is_iteration_dir(checkpoint):
        return checkpoint
    available = sorted(p.name for p in checkpoint.glob("iter_*") if p.is_dir())
    if iteration is not None:
        chosen = checkpoint / f"iter_{iteration:07d}"
    elif (checkpoint / TRACKER_FILE).is_file():
        marker = (checkpoint / TRACKER_FILE).read_text().strip()
        if marker != "release" and not marker.isdigit():
            raise ConvertError(f"{checkpoint / TRACKER_FILE}: holds {marker[:40]!r}, not an iteration number or "
                               "'release'; pass --iteration.")
        chosen = checkpoint / ("release" if marker == "release" else f"iter_{int(marker):07d}")
    elif available:
        chosen = checkpoint / available[-1]
        logger.info("No %s in %s: reading the last iteration, %s.", TRACKER_FILE, checkpoint, chosen.name)
    else:
        raise ConvertError(f"{checkpoint}: not a Megatron checkpoint (no {TRACKER_FILE}, iter_*/ folder, .metadata "
                           "or mp_rank_*/ folder).")
    if not _is_iteration_dir(chosen):
        raise ConvertError(f"{chosen}: no Megatron checkpoint there (no .metadata or mp_rank_*/ folder); available "
                           f"iterations: {short_list(available) or 'none'} (choose one with --iteration).")
    return chosen


# --------------------------------------------------------------------------------------------------
# Per-rank files: iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt
# --------------------------------------------------------------------------------------------------


def _rank_files(iteration_dir: Path) -> dict[tuple[int, int], Path]:
    """{(tensor rank, pipeline rank): file}, checking the grid of ranks is complete."""
    files = {}
    for folder in sorted(iteration_dir.glob("mp_rank_*")):
        match = RANK_DIR.match(folder.name)
        if not match:
            raise ConvertError(f"{folder}: unexpected rank folder name (expert-parallel checkpoints are not supported).")
        path = next((folder / name for name in RANK_FILES if (folder / name).is_file()), None)
        if path is None:
            raise ConvertError(f"{folder}: no {' or '.join(RANK_FILES)} in it.")
        files[int(match.group(1)), int(match.group(2) or 0)] = path
    tp_size = 1 + max(tp for tp, _ in files)
    pp_size = 1 + max(pp for _, pp in files)
    absent = [f"tp {tp} / pp {pp}" for tp in range(tp_size) for pp in range(pp_size) if (tp, pp) not in files]
    if absent:
        raise ConvertError(f"{iteration_dir}: rank file(s) for {short_list(absent)} are missing; copy every mp_rank_* "
                           "folder of the iteration.")
    return files


def _tp_split_dim(name: str) -> int | None:
    """The dimension Megatron splits ``name`` along across tensor-parallel ranks; None when replicated."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return 0  # vocabulary-parallel
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")):
        return 0  # column-parallel
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1  # row-parallel (their biases are added after the reduction: replicated)
    return None


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """One pipeline stage's tensor-parallel shards (in rank order) -> full tensors."""
    merged = {}
    for name in shards[0]:
        if any(name not in shard for shard in shards):
            raise ConvertError(f"{where}: {name} is missing from some tensor-parallel ranks; the rank files do not "
                               "belong to one checkpoint.")
        parts = [shard[name] for shard in shards]
        dim = _tp_split_dim(name)
        if dim is None:
            if any(p.shape != parts[0].shape for p in parts):
                raise ConvertError(f"{where}: {name} has different shapes on different tensor-parallel ranks.")
            merged[name] = parts[0]
        elif name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
            # each rank holds [its gate rows; its up rows]: gather all gates, then all ups
            halves = [p.chunk(2, dim=0) for p in parts]
            merged[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        else:
            merged[name] = torch.cat(parts, dim=dim)
    return merged


def merge_pipeline(stages: list[dict[str, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """Pipeline stages (in order, layers numbered from 0 in each) -> one state dict with global layer numbers."""
    merged: dict[str, torch.Tensor] = {}
    offset = 0
    for stage in stages:
        local_layers = set()
        for name, tensor in stage.items():
            match = LAYER_KEY.match(name)
            if match:
                local = int(match.group(1))
                local_layers.add(local)
                merged[f"decoder.layers.{local + offset}.{match.group(2)}"] = tensor
            elif name in merged and not torch.equal(merged[name], tensor):
                raise ConvertError(f"{where}: {name} appears on two pipeline stages with different values.")
            else:
                merged[name] = tensor
        if local_layers and local_layers != set(range(len(local_layers))):
            raise ConvertError(f"{where}: a pipeline stage has layers {sorted(local_layers)}; expected 0..N-1 per stage "
                               "(virtual pipeline checkpoints are not supported).")
        offset += len(local_layers)
    return merged


def read_per_rank(iteration_dir: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """(full megatron-core state dict, the stored args or None) from ``mp_rank_*`` files."""
    files = _rank_files(iteration_dir)
    tp_size, pp_size = 1 + max(tp for tp, _ in files), 1 + max(pp for _, pp in files)
    args, stages = None, []
    for pp in range(pp_size):
        shards = []
        for tp in range(tp_size):
            path = files[tp, pp]
            content = load_torch_file(path, allow_pickle)
            if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
                chunks = [k for k in content if str(k).startswith("model")] if isinstance(content, dict) else []
                detail = f"virtual-pipeline chunks {chunks} are not supported" if chunks else "no 'model' state dict"
                raise ConvertError(f"{path}: {detail}.")
            args = args if args is not None else content.get("args")
            shards.append(canonical_state(_flatten(content["model"]), str(path)))
        stages.append(merge_tensor_parallel(shards, f"{iteration_dir} (pipeline stage {pp})"))
    logger.info("Read %d rank file(s) from %s (tensor parallel %d, pipeline parallel %d).",
                len(files), iteration_dir, tp_size, pp_size)
    return merge_pipeline(stages, str(iteration_dir)), args


# --------------------------------------------------------------------------------------------------
# torch_dist (torch.distributed.checkpoint)
# --------------------------------------------------------------------------------------------------

_DCP_RECORD_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)


_PLAIN_GLOBALS = {("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
                  ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Reads a DCP ``.metadata`` pickle, resolving only torch's plain checkpoint records (dataclasses and
    enums of torch.distributed.checkpoint), ``torch.Size``, dtypes, layouts, paths and OrderedDict:
    building these runs no code from the file."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_RECORD_MODULES:
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        elif (module, name) in _PLAIN_GLOBALS:  # torch stores the checkpoint path in its StorageMeta
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


def read_dcp_metadata(iteration_dir: Path, allow_pickle: bool) -> Any:
    path = iteration_dir / ".metadata"
    with open(path, "rb") as f:
        try:
            return pickle.load(f) if allow_pickle else _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ConvertError(f"{path}: holds pickled objects beyond torch's checkpoint records ({e}); pass "
                               "--allow-pickle only if you trust the file (unpickling can run code from it).") from None
        except (EOFError, AttributeError, ValueError) as e:
            raise ConvertError(f"{path}: not a readable torch.distributed.checkpoint metadata file ({first_line(e)}).") from e


def _check_backend(iteration_dir: Path) -> None:
    path = iteration_dir / "metadata.json"
    if path.is_file():
        try:
            backend = json.loads(path.read_text()).get("sharded_backend")
        except (ValueError, AttributeError) as e:
            raise ConvertError(f"{path}: not Megatron's checkpoint metadata JSON ({first_line(e)}).") from e
        if backend not in (None, "torch_dist"):
            raise ConvertError(f"{path}: sharded backend {backend!r} is not supported; re-save the checkpoint in the "
                               "torch_dist format (Megatron's --ckpt-format torch_dist) or as per-rank files.")


def _unstack_layers(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """``decoder.layers.X`` stacked on a leading layer axis -> ``decoder.layers.N.X``; other keys as they are."""
    if name.startswith("decoder.layers.") and not LAYER_KEY.match(name):
        rest = name.removeprefix("decoder.layers.")
        return {f"decoder.layers.{i}.{rest}": tensor[i] for i in range(tensor.shape[0])}
    return {name: tensor}


def _join_swiglu_halves(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``linear_fc1.weight_w`` (gate) + ``linear_fc1.weight_v`` (up) -> ``linear_fc1.weight``."""
    joined = {}
    for name, tensor in state.items():
        if name.endswith(("linear_fc1.weight_v", "linear_fc1.bias_v")):
            continue
        if name.endswith(("linear_fc1.weight_w", "linear_fc1.bias_w")):
            base = name[:-2]
            if base + "_v" not in state:
                raise ConvertError(f"{name} has no matching {base}_v (the SwiGLU up half) in the checkpoint.")
            joined[base] = torch.cat([tensor, state[base + "_v"]], dim=0)
        else:
            joined[name] = tensor
    return joined


def read_torch_dist(iteration_dir: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """(full megatron-core state dict, the args stored in common.pt or None) from a torch_dist checkpoint."""
    _check_backend(iteration_dir)
    metadata = read_dcp_metadata(iteration_dir, allow_pickle)
    wanted = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and name.startswith(MODEL_PREFIXES) and not _is_ignored(name)
    }
    if not wanted:
        raise ConvertError(f"{iteration_dir}: the checkpoint holds no model tensors (embedding.*, decoder.*, "
                           "output_layer.*).")
    reader = _PreparsedReader(iteration_dir, metadata)
    dcp.load(wanted, storage_reader=reader, planner=dcp.DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in wanted.items():
        state.update(_unstack_layers(name, tensor))
    args = _common_args(iteration_dir, allow_pickle)
    return canonical_state(_join_swiglu_halves(state), str(iteration_dir)), args


class _PreparsedReader(FileSystemReader):
    """A FileSystemReader given metadata read safely beforehand, instead of ``pickle.load``-ing it itself."""

    def __init__(self, path: Path, metadata: Any) -> None:
        super().__init__(str(path))
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class _ArgsNotRead:
    """Marks args that exist but were not unpickled (no --allow-pickle)."""

    def __init__(self, where: str) -> None:
        self.where = where


def _common_args(iteration_dir: Path, allow_pickle: bool) -> Any:
    """Megatron-LM's args from ``common.pt`` (None when absent; _ArgsNotRead when they need pickle)."""
    path = iteration_dir / "common.pt"
    if not path.is_file():
        return None
    try:
        common = load_torch_file(path, allow_pickle)
    except PickleRequired:
        return _ArgsNotRead(str(path))
    return common.get("args") if isinstance(common, dict) else None


# --------------------------------------------------------------------------------------------------
# Architecture: shapes + args
# --------------------------------------------------------------------------------------------------


@dataclass
class Architecture:
    """What the HF config needs; None = not known yet."""

    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    head_dim: int | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None
    max_position_embeddings: int | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None


def _unsupported_by_args(args: Any) -> list[str]:
    """Megatron-LM options that make a model something other than a plain Llama-family GPT."""
    problems = []
    checks = [
        ("normalization", "RMSNorm", "normalization={} (needs RMSNorm)"),
        ("swiglu", True, "swiglu={} (needs SwiGLU)"),
        ("position_embedding_type", "rope", "position_embedding_type={} (needs rope)"),
        ("rotary_interleaved", False, "rotary_interleaved={}"),
        ("rotary_percent", 1.0, "rotary_percent={} (partial rotary)"),
        ("apply_layernorm_1p", False, "apply_layernorm_1p={}"),
        ("use_rope_scaling", False, "use_rope_scaling={} (Llama-3.1 RoPE scaling)"),
        ("qk_layernorm", False, "qk_layernorm={}"),
        ("num_experts", None, "num_experts={} (MoE)"),
    ]
    for name, supported, message in checks:
        if hasattr(args, name) and getattr(args, name) != supported:
            problems.append(message.format(getattr(args, name)))
    return problems


def architecture_from_args(args: Any, where: str) -> Architecture:
    """The facts in Megatron-LM's args Namespace (older and newer argument names)."""
    problems = _unsupported_by_args(args)
    if problems:
        raise ConvertError(f"{where}: the checkpoint's args describe an unsupported model: {', '.join(problems)}.")
    heads = getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else heads
    untie = getattr(args, "untie_embeddings_and_output_weights", None)
    return Architecture(
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=getattr(args, "kv_channels", None),
        rope_theta=getattr(args, "rotary_base", None),
        norm_eps=getattr(args, "norm_epsilon", getattr(args, "layernorm_epsilon", None)),
        max_position_embeddings=getattr(args, "max_position_embeddings", None),
        tie_word_embeddings=None if untie is None else not untie,
    )


def _merge(given: Architecture, stored: Architecture | None) -> Architecture:
    """The caller's values win over the checkpoint's."""
    if stored is None:
        return given
    return Architecture(**{f.name: getattr(given, f.name) if getattr(given, f.name) is not None
                           else getattr(stored, f.name) for f in dataclasses.fields(Architecture)})


@dataclass(frozen=True)
class Shapes:
    """What the tensors say: sizes, query groups, biases and whether the head is tied."""

    hidden_size: int
    num_layers: int
    ffn_hidden_size: int
    vocab_rows: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    qkv_bias: bool
    proj_bias: bool
    mlp_bias: bool
    tied: bool


def _layer_count(state: dict[str, torch.Tensor], where: str) -> int:
    layers = {int(m.group(1)) for m in map(LAYER_KEY.match, state) if m}
    if not layers or layers != set(range(len(layers))):
        raise ConvertError(f"{where}: transformer layers {short_list([str(n) for n in sorted(layers)]) or 'none'} found; "
                           "expected 0..N-1 (a pipeline stage missing?).")
    return len(layers)


def _check_complete(state: dict[str, torch.Tensor], num_layers: int, where: str) -> None:
    required = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    for i in range(num_layers):
        required += [f"decoder.layers.{i}.{part}" for part in sorted(_LAYER_PARTS) if not part.endswith(".bias")]
    missing = [k for k in required if k not in state]
    if missing:
        raise ConvertError(f"{where}: missing {short_list(missing)} (a rank or pipeline stage missing, or not a "
                           "Llama-family GPT).")


def infer_shapes(state: dict[str, torch.Tensor], arch: Architecture, where: str) -> Shapes:
    num_layers = _layer_count(state, where)
    _check_complete(state, num_layers, where)
    vocab_rows, hidden = state["embedding.word_embeddings.weight"].shape
    layer0 = "decoder.layers.0."
    qkv_rows = state[layer0 + "self_attention.linear_qkv.weight"].shape[0]
    proj_in = state[layer0 + "self_attention.linear_proj.weight"].shape[1]
    fc1_rows = state[layer0 + "mlp.linear_fc1.weight"].shape[0]
    ffn = state[layer0 + "mlp.linear_fc2.weight"].shape[1]
    if fc1_rows != 2 * ffn:
        raise ConvertError(f"{where}: linear_fc1 has {fc1_rows} rows for an FFN size of {ffn}; a SwiGLU MLP has twice "
                           "the FFN size (non-gated MLPs are not Llama-family).")
    heads = arch.num_attention_heads
    if heads is None:
        raise ConvertError(f"{where}: the number of attention heads is not stored in the checkpoint's readable parts; "
                           "pass --num-attention-heads (or --allow-pickle to read Megatron-LM's args, if you trust it).")
    head_dim = arch.head_dim or proj_in // heads
    if proj_in != heads * head_dim:
        raise ConvertError(f"{where}: linear_proj takes {proj_in} inputs, not {heads} heads x {head_dim}; check "
                           "--num-attention-heads / --head-dim.")
    kv_heads, remainder = divmod(qkv_rows - heads * head_dim, 2 * head_dim)
    if remainder or kv_heads < 1 or heads % kv_heads:
        raise ConvertError(f"{where}: linear_qkv has {qkv_rows} rows, which no query-group count fits with {heads} heads "
                           f"of size {head_dim}; check --num-attention-heads / --head-dim.")
    if arch.num_query_groups is not None and arch.num_query_groups != kv_heads:
        raise ConvertError(f"{where}: linear_qkv's {qkv_rows} rows mean {kv_heads} query groups, not the "
                           f"{arch.num_query_groups} given; check --num-query-groups / --num-attention-heads.")
    biases = {part.removesuffix(".bias") for part in _LAYER_PARTS if part.endswith(".bias") and layer0 + part in state}
    mlp_bias = "mlp.linear_fc1" in biases
    if mlp_bias != ("mlp.linear_fc2" in biases):
        raise ConvertError(f"{where}: only one of linear_fc1 / linear_fc2 has a bias; no HF Llama-family config fits.")
    return Shapes(hidden_size=hidden, num_layers=num_layers, ffn_hidden_size=ffn, vocab_rows=vocab_rows,
                  num_attention_heads=heads, num_query_groups=kv_heads, head_dim=head_dim,
                  qkv_bias="self_attention.linear_qkv" in biases, proj_bias="self_attention.linear_proj" in biases,
                  mlp_bias=mlp_bias, tied=_is_tied(state, arch))


def _is_tied(state: dict[str, torch.Tensor], arch: Architecture) -> bool:
    """Tied when there is no separate head, when the args say so, or when the head is an exact copy."""
    head = state.get("output_layer.weight")
    if head is None:
        return True
    if arch.tie_word_embeddings is not None:
        return arch.tie_word_embeddings
    return torch.equal(head, state["embedding.word_embeddings.weight"])


# --------------------------------------------------------------------------------------------------
# Megatron -> HF
# --------------------------------------------------------------------------------------------------


def split_qkv(fused: torch.Tensor, shapes: Shapes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's per-group ``[q (heads/groups of them), k, v]`` rows -> HF's q, k, v (weight or bias)."""
    per_group = shapes.num_attention_heads // shapes.num_query_groups
    grouped = fused.reshape(shapes.num_query_groups, per_group + 2, shapes.head_dim, *fused.shape[1:])
    q, k, v = (part.reshape(-1, *fused.shape[1:]).contiguous() for part in grouped.split([per_group, 1, 1], dim=1))
    return q, k, v


def to_hf_state_dict(state: dict[str, torch.Tensor], shapes: Shapes, vocab_size: int) -> dict[str, torch.Tensor]:
    hf = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size],
          "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if not shapes.tied:
        hf["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    for i in range(shapes.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        hf[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        hf[dst + "post_attention_layernorm.weight"] = state[src + "pre_mlp_layernorm.weight"]
        for kind in ("weight", "bias"):
            fused = state.get(f"{src}self_attention.linear_qkv.{kind}")
            if fused is not None:
                for proj, tensor in zip(("q", "k", "v"), split_qkv(fused, shapes)):
                    hf[f"{dst}self_attn.{proj}_proj.{kind}"] = tensor
            pairs = [("self_attention.linear_proj", "self_attn.o_proj"), ("mlp.linear_fc2", "mlp.down_proj")]
            for megatron_name, hf_name in pairs:
                if f"{src}{megatron_name}.{kind}" in state:
                    hf[f"{dst}{hf_name}.{kind}"] = state[f"{src}{megatron_name}.{kind}"]
            fc1 = state.get(f"{src}mlp.linear_fc1.{kind}")
            if fc1 is not None:
                gate, up = fc1.chunk(2, dim=0)
                hf[f"{dst}mlp.gate_proj.{kind}"], hf[f"{dst}mlp.up_proj.{kind}"] = gate.contiguous(), up.contiguous()
    return hf


def build_config(shapes: Shapes, arch: Architecture, vocab_size: int, tokenizer: Any, where: str) -> Any:
    """LlamaConfig, or Qwen2Config when only the QKV projection has biases (Qwen2's layout)."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size, hidden_size=shapes.hidden_size, intermediate_size=shapes.ffn_hidden_size,
        num_hidden_layers=shapes.num_layers, num_attention_heads=shapes.num_attention_heads,
        num_key_value_heads=shapes.num_query_groups, hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(arch.rope_theta)},
        tie_word_embeddings=shapes.tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if shapes.qkv_bias and not shapes.proj_bias and not shapes.mlp_bias:
        if shapes.head_dim * shapes.num_attention_heads != shapes.hidden_size:
            raise ConvertError(f"{where}: QKV biases (Qwen2 layout) with a head size of {shapes.head_dim} x "
                               f"{shapes.num_attention_heads} heads != hidden {shapes.hidden_size}; Qwen2Config cannot "
                               "express that.")
        return Qwen2Config(**common)
    if shapes.proj_bias != shapes.qkv_bias:
        raise ConvertError(f"{where}: linear_proj {'has' if shapes.proj_bias else 'lacks'} a bias but linear_qkv "
                           f"{'has' if shapes.qkv_bias else 'lacks'} one; no HF Llama-family config fits.")
    return LlamaConfig(**common, head_dim=shapes.head_dim, attention_bias=shapes.qkv_bias, mlp_bias=shapes.mlp_bias)


def _fill_defaults(arch: Architecture) -> Architecture:
    for name, default in MEGATRON_DEFAULTS.items():
        if getattr(arch, name) is None:
            logger.warning("%s is neither given nor stored in the checkpoint: using Megatron's default %s; pass "
                           "--%s if the model was trained with another value.", name, default, name.replace("_", "-"))
            arch = dataclasses.replace(arch, **{name: default})
    return arch


def _stored_architecture(args: Any, where: str) -> Architecture | None:
    if isinstance(args, _ArgsNotRead):
        logger.info("%s holds Megatron-LM's args pickled; not read without --allow-pickle.", args.where)
        return None
    if isinstance(args, argparse.Namespace) or (args is not None and hasattr(args, "num_attention_heads")):
        return architecture_from_args(args, where)
    return None


def convert_megatron(checkpoint: str | Path, tokenizer: str, output_dir: str | Path, *,
                     num_attention_heads: int | None = None, num_query_groups: int | None = None,
                     head_dim: int | None = None, rope_theta: float | None = None, norm_eps: float | None = None,
                     max_position_embeddings: int | None = None, vocab_size: int | None = None,
                     iteration: int | None = None, dtype: str = "auto", allow_pickle: bool = False,
                     overwrite: bool = False) -> Path:
    """Convert a Megatron GPT checkpoint (torch_dist or per-rank files) into an HF folder; returns its path.

    Architecture values left as None come from the checkpoint's args (with ``allow_pickle``) or the shapes;
    ``vocab_size`` below the embedding's row count drops Megatron's vocabulary padding.
    """
    output_dir = Path(output_dir).expanduser()
    check_output_dir(output_dir, overwrite)
    tok = load_tokenizer(resolve_pretrained(tokenizer, "tokenizer"), "tokenizer")
    iteration_dir = find_iteration_dir(Path(checkpoint).expanduser(), iteration)
    where = str(iteration_dir)
    if (iteration_dir / ".metadata").is_file():
        state, args = read_torch_dist(iteration_dir, allow_pickle)
    else:
        state, args = read_per_rank(iteration_dir, allow_pickle)

    given = Architecture(num_attention_heads, num_query_groups, head_dim, rope_theta, norm_eps,
                         max_position_embeddings, vocab_size)
    arch = _merge(given, _stored_architecture(args, where))
    if isinstance(args, _ArgsNotRead) and arch.num_attention_heads is None:
        raise ConvertError(f"{args.where}: the number of attention heads is only in Megatron-LM's pickled args; pass "
                           "--num-attention-heads, or --allow-pickle if you trust the checkpoint (unpickling can run "
                           "code from it).")
    shapes = infer_shapes(state, arch, where)
    arch = _fill_defaults(arch)
    vocab = arch.vocab_size or shapes.vocab_rows
    if not len(tok) <= vocab <= shapes.vocab_rows:
        raise ConvertError(f"{where}: vocabulary size {vocab} must lie between the tokenizer's {len(tok)} tokens and the "
                           f"embedding's {shapes.vocab_rows} rows; check --vocab-size and --tokenizer.")

    config = build_config(shapes, arch, vocab, tok, where)
    hf_state = to_hf_state_dict(state, shapes, vocab)
    hf_state = cast_floating(hf_state, output_dtype(dtype, hf_state))
    logger.info("Megatron %s: %d layers, hidden %d, %d heads in %d groups of size %d, FFN %d, vocab %d, %s embeddings "
                "-> %s.", where, shapes.num_layers, shapes.hidden_size, shapes.num_attention_heads,
                shapes.num_query_groups, shapes.head_dim, shapes.ffn_hidden_size, vocab,
                "tied" if shapes.tied else "untied", type(config).__name__)
    return save_hf_folder(config, hf_state, output_dir, tok, overwrite=overwrite)
