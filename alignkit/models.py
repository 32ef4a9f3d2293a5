"""Model and tokenizer loading shared by every method: full, LoRA and QLoRA fine-tuning; saving; merging.

``name_or_path`` may be a named offline asset (``alignkit assets list``), a local HF folder, a ``.gguf``
file (or a folder + ``gguf_file``), or a hub name. GGUF checkpoints are dequantized and rebuilt as plain
models in memory, so what :func:`load_model` returns always saves with ``save_pretrained``.

A reference model for LoRA runs is the same model with the adapter switched off, not a second copy
(:mod:`alignkit.reference`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit import assets
from alignkit.config import ConfigError, ModelConfig
from alignkit.errors import AlignkitError
from alignkit.gguf import load_gguf

logger = logging.getLogger(__name__)

TASKS = {"causal_lm": "AutoModelForCausalLM", "seq_cls": "AutoModelForSequenceClassification"}
PAD_TOKEN_ADDED = "<|pad|>"
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_SEQ_CLS_HEADS = ("score", "classifier")


class _NoCpuAcceleratorNote(logging.Filter):
    """DeepSpeed logs "Setting accelerator to CPU. If you have GPU ..." whenever it is imported on a machine
    without a GPU, and accelerate imports it on every save_pretrained: no news on CPU, and it lands inside
    the final progress bar."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU") or torch.cuda.is_available()


logging.getLogger("DeepSpeed").addFilter(_NoCpuAcceleratorNote())


class ModelLoadError(AlignkitError, OSError):
    """A model, tokenizer or adapter cannot be found or loaded; the message says where alignkit looked."""


class MissingPackageError(AlignkitError, ImportError):
    """An optional package a setting needs is not installed; the message gives the pip command."""


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``auto`` (bf16 where the GPU supports it, else fp32), float32/fp32, bfloat16/bf16, float16/fp16."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if key not in _DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not valid; choose one of: auto, {', '.join(_DTYPES)}.")
    return _DTYPES[key]


# --------------------------------------------------------------------------------------------------
# Where weights come from: asset, local folder, GGUF file, hub
# --------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    path: str  # what from_pretrained gets: a folder or a hub name
    gguf_file: str | None
    name: str  # what we record as the model's name_or_path (portable: asset names stay names)
    local: bool


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# what makes a folder something from_pretrained loads: a model, a PEFT adapter, or (tokenizers) tokenizer files
_MODEL_FILES = ("config.json", "adapter_config.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only be meant as a local path, never a Hub repo id (``org/name`` or ``name``).

    Paths: absolute, ``./``, ``../``, ``~``, backslashes, a drive letter, two or more slashes, a trailing
    slash, characters a repo id cannot have, or a first part that is a local folder (``outputs/typo`` when
    ``outputs/`` exists: a typo, not the Hub organisation "outputs").
    """
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.endswith("/") \
            or (len(name) > 1 and name[1] == ":") or name.count("/") > 1:
        return True
    if not _HUB_ID.fullmatch(name) or ".." in name or "--" in name:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _not_a_model_folder(key: str, name: str, path: Path, expected: str) -> ConfigError:
    if not path.exists():
        return ConfigError(f"{key}={name!r}: not a model folder: {path} does not exist (expected a folder with "
                           f"{expected}, a .gguf file, a hub name or a model asset: {_model_assets()}).")
    checkpoints = sorted(path.glob("checkpoint-*/config.json")) + sorted(path.glob("checkpoint-*/adapter_config.json"))
    ggufs = sorted(path.glob("*.gguf"))
    if checkpoints:
        hint = f"; it holds checkpoints: give one, e.g. {checkpoints[-1].parent}"
    elif ggufs:
        hint = f"; it holds a GGUF file: give that file, e.g. {ggufs[0]}"
    else:
        hint = "; give the folder a training run saved its model in, or a hub name or model asset"
    return ConfigError(f"{key}={name!r}: not a model folder: {path} (expected {expected}){hint}.")


def portable_model_name(name: str) -> str:
    """What a saved adapter records as its base: an asset or hub name as it is, a local path made absolute
    (a relative one resolves only from the folder the run started in)."""
    if name in assets.ASSETS or not looks_like_local_path(name) and not Path(name).exists():
        return name
    return str(Path(name).expanduser().resolve())


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model of a LoRA adapter folder, as a name :func:`load_model` finds from any working directory.

    Adapters saved by older versions (or plain PEFT) may record a relative path; when it does not exist from
    here, it is looked for next to the adapter and in the folders above it (where the run most likely
    started).
    """
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config_file}: not readable JSON ({e}).") from e
    if not base:
        raise ModelLoadError(f"{config_file}: base_model_name_or_path is empty; cannot tell which model the adapter "
                             "belongs to.")
    if base in assets.ASSETS or Path(base).expanduser().is_absolute() or Path(base).exists():
        return base
    for folder in [adapter_dir.resolve(), *adapter_dir.resolve().parents]:
        candidate = folder / base
        if any((candidate / f).is_file() for f in _MODEL_FILES) or candidate.suffix == ".gguf" and candidate.is_file():
            logger.warning("%s names its base model by the relative path %r: using %s.", config_file, base, candidate)
            return str(candidate)
    return base


