"""The pipeline file: stages (training or Python), defaults, ``--set`` overrides and ``${stage.field}``
references, read and checked before anything runs; each stage's config resolved and built."""

from __future__ import annotations

import copy
import difflib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.api import build_config
from alignkit.config import ConfigError, DuplicateKeyError, RunConfig, UniqueKeyLoader
from alignkit.methods import METHODS, check_method

STATE_FILE = "pipeline_state.json"
REFERENCE = re.compile(r"\$\{([^${}]*)\}")
_STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_TOP_KEYS = ("output_dir", "defaults", "stages")
_SHARED_SECTIONS = ("model", "data", "training")
_PYTHON_KEYS = ("name", "run", "args", "outputs")
_RESERVED_NAMES = ("output_dir", "defaults", "stages")
# the pipeline decides these per run (resume an interrupted stage, start a rerun over): never part of a
# stage's identity
RUN_CONTROL = ("resume", "overwrite_output_dir")


# --------------------------------------------------------------------------------------------------
# The file: stages, defaults, references
# --------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    index: int  # position in the file, from 0
    method: str | None  # a training stage: any name in alignkit.methods.METHODS
    run: str | None  # a Python stage: "package.module:function" or "path/file.py:function"
    body: dict[str, Any]  # training: its sections with the defaults merged in; Python: {"args": {...}}
    outputs: list[str]  # Python: the keys of its result that later stages may reference
    output_dir: Path

    @property
    def kind(self) -> str:
        return self.method or "python"


@dataclass
class Pipeline:
    path: Path
    output_dir: Path
    stages: list[Stage]
    training_overrides: dict[str, Any]  # --num-processes / --deepspeed, for every training stage

    @property
    def state_file(self) -> Path:
        return self.output_dir / STATE_FILE

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"pipeline file {str(path)!r} not found.")
    text = path.read_text()
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except DuplicateKeyError as e:
        raise ConfigError(f"{path} line {e.line}: {e}") from None
    except yaml.YAMLError as e:
        hint = (" A ${stage.field} reference inside [...] or {...} must be quoted: \"${sft.output_dir}\"."
                if "${" in text else "")
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}.{hint}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with {', '.join(_TOP_KEYS)}.")
    return raw


