"""Model configs without weights (presets, local folders, assets, ``config.json`` files, GGUF metadata, the
Hub) and the architectures built from them on the meta device: parameter counts, layer shapes, LoRA sizes."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError
from alignkit.errors import AlignkitError


class EstimateError(AlignkitError, ValueError):
    """The estimate cannot be made (a model config that cannot be read, a bad CLI value); the message says why."""


# --------------------------------------------------------------------------------------------------
# Model configs without weights: presets, local folders, assets, config.json files, the Hub
# --------------------------------------------------------------------------------------------------

# config.json values of architectures the estimate knows offline, keyed by the name a config would use
_SMOLLM2_135M = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "hidden_act": "silu",
}
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": _SMOLLM2_135M,  # the asset, when it is not cached yet
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "all-minilm-l6-v2": {
        "model_type": "bert", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
        "num_attention_heads": 12, "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2,
    },
    "Qwen/Qwen2-7B": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
        "max_position_embeddings": 131072, "hidden_act": "silu",
    },
    "Qwen/Qwen2.5-0.5B": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "hidden_act": "silu",
    },
    "huggyllama/llama-7b": {  # LLaMA-7B: 6.74B parameters
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
        "max_position_embeddings": 2048, "hidden_act": "silu",
    },
    "google/gemma-2b": {
        "model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
        "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 256000,
        "tie_word_embeddings": True, "max_position_embeddings": 8192, "hidden_act": "gelu_pytorch_tanh",
    },
}


def read_model_config(name: str, key: str, gguf_file: str | None = None) -> dict[str, Any]:
    """The ``config.json`` values of model ``name`` (a config value such as ``model.name_or_path``), no weights.

    In order: a ``.json`` file; a folder's ``config.json``; a ``.gguf`` file's metadata; a named asset (its
    cached folder, else its preset); a preset (:data:`PRESETS`); the Hub (config only).
    """
    path = Path(name).expanduser()
    if name.endswith(".json"):
        if not path.is_file():
            raise EstimateError(f"{key}={name!r}: no such config file.")
        return _read_json(path, key)
    if path.is_dir():
        if gguf_file or (any(path.glob("*.gguf")) and not (path / "config.json").is_file()):
            return _gguf_config(path, gguf_file or next(path.glob("*.gguf")).name, key)
        if not (path / "config.json").is_file():
            raise EstimateError(f"{key}={name!r}: not a model folder: {path} (expected config.json); give a model "
                                "folder or the path of its config.json.")
        return _read_json(path / "config.json", key)
    if name.lower().endswith(".gguf"):
        if not path.is_file():
            raise EstimateError(f"{key}={name!r}: no such GGUF file.")
        return _gguf_config(path.parent, path.name, key)
    from alignkit import assets

    spec = assets.ASSETS.get(name)
    if spec is not None and spec.kind == "model":
        if assets.is_cached(name):
            return _read_json(assets.cache_dir() / "assets" / name / spec.output / "config.json", key)
        if name in PRESETS:
            return dict(PRESETS[name])
    if name in PRESETS:
        return dict(PRESETS[name])
    from alignkit.models import from_hub, looks_like_local_path

    if looks_like_local_path(name) or path.exists():  # a typo of a local path never goes to the Hub
        raise EstimateError(f"{key}={name!r}: not a model folder: {path} does not exist (expected a folder with "
                            "config.json, or the path of a config.json).")
    try:
        from transformers import AutoConfig

        return from_hub(AutoConfig.from_pretrained, name, key).to_dict()
    except AlignkitError as e:  # the Hub unreachable or the name unknown, already one line
        raise EstimateError(f"{e} Or give --model-config path/to/config.json (presets: {', '.join(PRESETS)}).") \
            from None
    except Exception as e:  # offline, gated, unknown: one line
        reason = " ".join(str(e).split())[:160]
        raise EstimateError(
            f"{key}={name!r}: not a local folder, config.json, asset or preset, and its config.json could not be "
            f"read from the Hugging Face Hub ({reason}). Offline? Give a local folder or a config.json path, e.g. "
            f"--model-config path/to/config.json (presets: {', '.join(PRESETS)})."
        ) from None


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EstimateError(f"{key}: {path} is not a readable JSON config ({e}).") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise EstimateError(f"{key}: {path} has no model_type; give a transformers config.json.")
    return data


def _gguf_config(folder: Path, gguf_file: str, key: str) -> dict[str, Any]:
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file).to_dict()
    except Exception as e:
        raise EstimateError(f"{key}: cannot read the config of the GGUF file {folder / gguf_file} ({e}); give "
                            "--model-config path/to/config.json.") from None


# --------------------------------------------------------------------------------------------------
# Architectures: parameter counts from a model built on the meta device
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """What the estimate needs to know about one model (built on the meta device, no weights)."""

    name: str
    model_type: str
    task: str  # causal_lm | seq_cls
    params: int  # every parameter once (tied embeddings count once)
    head_params: int  # the LM head's own parameters (0 when tied to the embeddings; seq-cls: the score head)
    quantizable: int  # parameters bitsandbytes stores in 4 bits: every linear layer but the output head
    linears: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features) of every nn.Linear
    head_names: tuple[str, ...]  # linear modules 'all-linear' LoRA leaves out (the output / score head)
    largest: int  # elements of the largest parameter
    layer_params: int  # parameters of one decoder layer
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@functools.lru_cache(maxsize=64)
def _arch_from_json(name: str, config_json: str, task: str) -> Arch:
    import torch
    import transformers

    values = json.loads(config_json)
    model_type = values.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path", "auto_map", "quantization_config"):
        values.pop(k, None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **values)
    except ValueError as e:
        raise EstimateError(f"{name}: model_type {model_type!r} is unknown to transformers "
                            f"{transformers.__version__} ({e}).") from None
    auto = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification
    if task == "seq_cls":
        config.num_labels = 1
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except ValueError as e:
        raise EstimateError(f"{name}: transformers cannot build a {task} model of type {model_type!r} ({e}).") from None
    text = config.get_text_config()
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    head_module = model.get_output_embeddings() if task == "causal_lm" else None
    head_names: list[str] = []
    head_params = 0
    if head_module is not None:
        head_names = [n for n, m in model.named_modules() if m is head_module]
        embed = model.get_input_embeddings()
        tied = embed is not None and head_module.weight is embed.weight
        head_params = 0 if tied else sum(p.numel() for p in head_module.parameters())
    else:
        for n, m in model.named_modules():
            if n.split(".")[-1] in ("score", "classifier") and isinstance(m, torch.nn.Module):
                head_names.append(n)
                head_params += sum(p.numel() for p in m.parameters())
    linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    in_head = tuple(f"{h}." for h in head_names)
    quantizable = sum(i * o for n, i, o in linears if n not in head_names and not n.startswith(in_head))
    layer_lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == text.num_hidden_layers]
    layer_params = sum(p.numel() for p in layer_lists[0][0].parameters()) if layer_lists else 0
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return Arch(
        name=name, model_type=model_type, task=task, params=total, head_params=head_params, quantizable=quantizable,
        linears=linears, head_names=tuple(head_names), largest=max(p.numel() for p in params.values()),
        layer_params=layer_params, hidden=int(text.hidden_size), layers=int(text.num_hidden_layers), heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
        intermediate=int(text.intermediate_size), vocab=int(text.vocab_size),
    )


def arch_of(name: str, task: str = "causal_lm", *, key: str = "model.name_or_path", gguf_file: str | None = None,
            config_override: str | None = None) -> Arch:
    """The :class:`Arch` of model ``name`` for ``task`` (``causal_lm`` or ``seq_cls``); ``config_override``
    (a config.json path, a folder or a preset) replaces where its config is read from. A LoRA adapter folder
    counts as it loads: its base model plus the adapter."""
    source = config_override or name
    key = "--model-config" if config_override else key
    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        return _adapter_arch(folder, task, key)
    values = read_model_config(source, key, gguf_file)
    return _arch_from_json(source, json.dumps(values, sort_keys=True, default=str), task)


def _adapter_arch(folder: Path, task: str, key: str) -> Arch:
    """A LoRA adapter folder (what a ``finetune: lora`` run saves, e.g. a reward model) as from_pretrained loads
    it: the base model its adapter_config.json names, plus the adapter's weights (and a seq-cls adapter's score
    head, which it saves in full)."""
    from alignkit.models import adapter_base

    try:
        adapter = json.loads((folder / "adapter_config.json").read_text())
        base = adapter_base(folder)
    except (OSError, ValueError) as e:
        raise EstimateError(f"{key}={str(folder)!r}: a LoRA adapter folder, but its adapter_config.json cannot be "
                            f"used: {' '.join(str(e).split())}") from None
    arch = arch_of(base, task, key=f"{key} (the base model in {folder}/adapter_config.json)")
    targets = adapter.get("target_modules") or "all-linear"
    if isinstance(targets, str) and targets != "all-linear":  # peft: a regex over the full module names
        targets = sorted({n.rsplit(".", 1)[-1] for n, _, _ in arch.linears if re.fullmatch(targets, n)})
    targets = [targets] if isinstance(targets, str) else list(targets)
    rank = int(adapter.get("r") or 8)
    return dataclasses.replace(arch, name=f"{folder} (LoRA r={rank} on {arch.name})",
                               params=arch.params + lora_parameters(arch, targets, rank))


def lora_parameters(arch: Arch, targets: list[str], rank: int) -> int:
    """LoRA parameters peft adds: ``r * (in + out)`` for every targeted linear layer (``all-linear``: every
    linear layer but the output / score head), plus a trainable copy of a seq-cls score head."""
    extra = arch.head_params if arch.task == "seq_cls" else 0  # modules_to_save: the score head trains in full
    if "all-linear" in targets:
        chosen = [(i, o) for n, i, o in arch.linears if n not in arch.head_names]
    else:
        chosen = [(i, o) for n, i, o in arch.linears
                  if any(n == t or n.endswith(f".{t}") for t in targets) and n not in arch.head_names]
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n, _, _ in arch.linears})
        raise ConfigError(f"model.lora_target_modules={targets}: no linear layer of {arch.name} matches; its linear "
                          f"layers: {', '.join(names)} (or use 'all-linear').")
    return rank * sum(i + o for i, o in chosen) + extra


def lora_targets(arch: Arch, targets: list[str]) -> list[tuple[str, int, int]]:
    if "all-linear" in targets:
        return [x for x in arch.linears if x[0] not in arch.head_names]
    return [x for x in arch.linears if any(x[0] == t or x[0].endswith(f".{t}") for t in targets)
            and x[0] not in arch.head_names]