def _resolve_source(name_or_path: str, gguf_file: str | None, key: str, *, tokenizer: bool = False) -> _Source:
    asset = assets.resolve_model(name_or_path)
    if asset is not None:
        if gguf_file:
            raise ConfigError(f"{key}={name_or_path!r} is an asset (a converted HF folder): remove model.gguf_file.")
        return _Source(str(asset), None, name_or_path, True)
    path = Path(name_or_path).expanduser()
    if name_or_path.lower().endswith(".gguf"):
        if gguf_file:
            raise ConfigError(f"{key}={name_or_path!r} is already a .gguf file: remove model.gguf_file.")
        if not path.is_file():
            raise ConfigError(f"{key}={name_or_path!r}: no such GGUF file.")
        return _Source(str(path.parent), path.name, str(path.resolve()), True)
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            raise ConfigError(f"model.gguf_file={gguf_file!r}: not found in {path}.")
        wanted = _MODEL_FILES + _TOKENIZER_FILES if tokenizer else _MODEL_FILES
        if not gguf_file and not any((path / f).is_file() for f in wanted):
            raise _not_a_model_folder(key, name_or_path, path, "config.json")
        name = str((path / gguf_file).resolve()) if gguf_file else str(path.resolve())
        return _Source(str(path), gguf_file, name, True)
    if path.exists() or looks_like_local_path(name_or_path):
        raise _not_a_model_folder(key, name_or_path, path, "config.json")
    return _Source(name_or_path, gguf_file, name_or_path, False)


def _model_assets() -> str:
    return ", ".join(n for n, spec in assets.ASSETS.items() if spec.kind == "model")