def _apply_set(raw: dict[str, Any], item: str, path: Path) -> None:
    """``--set sft.training.max_steps=5`` (a stage), ``defaults.model.dtype=bfloat16`` or
    ``output_dir=...``."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. sft.training.max_steps=5 or "
                          "output_dir=outputs/x.")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    if parts == ["output_dir"]:
        raw["output_dir"] = parsed
        return
    if parts[0] == "defaults":
        node = raw.setdefault("defaults", {})
    else:
        stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
        names = [s.get("name") for s in stages if isinstance(s, dict)]
        if parts[0] not in names:
            raise ConfigError(f"--set {item!r}: {path} has no stage {parts[0]!r}{did_you_mean(parts[0], names)}; "
                              f"stages: {', '.join(map(str, names))} (or defaults.*, output_dir).")
        node = stages[names.index(parts[0])]
    if len(parts) < 2:
        raise ConfigError(f"--set {item!r}: name a key inside it, e.g. {parts[0]}.training.max_steps=5.")
    for p in parts[1:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"--set {item!r}: {p!r} is not a section.")
        node = node.setdefault(p, {})
    node[parts[-1]] = parsed


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` deep-merged over ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_stage(item: Any, index: int, defaults: dict[str, Any], output_dir: Path, seen: list[str]) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a mapping with name and method (or run), got {item!r}.")
    name = item.get("name")
    if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name) or name in _RESERVED_NAMES:
        raise ConfigError(f"{where}: every stage needs a name of letters, digits, _ or - (not starting with "
                          f"a digit, not {', '.join(_RESERVED_NAMES)}), got name: {name!r}.")
    if name in seen:
        raise ConfigError(f"stage {name}: two stages are named {name!r}; stage names must be unique.")
    where = f"stage {name}"
    if ("method" in item) == ("run" in item):
        raise ConfigError(f"{where}: give either method: (a training stage: {', '.join(METHODS)}) or run: (a "
                          "Python step, module:function or file.py:function).")
    if "run" in item:
        unknown = [k for k in item if k not in _PYTHON_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key "
                              f"{unknown[0]!r}{did_you_mean(unknown[0], list(_PYTHON_KEYS))} in a Python stage; "
                              f"its keys: {', '.join(_PYTHON_KEYS)}.")
        spec, args, outputs = item["run"], item.get("args") or {}, item.get("outputs") or []
        if not isinstance(spec, str) or ":" not in spec:
            raise ConfigError(f"{where}: run: {spec!r}: write package.module:function or "
                              "path/file.py:function.")
        if not isinstance(args, dict):
            raise ConfigError(f"{where}: args must be a mapping of the function's keyword arguments, got "
                              f"{args!r}.")
        if not isinstance(outputs, list) or not all(isinstance(o, str) and o for o in outputs):
            raise ConfigError(f"{where}: outputs must be a list of the result's keys, e.g. [train_file, "
                              "accuracy].")
        if "output_dir" in outputs:
            raise ConfigError(f"{where}: outputs: output_dir is every stage's folder already; give it "
                              "another name.")
        return Stage(name, index, None, spec, {"args": args}, outputs, output_dir / name)

    method = item["method"]
    try:
        check_method(str(method))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    sections = (*_SHARED_SECTIONS, method)
    body = {}
    for key, value in item.items():
        if key in ("name", "method"):
            continue
        if key not in sections:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, list(sections))}; a {method} "
                              f"stage has name, method and the sections {', '.join(sections)}.")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}.")
        body[key] = value
    body = _merge(defaults, body)
    training = body.get("training") or {}
    for key in RUN_CONTROL:
        if key in training:
            raise ConfigError(f"{where}: training.{key} is set by the pipeline (it resumes an interrupted "
                              "stage and starts a rerun over); remove it, and use --from or --only to rerun "
                              "a stage.")
    folder = Path(str(training["output_dir"])) if training.get("output_dir") else output_dir / name
    return Stage(name, index, method, None, body, [], folder)


def load_pipeline(path: str | Path, overrides: list[str] | None = None, *, num_processes: int | None = None,
                  deepspeed: str | None = None) -> Pipeline:
    """Read a pipeline file and check its structure and references (configs are built by :func:`plan`)."""
    path = Path(path)
    raw = _read_file(path)
    for item in overrides or []:
        _apply_set(raw, item, path)
    unknown = [k for k in raw if k not in _TOP_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], list(_TOP_KEYS))}; the "
                          f"top level has {', '.join(_TOP_KEYS)}.")
    output_dir = Path(str(raw.get("output_dir") or Path("outputs") / path.stem))
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: defaults must be a mapping of {', '.join(_SHARED_SECTIONS)}.")
    for key, value in defaults.items():
        if key not in _SHARED_SECTIONS:
            raise ConfigError(f"{path}: defaults.{key}: defaults hold only the shared sections "
                              f"{', '.join(_SHARED_SECTIONS)}{did_you_mean(key, list(_SHARED_SECTIONS))}; put "
                              "method sections in the stages.")
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: defaults.{key} must be a mapping, got {value!r}.")
    if "output_dir" in (defaults.get("training") or {}):
        raise ConfigError(f"{path}: defaults.training.output_dir: each stage writes its own folder under the "
                          "pipeline's output_dir; set output_dir: at the top instead.")
    items = raw.get("stages")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: stages must be a non-empty list of stages (name + method, or name + "
                          "run).")
    stages: list[Stage] = []
    for i, item in enumerate(items):
        stages.append(_parse_stage(item, i, defaults, output_dir, [s.name for s in stages]))
    training_overrides = {}
    if num_processes is not None:
        training_overrides["num_processes"] = num_processes
    if deepspeed is not None:
        training_overrides["deepspeed"] = deepspeed
    pipeline = Pipeline(path, output_dir, stages, training_overrides)
    _check_folders(pipeline)
    for stage in stages:
        for where, ref in _references(stage.body, ""):
            _check_reference(pipeline, stage, where, ref)
    return pipeline


def _check_folders(p: Pipeline) -> None:
    """Stage folders are distinct, and none holds another, the pipeline's folder or the current folder (a
    rerun empties a stage's folder)."""
    top = p.output_dir.resolve()
    folders = [(s, s.output_dir.resolve()) for s in p.stages]
    for stage, folder in folders:
        cwd = Path.cwd().resolve()
        if folder == top or folder in top.parents or folder == cwd or folder in cwd.parents:
            raise ConfigError(f"stage {stage.name}: training.output_dir={stage.output_dir} would hold the "
                              f"pipeline's folder {p.output_dir} (or the current folder); give the stage a "
                              "folder of its own.")
        for other, other_folder in folders:
            if other.index > stage.index and (folder == other_folder or folder in other_folder.parents
                                              or other_folder in folder.parents):
                raise ConfigError(f"stage {other.name}: its folder {other.output_dir} overlaps stage "
                                  f"{stage.name}'s {stage.output_dir}; every stage needs a folder of its "
                                  "own.")


