"""Typed run configuration: dataclasses, YAML loading, ``--set`` overrides, validation.

A run config has four sections::

    model:    ModelConfig     what to load and how to fine-tune it (full / LoRA / QLoRA)
    data:     DataConfig      where the data comes from and how it is tokenized
    training: TrainingConfig  the training loop: optimiser, schedule, precision, logging, checkpoints
    <method>: e.g. ``sft:``   the method's own options (one dataclass per method, defined in its module;
                              online methods nest ``generation:`` and ``reward:`` subsections in it)

Every field has a default and a one-line doc (the ``doc`` metadata), which ``alignkit config METHOD``
prints. Unknown keys are errors that name the key and suggest the closest valid one.

This module knows no method: :mod:`alignkit.methods` maps method names to their config classes, and
:func:`build_config` takes the class it is given.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from alignkit.errors import AlignkitError


class ConfigError(AlignkitError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def opt(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a one-line doc shown by ``alignkit config``."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


# --------------------------------------------------------------------------------------------------
# Sections shared by every method
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str = opt(
        "smollm2-135m-instruct",
        "Hub name, local HF folder, .gguf file, or a named offline asset (see `alignkit assets`).",
    )
    gguf_file: str | None = opt(None, "GGUF file inside name_or_path (when it is a folder).")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit).")
    tokenizer: str | None = opt(None, "Tokenizer to load instead of the model's own.")
    dtype: str = opt("auto", "Weights dtype: auto (bf16 on GPUs that support it, else fp32), float32, bfloat16, float16.")
    attn_implementation: str | None = opt(None, "Attention kernel: sdpa, eager, flash_attention_2 (None: transformers' default).")
    trust_remote_code: bool = opt(False, "Run model code from the hub. Off unless you trust the repository.")
    chat_template: str | None = opt(None, "Jinja chat template (or path to one) overriding the tokenizer's.")
    finetune: str = opt("full", "full, lora or qlora (4-bit NF4 base + LoRA; needs bitsandbytes).")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = opt(factory=lambda: ["all-linear"], doc="Modules that get adapters; 'all-linear' = every linear layer but the LM head.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward: less memory, ~30% slower. Off unless needed.")

    def validate(self) -> None:
        check_choice("model.finetune", self.finetune, ["full", "lora", "qlora"])
        check_choice("model.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"])


@dataclass
class DataSource:
    path: str = opt(doc="JSON/JSONL/Parquet/CSV file (optionally .gz), a folder saved by `datasets`, a hub dataset "
                        "name, a named asset, a LLaMA-Factory registry entry: data/dataset_info.json#name, or a "
                        "reasoning-gym task: reasoning_gym:TASK?size=N&seed=S (split: test = held out).")
    split: str = opt("train", "Split to read (hub datasets and DatasetDict folders).")
    subset: str | None = opt(None, "Hub dataset configuration name.")
    ratio: float = opt(1.0, "Mixing weight: rows drawn from this source = ratio * its size (ratio > 1 repeats rows).")
    columns: dict[str, str] = opt(factory=dict, doc="Rename columns to the expected names, e.g. {question: prompt, answer: completion}.")
    limit: int | None = opt(None, "Read at most this many rows (before mixing).")
    format: str = opt("auto", "Record format: auto, messages, messages_label, prompt_completion, prompt, preference, "
                              "unpaired, alpaca, alpaca_preference, alpaca_label, sharegpt, sharegpt_preference, "
                              "sharegpt_label, text.")


@dataclass
class DataConfig:
    train: list[DataSource] = opt(factory=list, doc="Training sources (a list; a bare string is one path).")
    eval: list[DataSource] = opt(factory=list, doc="Evaluation sources; when empty, eval_split carves one from train.")
    eval_split: float = opt(0.0, "Fraction (<1) or count (>=1) of training rows held out for eval when `eval` is empty.")
    max_length: int = opt(1024, "Max tokens per sequence (prompt + completion).")
    max_prompt_length: int | None = opt(None, "Max prompt tokens; prompts are cut from the left.")
    system_prompt: str | None = opt(None, "System message prepended to conversations that have none.")
    on_bad_row: str = opt("error", "error: stop at a malformed row naming file/row/field; skip: drop it and log a count.")
    shuffle_seed: int = opt(0, "Seed for mixing and the eval split (training order uses training.seed).")

    def validate(self) -> None:
        check_choice("data.on_bad_row", self.on_bad_row, ["error", "skip"])
        if self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length} is too small; use at least 8 tokens.")
        if self.eval_split < 0 or (self.eval_split >= 1 and self.eval_split != int(self.eval_split)):
            raise ConfigError(f"data.eval_split={self.eval_split}: give a fraction below 1 (e.g. 0.05) or a whole "
                              "number of rows (e.g. 100).")

    def describe_train(self) -> str:
        """The training sources, for messages: ``data.train (a.jsonl, b.jsonl)``."""
        return f"data.train ({', '.join(src.path for src in self.train)})"


@dataclass
class TrainingConfig:
    output_dir: str = opt("outputs/run", "Where the final model, checkpoints, config and logs go.")
    overwrite_output_dir: bool = opt(False, "Allow writing into an output_dir that already holds checkpoints without resuming.")
    resume: str | None = opt(None, "Resume from: 'latest' (newest complete checkpoint in output_dir) or a checkpoint path.")
    num_epochs: float = opt(1.0, "Passes over the training data (fractions allowed). Ignored when max_steps > 0.")
    max_steps: int = opt(-1, "Optimizer updates to run (online RL: rollout steps); overrides num_epochs when > 0.")
    per_device_batch_size: int = opt(4, "Rows per micro-batch on each process.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer update. Global batch = this * per_device * processes.")
    learning_rate: float = opt(2e-5, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    lr_scheduler: str = opt("cosine", "LR schedule after warmup: cosine, linear, constant.")
    warmup_ratio: float = opt(0.0, "Fraction of updates spent warming up linearly from 0.")
    warmup_steps: int = opt(0, "Warmup updates (overrides warmup_ratio when > 0).")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 disables).")
    mixed_precision: str = opt("auto", "no, bf16, fp16, or auto (bf16 on GPUs that support it, else no).")
    seed: int = opt(42, "Seed for model init, dropout and data order.")
    logging_steps: int = opt(1, "Log metrics every N updates (online RL: rollout steps).")
    eval_steps: int = opt(0, "Evaluate every N updates (0: only at the end, when there is eval data).")
    save_steps: int = opt(0, "Write a checkpoint every N updates (online RL: rollout steps; 0: none until the end).")
    save_total_limit: int | None = opt(None, "Keep only the newest N checkpoints.")
    report_to: list[str] = opt(factory=lambda: ["jsonl", "tensorboard", "plots"],
                               doc="Loggers: jsonl, tensorboard, wandb, plots (PNG curves in output_dir/plots at the end).")
    wandb_project: str | None = opt(None, "W&B project (when report_to has wandb).")
    run_name: str | None = opt(None, "Run name for loggers (default: output_dir's name).")
    max_nonfinite_updates: int = opt(3, "Stop after this many consecutive updates with a NaN/Inf loss or gradient.")
    num_processes: int = opt(1, "Processes to launch (alignkit launches them itself with a free port).")
    deepspeed: str | None = opt(None, "DeepSpeed: zero1, zero2, zero3, or a path to a DeepSpeed JSON config.")
    zero_offload: bool = opt(False, "With ZeRO-2/3: keep optimizer state (and ZeRO-3 params) in CPU memory.")
    fsdp: str = opt("", "PyTorch FSDP2 instead of DeepSpeed: full_shard (parameters, gradients and optimizer state "
                        "sharded, like ZeRO-3) or shard_grad_op (parameters stay gathered between forward and "
                        "backward, like ZeRO-2); empty: off.")
    fsdp_cpu_offload: bool = opt(False, "With fsdp: keep the sharded parameters, gradients and optimizer state in "
                                        "CPU memory (slower; for models that do not fit otherwise).")
    dataloader_num_workers: int = opt(0, "DataLoader worker processes.")
    group_by_length: bool = opt(False, "Offline methods: batch rows of similar length (windows of 50 global batches sorted by length, batch order shuffled); same rows per epoch, exact resume.")

    def validate(self) -> None:
        check_choice("training.lr_scheduler", self.lr_scheduler, ["cosine", "linear", "constant"])
        check_choice("training.mixed_precision", self.mixed_precision, ["auto", "no", "bf16", "fp16"])
        for name in self.report_to:
            check_choice("training.report_to", name, ["jsonl", "tensorboard", "wandb", "plots"])
        if self.fsdp:
            check_choice("training.fsdp", self.fsdp, ["full_shard", "shard_grad_op"])
        if self.fsdp and self.deepspeed:
            raise ConfigError(f"training.fsdp={self.fsdp} and training.deepspeed={self.deepspeed} are both set: they "
                              "are two ways to shard the same training; keep one.")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ConfigError("training.fsdp_cpu_offload=true needs training.fsdp=full_shard or shard_grad_op "
                              "(with DeepSpeed use training.zero_offload).")
        if self.deepspeed and self.deepspeed not in ("zero1", "zero2", "zero3") and not Path(self.deepspeed).is_file():
            raise ConfigError(
                f"training.deepspeed={self.deepspeed!r}: use zero1, zero2, zero3 or the path of a DeepSpeed JSON file."
            )
        rules = [
            ("per_device_batch_size", self.per_device_batch_size >= 1, ">= 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1"),
            ("num_processes", self.num_processes >= 1, ">= 1"),
            ("learning_rate", self.learning_rate > 0, "> 0 (e.g. 2e-5)"),
            ("num_epochs", self.num_epochs > 0, "> 0"),
            ("max_steps", self.max_steps == -1 or self.max_steps > 0, "> 0, or -1 to train for num_epochs"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "in [0, 1)"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, "in [0, 1)"),
            ("adam_epsilon", self.adam_epsilon > 0, "> 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
            ("logging_steps", self.logging_steps >= 1, ">= 1"),
            ("eval_steps", self.eval_steps >= 0, ">= 0 (0: only at the end)"),
            ("save_steps", self.save_steps >= 0, ">= 0 (0: no checkpoints until the end)"),
            ("save_total_limit", self.save_total_limit is None or self.save_total_limit >= 1, ">= 1 (or null)"),
            ("max_nonfinite_updates", self.max_nonfinite_updates >= 1, ">= 1"),
            ("dataloader_num_workers", self.dataloader_num_workers >= 0, ">= 0"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"training.{name}={getattr(self, name)!r}: must be {rule}.")
        if self.resume not in (None, "latest") and not Path(self.resume).exists():
            raise ConfigError(f"training.resume={self.resume!r}: no such checkpoint; use 'latest' or a checkpoint folder.")
        blocking = file_in_the_way(self.output_dir)
        if blocking is not None:
            raise ConfigError(f"training.output_dir={self.output_dir!r}: {blocking} is a file, not a folder; choose "
                              "another output_dir.")


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    method_args: Any = None  # the method's own dataclass, read from the YAML section named after the method

    def validate(self) -> RunConfig:
        self.model.validate()
        self.data.validate()
        self.training.validate()
        if hasattr(self.method_args, "validate"):
            self.method_args.validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {
            "method": self.method,
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "training": dataclasses.asdict(self.training),
        }
        if self.method_args is not None:
            out[self.method] = dataclasses.asdict(self.method_args)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def build_config(method: str, method_config: type, raw: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> RunConfig:
    """Build and validate a RunConfig for ``method`` (whose section is a ``method_config``) from a plain
    dict (YAML) and ``section.key=value`` overrides."""
    raw = dict(raw or {})
    if "method" in raw:
        if raw["method"] != method:
            raise ConfigError(f"the config file says method: {raw['method']!r} but the command asks for {method!r}.")
        raw.pop("method")
    for item in overrides or []:
        _apply_override(raw, item)
    sections = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig, method: method_config}
    for key in raw:
        if key not in sections:
            raise ConfigError(f"unknown config section {key!r}{_suggest(key, sections)}; sections: {', '.join(sections)}.")
    cfg = RunConfig(
        method=method,
        model=_from_dict(ModelConfig, raw.get("model") or {}, "model"),
        data=_from_dict(DataConfig, raw.get("data") or {}, "data"),
        training=_from_dict(TrainingConfig, raw.get("training") or {}, "training"),
        method_args=_from_dict(method_config, raw.get(method) or {}, method),
    )
    return cfg.validate()


class DuplicateKeyError(ValueError):
    """A key given twice in one YAML mapping; ``line`` is 1-based."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last silently,
    so a setting written twice in a long file takes effect once, unnoticed)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` merges, its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise DuplicateKeyError(f"the key {key!r} is given twice in one section (first on line {seen[key]}); "
                                        "keep one.", line)
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, method: str) -> dict[str, Any]:
    """The top-level mapping of a YAML config file, or a ConfigError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found.")
    try:
        raw = yaml.load(p.read_text(), Loader=UniqueKeyLoader) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"{p} line {e.line}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, training, {method}).")
    return raw


# --------------------------------------------------------------------------------------------------
# Helpers: typed conversion, overrides, suggestions, docs
# --------------------------------------------------------------------------------------------------


def file_in_the_way(folder: str | Path) -> Path | None:
    """The existing file that keeps ``folder`` from being a folder (``folder`` itself or one of its parents), or
    None when the folder exists or can be created."""
    path = Path(folder).expanduser()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_choice(name: str, value: Any, choices: Any) -> None:
    """ConfigError naming ``name`` (e.g. ``grpo.loss_agg``) when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid{_suggest(str(value), choices)}; choose one of: {', '.join(choices)}.")


def _suggest(key: str, valid: Any) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. training.learning_rate=1e-5.")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"override {item!r}: name the section, e.g. training.{parts[0]}={value}.")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section.")
        node = nxt
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def _from_dict(cls: type, data: Any, where: str, base: Any = None) -> Any:
    """``cls`` from a mapping. Keys left out keep their defaults: the field's own, or those of ``base``
    (the instance a nested section's default factory makes, so ``grpo.generation: {max_new_tokens: 64}``
    keeps GRPO's ``num_samples``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}{_suggest_key(key, cls, where)}. Run `alignkit config` to "
                              "list options.")
        f = fields[key]
        nested_base = getattr(base, key) if base is not None else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}", nested_base)
    if base is not None:
        kwargs = {**{n: getattr(base, n) for n in fields if n not in kwargs}, **kwargs}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}.")
    return cls(**kwargs)


# keys that were renamed when they moved into a nested section (0.1 -> 0.2), and names users reach for
_RENAMED = {"engine": "sampler", "generation_batch_size": "batch_size",
            "verifier": "answer", "accuracy": "answer", "math_verify": "answer", "answer_key": "answer_column",
            "solution_column": "answer_column", "format": "format_pattern"}


def _suggest_key(key: str, cls: type, where: str) -> str:
    """`` (did you mean ...?)`` for a mistyped key; a key that belongs in a nested section is pointed there
    (``grpo.reward_model`` -> ``grpo.reward.model``, ``grpo.num_samples`` -> ``grpo.generation.num_samples``)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in names:
        if dataclasses.is_dataclass(hints[name]):
            inner = {f.name for f in dataclasses.fields(hints[name])}
            for candidate in (key, key.removeprefix(f"{name}_"), _RENAMED.get(key, key)):
                if candidate in inner:
                    return f" (did you mean {where}.{name}.{candidate}?)"
    close = [_RENAMED[key]] if _RENAMED.get(key) in names else difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, tp: Any, where: str, base: Any = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, base)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}.")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is DataSource:
            value = {"path": value}
        return _from_dict(tp, value, where, base)
    if origin is list:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            value = [value]  # a single item where a list is expected
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}.")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        return str(value)
    return value


def describe(method: str, method_config: type) -> str:
    """Every option of ``method`` (whose section is a ``method_config``), with default and doc, as YAML-like
    text. Nested sections (``generation:``, ``reward:``) show the method's own defaults."""
    lines = [f"# alignkit {method}: every option with its default. Set in YAML or with --set section.key=value."]
    sections = [("model", ModelConfig()), ("data", DataConfig()), ("training", TrainingConfig()),
                (method, method_config())]
    for name, instance in sections:
        lines.append(f"\n{name}:")
        lines += _describe_fields(instance, indent="  ")
        if isinstance(instance, DataConfig):
            lines.append("  # each entry of data.train / data.eval:")
            lines += _describe_fields(DataSource, indent="  #   ")
    return "\n".join(lines)


def _describe_fields(instance: Any, indent: str) -> list[str]:
    """One line per field of a dataclass (class or instance: an instance shows its own values)."""
    out = []
    for f in dataclasses.fields(instance):
        doc = f.metadata.get("doc", "")
        if not isinstance(instance, type):
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "<required>"
        if dataclasses.is_dataclass(default):
            out.append(f"{indent}{f.name}:  # {doc}")
            out += _describe_fields(default, indent + "  ")
            continue
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...").removesuffix("...").strip()
        out.append(f"{indent}{f.name}: {shown}  # {doc}")
    return out