@functools.lru_cache(maxsize=4)
def _hub_unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` (or the proxy in front of it) cannot be reached, or None: one TCP connect, 3 s at most.

    huggingface_hub retries a failed connection for ~50 s with a warning each time; a refused connection or
    an unknown host answers at once, so offline users learn it in one line instead.
    """
    import socket
    import urllib.parse
    import urllib.request

    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 8080
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def from_hub(load: Callable[..., Any], name: str, key: str, **kwargs: Any) -> Any:
    """``load(name, **kwargs)`` (a ``from_pretrained``) for a Hugging Face Hub ``name``; an error is one line.

    When the Hub cannot be reached, a copy in the local Hugging Face cache is used as HF_HUB_OFFLINE=1 would,
    and without one the error comes at once, not after the Hub client's retries.
    """
    from huggingface_hub import constants, is_offline_mode

    offline = is_offline_mode()
    unreachable = None if offline else _hub_unreachable(constants.ENDPOINT)
    if unreachable:
        kwargs["local_files_only"] = True
    try:
        return load(name, **kwargs)
    except OSError as e:
        import difflib

        close = difflib.get_close_matches(name.lower(), _model_assets().split(", "), n=1, cutoff=0.5)
        hint = f" Did you mean the asset {close[0]!r}?" if close else ""
        if unreachable or offline:
            why = f"the Hub is unreachable ({unreachable})" if unreachable else "HF_HUB_OFFLINE is set"
            raise ModelLoadError(f"{key}={name!r}: not a local folder or an asset, not in the Hugging Face cache, "
                                 f"and {why}.{hint} Give a local model folder or a model asset "
                                 f"({_model_assets()}).") from None
        reason = " ".join(str(e).split())[:300]
        raise ModelLoadError(f"{key}={name!r}: not a local folder or an asset, and loading it from the Hugging Face "
                             f"Hub failed: {reason}{hint}") from None


def _from_pretrained(cls: Any, source: _Source, key: str, **kwargs: Any) -> Any:
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.local:
        return cls.from_pretrained(source.path, **kwargs)
    return from_hub(cls.from_pretrained, source.path, key, **kwargs)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _read_chat_template(value: str) -> str:
    if "{{" in value or "{%" in value:
        template = value
    else:
        path = Path(value).expanduser()
        if path.is_file():
            template = path.read_text()
        else:
            raise ConfigError(f"model.chat_template={value!r}: neither a Jinja template (no '{{{{' or '{{%') "
                              "nor an existing file; give the template text or the path of a .jinja file.")
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"model.chat_template: not valid Jinja (line {e.lineno}): {e.message}") from e
    return template


def ensure_pad_token(tokenizer: Any) -> bool:
    """Give ``tokenizer`` a pad token if it has none (eos, else unk, else a new "<|pad|>"); True if a token was added.

    Many causal LMs ship without one (the Qwen2/Llama "no padding token is defined" error on batching).
    Padding positions are masked out of every loss, so reusing eos is safe.
    """
    if tokenizer.pad_token is not None:
        return False
    for attr in ("eos_token", "unk_token"):
        token = getattr(tokenizer, attr)
        if token is not None:
            tokenizer.pad_token = token
            logger.warning("The tokenizer has no pad token: using its %s %r (id %d) as pad.",
                           attr.removesuffix("_token"), token, tokenizer.pad_token_id)
            return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN_ADDED})
    logger.warning("The tokenizer has no pad, eos or unk token: added a new pad token %r (id %d); the model's "
                   "embeddings are resized to match.", PAD_TOKEN_ADDED, tokenizer.pad_token_id)
    return True


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of ``cfg.tokenizer`` (or the model's own), with pad token, chat template override, right padding."""
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    source = _resolve_source(cfg.tokenizer or cfg.name_or_path, None if cfg.tokenizer else cfg.gguf_file, key,
                             tokenizer=True)  # a bad path fails before transformers is even imported
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision and not cfg.tokenizer:
        kwargs["revision"] = cfg.revision
    tokenizer = _from_pretrained(AutoTokenizer, source, key, **kwargs)
    if cfg.chat_template:
        tokenizer.chat_template = _read_chat_template(cfg.chat_template)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"  # training; generation code switches to left itself
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def _bnb_config(dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        raise MissingPackageError(f"model.finetune=qlora needs bitsandbytes: pip install alignkit[qlora] ({e}).") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # 4-bit weights packed in the run dtype: ZeRO-3 can shard them
    )


def _kbit_device_map() -> dict[str, Any] | None:
    """Each process quantizes onto its own GPU; None on CPU and under ZeRO-3 (DeepSpeed places weights)."""
    if not torch.cuda.is_available():
        return None
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    index = local_rank if 0 <= local_rank < torch.cuda.device_count() else torch.cuda.current_device()
    return {"": index}


def _lora_config(cfg: ModelConfig, task: str, model: Any) -> Any:
    from peft import LoraConfig, TaskType

    targets = list(cfg.lora_target_modules)
    if not targets:
        raise ConfigError("model.lora_target_modules is empty; use ['all-linear'] or module names like q_proj.")
    if "all-linear" in targets:
        if len(targets) > 1:
            raise ConfigError("model.lora_target_modules: 'all-linear' already means every linear layer; use it alone.")
        target_modules: Any = "all-linear"
    else:
        target_modules = targets
    modules_to_save = None
    if task == "seq_cls":  # the new classification head must train in full
        modules_to_save = [h for h in _SEQ_CLS_HEADS if isinstance(getattr(model, h, None), torch.nn.Module)][:1]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules,
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
        modules_to_save=modules_to_save or None,
    )


def _apply_lora(model: Any, cfg: ModelConfig, task: str) -> Any:
    from peft import get_peft_model

    lora_config = _lora_config(cfg, task, model)
    try:
        return get_peft_model(model, lora_config)
    except ValueError as e:
        if "not found" not in str(e).lower():
            raise
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"model.lora_target_modules={cfg.lora_target_modules}: {e}. Linear layers of this "
                          f"model: {', '.join(names)} (or use 'all-linear').") from e


@contextlib.contextmanager
def _load_report_held() -> Iterator[list[logging.LogRecord]]:
    """Hold back the LOAD REPORT table that from_pretrained logs (weights missing from or unexpected in the
    checkpoint) until :func:`_report_unexpected_loading` has seen whether it says anything unexpected."""
    held: list[logging.LogRecord] = []

    class Hold(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "LOAD REPORT" in str(record.msg):
                held.append(record)
                return False
            return True

    hold, transformers_logger = Hold(), logging.getLogger("transformers.modeling_utils")
    transformers_logger.addFilter(hold)
    try:
        yield held
    finally:
        transformers_logger.removeFilter(hold)


def _report_unexpected_loading(info: dict[str, Any], held: list[logging.LogRecord], task: str, name: str) -> None:
    """Pass the held LOAD REPORT on only when the checkpoint does not match in a way nobody planned.

    Expected, and said in one INFO line instead: a classifier built on a causal LM or a base encoder (a
    critic, a reward model to train, an adapter's base in a reward-model merge) has a new score head, and
    the LM head it leaves out is unused.
    """
    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    new_head = {k for k in missing if k.split(".", 1)[0] in _SEQ_CLS_HEADS} if task == "seq_cls" else set()
    unused_lm_head = {k for k in unexpected if k.split(".", 1)[0] == "lm_head"} if task == "seq_cls" else set()
    if missing - new_head or unexpected - unused_lm_head or info.get("mismatched_keys") or info.get("error_msgs"):
        for record in held:
            logging.getLogger(record.name).handle(record)
        return
    if new_head:  # the caller says what the head is for (e.g. "a zero-initialised value head")
        logger.debug("%s: new %s (not in the checkpoint)%s.", name, ", ".join(sorted(new_head)),
                     "; its LM head is left out" if unused_lm_head else "")


def load_model(
    cfg: ModelConfig,
    tokenizer: Any,
    *,
    task: str = "causal_lm",
    num_labels: int = 1,
    dtype: str | torch.dtype | None = None,
    trainable: bool = True,
) -> Any:
    """Load the model of ``cfg`` for ``task`` ("causal_lm" or "seq_cls") and set it up for ``cfg.finetune``.

    trainable=False gives a frozen model in eval mode without LoRA or quantization (reference, teacher,
    reward models). The model is on CPU (QLoRA: on this process' GPU when there is one); the engine
    places it.
    """
    import transformers

    if task not in TASKS:
        raise ValueError(f"task={task!r}: use one of {', '.join(TASKS)}.")
    finetune = cfg.finetune if trainable else "full"
    if finetune not in ("full", "lora", "qlora"):
        raise ConfigError(f"model.finetune={finetune!r}: use full, lora or qlora.")
    dtype = resolve_dtype(cfg.dtype if dtype is None else dtype)
    source = _resolve_source(cfg.name_or_path, cfg.gguf_file, "model.name_or_path")
    auto_cls = getattr(transformers, TASKS[task])

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if task == "seq_cls":
        kwargs.update(num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
    if finetune == "qlora":
        if source.gguf_file:
            raise ConfigError("model.finetune=qlora cannot quantize a GGUF checkpoint: convert it once with "
                              "alignkit.gguf.convert_gguf(file, folder) and load the folder (or use lora).")
        kwargs["quantization_config"] = _bnb_config(dtype)
        device_map = _kbit_device_map()
        if device_map is not None:
            kwargs["device_map"] = device_map

    if source.gguf_file:
        model = load_gguf(auto_cls, source.path, source.gguf_file, dtype, **kwargs)
    else:
        with _load_report_held() as held:
            model, info = _from_pretrained(auto_cls, source, "model.name_or_path", dtype=dtype,
                                           output_loading_info=True, **kwargs)
        _report_unexpected_loading(info, held, task, source.name)
    # adapters record this as their base: keep asset names portable instead of a cache path
    model.config.name_or_path = source.name
    model.name_or_path = source.name

    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        logger.warning("The tokenizer has %d tokens but the model %d embeddings: resizing the embeddings.",
                       len(tokenizer), n_embeddings)
        model.resize_token_embeddings(len(tokenizer))
        model._alignkit_resized_embeddings = True  # adapters must then save the embeddings (save_model)
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id

    if not trainable:
        model.eval()
        model.requires_grad_(False)
        return model

    checkpointing = {"use_reentrant": False}
    if finetune == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
        if finetune != "full":  # frozen embeddings: make the checkpointed inputs carry grad
            model.enable_input_require_grads()
    if finetune in ("lora", "qlora"):
        model = _apply_lora(model, cfg, task)
    return model


# --------------------------------------------------------------------------------------------------
# PEFT helpers, counting, saving, merging
# --------------------------------------------------------------------------------------------------


def is_deepspeed_engine(model: Any) -> bool:
    # by class name: importing deepspeed just to check costs seconds
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def unwrap_model(model: Any) -> Any:
    """The model inside DDP / DataParallel / DeepSpeedEngine / torch.compile wrappers (a PeftModel stays one)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) \
                or is_deepspeed_engine(model):
            model = model.module
        elif "_orig_mod" in getattr(model, "__dict__", {}).get("_modules", {}):
            model = model._orig_mod
        else:
            return model


def is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(unwrap_model(model), PeftModel)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside the block (no dropout; gradient checkpointing inactive), the previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights are (its ``device`` attribute, else its first parameter's)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their unpacked size, ZeRO-3 their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", 0) or p.numel()
        if p.__class__.__name__ == "Params4bit":  # two 4-bit values per byte of storage
            n = n * 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def describe_model(model: Any) -> str:
    """One line: class, LoRA settings, parameter counts, dtype, device, quantization."""
    inner = unwrap_model(model)
    base = inner.get_base_model() if is_peft_model(inner) else inner
    name = type(base).__name__
    if is_peft_model(inner):
        lora = inner.peft_config[inner.active_adapter]
        name += f" + LoRA(r={lora.r}, alpha={lora.lora_alpha})"
    trainable, total = count_parameters(inner)
    pct = 100.0 * trainable / max(total, 1)
    quant = ", 4-bit NF4" if getattr(base, "is_loaded_in_4bit", False) else ""
    try:
        where = f"{base.dtype}, {base.device}".replace("torch.", "")
    except (AttributeError, StopIteration):
        where = "?"
    return f"{name}: {total / 1e6:.1f}M params, {trainable / 1e6:.2f}M trainable ({pct:.2f}%), {where}{quant}"


def save_model(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    state_dict: dict | None = None,
    is_main_process: bool = True,
    safe_serialization: bool = True,
) -> Path:
    """save_pretrained the model (a PEFT model saves its adapter only) and the tokenizer into ``path``.

    ``state_dict``: weights gathered by the caller (DeepSpeed ZeRO-3); every process may call this, only
    the main one writes.
    """
    inner = unwrap_model(model)
    path = Path(path)
    with _no_transformers_progress_bars():  # "Writing model shards" would land inside the training bar
        _save_pretrained(inner, path, state_dict, is_main_process, safe_serialization)
    if is_main_process and tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def _no_transformers_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _save_pretrained(inner: Any, path: Path, state_dict: dict | None, is_main_process: bool,
                     safe_serialization: bool) -> None:
    if is_peft_model(inner):
        for adapter in inner.peft_config.values():  # a relative base resolves only from where the run started
            if adapter.base_model_name_or_path:
                adapter.base_model_name_or_path = portable_model_name(adapter.base_model_name_or_path)
        inner.save_pretrained(path, state_dict=state_dict, is_main_process=is_main_process,
                              safe_serialization=safe_serialization,
                              save_embedding_layers=_save_embedding_layers(inner))
    else:
        if not safe_serialization:
            logger.warning("transformers >= 5 always writes safetensors; safe_serialization=False is ignored.")
        inner.save_pretrained(path, state_dict=state_dict, is_main_process=is_main_process)


def _save_embedding_layers(peft_model: Any) -> bool | str:
    """Whether an adapter must carry the (resized) embeddings, decided without asking the Hub when we know.

    peft's "auto" reads the base's config.json, from the Hub when the base is not a local folder: an
    asset name or a .gguf path would cost a network round trip (or a hang offline) on every save.
    """
    if getattr(peft_model.get_base_model(), "_alignkit_resized_embeddings", False):
        return True
    base = peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path or ""
    if base in assets.ASSETS or base.lower().endswith(".gguf"):
        return False
    return "auto"


def _num_labels_from_adapter(adapter_dir: Path) -> int:
    from safetensors import safe_open

    file = adapter_dir / "adapter_model.safetensors"
    if file.is_file():
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if key.endswith(".weight") and any(h in parts for h in _SEQ_CLS_HEADS):
                    return f.get_slice(key).get_shape()[0]
    return 1


def merge_lora(adapter_dir: str | Path, output_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Merge a LoRA adapter folder into its base model and save a plain HF folder (with tokenizer).

    The base is read from adapter_config.json (asset names, local folders, GGUF files and hub names all
    work). ``dtype``: the merge and output precision (float32 is exact; bfloat16 halves the size).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{adapter_dir}: no adapter_config.json; merge_lora needs a LoRA adapter folder "
                             "(saved by a finetune: lora or qlora run).")
    base = adapter_base(adapter_dir)
    adapter_config = json.loads(config_file.read_text())
    task = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls"}.get(adapter_config.get("task_type") or "CAUSAL_LM")
    if task is None:
        raise ModelLoadError(f"{config_file}: task_type {adapter_config.get('task_type')!r} is not supported "
                         "(CAUSAL_LM or SEQ_CLS).")
    base_cfg = ModelConfig(name_or_path=base, revision=adapter_config.get("revision"), dtype=dtype)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(adapter_dir)) if has_tokenizer else base_cfg)
    num_labels = _num_labels_from_adapter(adapter_dir) if task == "seq_cls" else 1
    model = load_model(base_cfg, tokenizer, task=task, num_labels=num_labels, trainable=False)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return Path(output_dir)