def _references(value: Any, where: str) -> list[tuple[str, str]]:
    """(key path, reference text) for every ``${...}`` inside ``value``."""
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in _references(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in _references(v, f"{where}[{i}]")]
    if isinstance(value, str):
        return [(where, m.group(1)) for m in REFERENCE.finditer(value)]
    return []


def used_stages(p: Pipeline, stage: Stage) -> list[str]:
    """The earlier stages whose outputs ``stage`` refers to, in pipeline order."""
    names = {ref.strip().split(".")[0] for _, ref in _references(stage.body, "")}
    return [s.name for s in p.stages if s.name in names]


def _fields(stage: Stage) -> list[str]:
    return ["output_dir", *stage.outputs]


def _check_reference(p: Pipeline, stage: Stage, where: str, ref: str) -> None:
    text = "${" + ref + "}"
    parts = ref.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"stage {stage.name}: {where}: {text} is not a reference; write ${{stage.field}}, "
                          "e.g. ${sft.output_dir}.")
    source = p.stage(parts[0])
    if source is None:
        raise ConfigError(f"stage {stage.name}: {where}: {text} refers to no stage {parts[0]!r}"
                          f"{did_you_mean(parts[0], p.names)}; stages: {', '.join(p.names)}.")
    if source.index >= stage.index:
        order = "is this stage itself" if source is stage else f"runs after {stage.name}"
        raise ConfigError(f"stage {stage.name}: {where}: {text} refers to stage {source.name}, which "
                          f"{order}; a stage can only use the outputs of stages before it.")
    if parts[1] == "output_dir" and len(parts) > 2:
        raise ConfigError(f"stage {stage.name}: {where}: {text}: output_dir is a folder; write "
                          f"\"${{{source.name}.output_dir}}/{'/'.join(parts[2:])}\" for a path inside it.")
    if parts[1] not in _fields(source):
        declare = (" (declare the keys its function returns in its outputs: list)" if source.run else
                   " (a training stage's field is its output folder)")
        raise ConfigError(f"stage {stage.name}: {where}: {text}: stage {source.name} has no field "
                          f"{parts[1]!r}{did_you_mean(parts[1], _fields(source))}; its fields: "
                          f"{', '.join(_fields(source))}{declare}.")


# --------------------------------------------------------------------------------------------------
# Resolving references, building and checking each stage
# --------------------------------------------------------------------------------------------------

_NOT_YET = object()  # a Python stage's output before it has run


def _lookup(p: Pipeline, stage: Stage, where: str, ref: str, outputs: dict[str, dict]) -> Any:
    parts = ref.strip().split(".")
    source = p.stage(parts[0])
    if parts[1] == "output_dir" and len(parts) == 2:
        return str(source.output_dir)
    if source.name not in outputs:
        return _NOT_YET
    value: Any = outputs[source.name]
    for i, key in enumerate(parts[1:], start=1):
        if not isinstance(value, dict) or key not in value:
            got = ", ".join(value) if isinstance(value, dict) else type(value).__name__
            raise ConfigError(f"stage {stage.name}: {where}: ${{{ref}}}: stage {source.name} returned no "
                              f"{'.'.join(parts[1:i + 1])!r} (it returned: {got or 'nothing'}); fix its "
                              "function or the reference.")
        value = value[key]
    return value


def _resolve(p: Pipeline, stage: Stage, value: Any, where: str, outputs: dict[str, dict]) -> Any:
    """``value`` with its references replaced; one that is not known yet stays as its ``${...}`` text."""
    if isinstance(value, dict):
        return {k: _resolve(p, stage, v, f"{where}.{k}" if where else str(k), outputs)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(p, stage, v, f"{where}[{i}]", outputs) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    whole = REFERENCE.fullmatch(value)
    if whole:  # the value itself: keeps its type (a number, a list, ...)
        found = _lookup(p, stage, where, whole.group(1), outputs)
        return value if found is _NOT_YET else found

    def text(m: re.Match) -> str:
        found = _lookup(p, stage, where, m.group(1), outputs)
        return m.group(0) if found is _NOT_YET else str(found)

    return REFERENCE.sub(text, value)



def training_config(p: Pipeline, stage: Stage, outputs: dict[str, dict], **run_control: Any) -> RunConfig:
    """A training stage's validated RunConfig: its references resolved (``outputs``: the Python stages' results
    so far), its folder and the pipeline-wide training keys set."""
    raw = _resolve(p, stage, stage.body, "", outputs)
    training = raw.setdefault("training", {})
    training.update(output_dir=str(stage.output_dir), **p.training_overrides, **run_control)
    try:
        return build_config(stage.method, raw)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name}: {e}") from None


_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".gz")


def check_local_paths(p: Pipeline, stage: Stage, cfg: RunConfig) -> None:
    """A mistyped local path fails now, not when its stage starts hours later. Hub and asset names, and
    paths inside a stage folder of this pipeline (written when that stage runs), are left alone."""
    folders = [str(s.output_dir) for s in p.stages]
    paths = [(f"data.{split}[{i}].path", src.path) for split in ("train", "eval")
             for i, src in enumerate(getattr(cfg.data, split))]
    paths += [("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer or "")]
    reward = getattr(cfg.method_args, "reward", None)
    if reward is not None and reward.model:
        paths.append((f"{stage.method}.reward.model", reward.model))
    for key, value in paths:
        file = value.split("#", 1)[0]  # dataset_info.json#name: a LLaMA-Factory registry entry
        local = value.startswith(("/", "./", "../", "~")) or (key.startswith("data.") and
                                                              Path(file).suffix.lower() in _DATA_SUFFIXES)
        if (not value or "${" in value or not local or Path(file).expanduser().exists()
                or any(value == f or value.startswith(f"{f}/") for f in folders)):
            continue
        raise ConfigError(f"stage {stage.name}: {key}={value}: no such file or folder (relative paths are "
                          f"resolved from the current folder {Path.cwd()}).")


def step_function(stage: Stage) -> Callable:
    """The function a Python stage's ``run:`` names, imported."""
    from alignkit.rewards.functions import load_function

    try:
        return load_function(stage.run)
    except ConfigError as e:  # its messages speak of reward functions
        reason = str(e).replace(f"reward function {stage.run!r}: ", "")
        raise ConfigError(f"stage {stage.name}: run: {reason}") from None


def check_step_args(stage: Stage, fn: Callable, args: dict[str, Any]) -> None:
    """The step's ``args`` (plus ``output_dir`` when it takes one) fit its function's signature."""
    params = inspect.signature(fn).parameters
    names = [n for n, q in params.items() if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
    open_kwargs = any(q.kind is q.VAR_KEYWORD for q in params.values())
    if "output_dir" in args:
        raise ConfigError(f"stage {stage.name}: args.output_dir: the pipeline passes the stage's folder as "
                          "output_dir; remove it from args.")
    for key in args:
        if key not in names and not open_kwargs:
            raise ConfigError(f"stage {stage.name}: args.{key} is not a parameter of {stage.run}"
                              f"{did_you_mean(key, names)}; its parameters: {', '.join(names)}.")
    missing = [n for n, q in params.items() if q.default is q.empty and n != "output_dir"
               and q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY) and n not in args]
    if missing:
        raise ConfigError(f"stage {stage.name}: {stage.run} needs args.{missing[0]}.")


def python_config(p: Pipeline, stage: Stage, outputs: dict[str, dict]) -> dict[str, Any]:
    """A Python stage's resolved config: ``run``, ``args`` (references resolved) and ``outputs``."""
    return {"run": stage.run, "args": _resolve(p, stage, stage.body["args"], "args", outputs),
            "outputs": stage.outputs}
