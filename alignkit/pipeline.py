"""Pipelines: one YAML file that chains training stages and Python steps (SFT -> RM -> PPO, SFT -> DPO, ...).

    alignkit pipeline FILE.yaml [--dry-run] [--from STAGE | --only STAGE] [--set KEY=VALUE ...]
                                [--num-processes N] [--deepspeed zero1|zero2|zero3|FILE.json]

A file lists named stages in order. A training stage names a method and has that method's usual sections,
on top of the file's ``defaults`` (deep-merged: a stage's keys win). A Python stage runs
``fn(**args, output_dir=<its folder>)`` and returns a dict whose keys later stages can use::

    output_dir: outputs/my-pipeline         # stage folders: <output_dir>/<stage name>
    defaults:
      model: {dtype: bfloat16}
    stages:
      - name: sft
        method: sft
        model: {name_or_path: Qwen/Qwen2.5-0.5B-Instruct}
        data: {train: [chat.jsonl]}
      - name: ppo
        method: ppo
        model:
          name_or_path: ${sft.output_dir}    # an earlier stage's output folder
        ppo:
          reward: {model: my-rm-folder}
      - name: eval
        run: my_eval.py:evaluate             # or package.module:function
        args: {model: "${ppo.output_dir}"}
        outputs: [accuracy]                  # the returned keys later stages may use: ${eval.accuracy}

Before anything runs, every reference is checked and every stage's config is built and validated.
Finished stages are recorded in ``<output_dir>/pipeline_state.json`` and skipped on the next run; an
interrupted stage resumes from its latest complete checkpoint. The full story is docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import gc
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.api import build_config, setup_logging, train
from alignkit.config import ConfigError, RunConfig
from alignkit.errors import AlignkitError, TrainingError
from alignkit.methods import METHODS, check_method

logger = logging.getLogger("alignkit")

STATE_FILE = "pipeline_state.json"
SUMMARY_FILE = "pipeline_summary.json"
REFERENCE = re.compile(r"\$\{([^${}]*)\}")
_STAGE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_TOP_KEYS = ("output_dir", "defaults", "stages")
_SHARED_SECTIONS = ("model", "data", "training")
_PYTHON_KEYS = ("name", "run", "args", "outputs")
_RESERVED_NAMES = ("output_dir", "defaults", "stages")
# the pipeline decides these per run (resume an interrupted stage, start a rerun over): never part of a
# stage's identity
_RUN_CONTROL = ("resume", "overwrite_output_dir")
# shown in the summary table when a stage has them; every scalar metric is in pipeline_summary.json
KEY_METRICS = ("loss", "eval/loss", "rewards/accuracies", "eval/rewards/accuracies", "mae", "eval/mae",
               "reward", "kl", "best_of_n/mean_best_score", "best_of_n/kept_rows")


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


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"pipeline file {str(path)!r} not found.")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
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
            raise ConfigError(f"--set {item!r}: {path} has no stage {parts[0]!r}{_suggest(parts[0], names)}; "
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
                              f"{unknown[0]!r}{_suggest(unknown[0], list(_PYTHON_KEYS))} in a Python stage; "
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
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, list(sections))}; a {method} "
                              f"stage has name, method and the sections {', '.join(sections)}.")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}.")
        body[key] = value
    body = _merge(defaults, body)
    training = body.get("training") or {}
    for key in _RUN_CONTROL:
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
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}{_suggest(unknown[0], list(_TOP_KEYS))}; the "
                          f"top level has {', '.join(_TOP_KEYS)}.")
    output_dir = Path(str(raw.get("output_dir") or Path("outputs") / path.stem))
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: defaults must be a mapping of {', '.join(_SHARED_SECTIONS)}.")
    for key, value in defaults.items():
        if key not in _SHARED_SECTIONS:
            raise ConfigError(f"{path}: defaults.{key}: defaults hold only the shared sections "
                              f"{', '.join(_SHARED_SECTIONS)}{_suggest(key, list(_SHARED_SECTIONS))}; put "
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


def _used_stages(p: Pipeline, stage: Stage) -> list[str]:
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
                          f"{_suggest(parts[0], p.names)}; stages: {', '.join(p.names)}.")
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
                          f"{parts[1]!r}{_suggest(parts[1], _fields(source))}; its fields: "
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


def _run_control(decision: Decision) -> dict[str, Any]:
    """The training keys the pipeline sets: resume an interrupted stage, otherwise start it over."""
    return {"resume": "latest"} if decision.action == "resume" else {"overwrite_output_dir": True}


def _training_config(p: Pipeline, stage: Stage, outputs: dict[str, dict], **run_control: Any) -> RunConfig:
    raw = _resolve(p, stage, stage.body, "", outputs)
    training = raw.setdefault("training", {})
    training.update(output_dir=str(stage.output_dir), **p.training_overrides, **run_control)
    try:
        return build_config(stage.method, raw)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name}: {e}") from None


_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".gz")


def _check_local_paths(p: Pipeline, stage: Stage, cfg: RunConfig) -> None:
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


def _step_function(stage: Stage) -> Callable:
    from alignkit.rewards.functions import load_function

    try:
        return load_function(stage.run)
    except ConfigError as e:  # its messages speak of reward functions
        reason = str(e).replace(f"reward function {stage.run!r}: ", "")
        raise ConfigError(f"stage {stage.name}: run: {reason}") from None


def _takes_output_dir(fn: Callable) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(q.name == "output_dir" or q.kind is q.VAR_KEYWORD for q in params)


def _check_step_args(stage: Stage, fn: Callable, args: dict[str, Any]) -> None:
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
                              f"{_suggest(key, names)}; its parameters: {', '.join(names)}.")
    missing = [n for n, q in params.items() if q.default is q.empty and n != "output_dir"
               and q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY) and n not in args]
    if missing:
        raise ConfigError(f"stage {stage.name}: {stage.run} needs args.{missing[0]}.")


def _jsonable(value: Any, where: str) -> Any:
    """A step's result as JSON data (paths become strings, tuples lists, 0-d tensors and NumPy scalars
    numbers)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    raise TrainingError(f"{where} is a {type(value).__name__}; a Python stage returns JSON data: numbers, "
                        "strings, paths, lists and dicts.")


def _python_config(p: Pipeline, stage: Stage, outputs: dict[str, dict]) -> dict[str, Any]:
    return {"run": stage.run, "args": _resolve(p, stage, stage.body["args"], "args", outputs),
            "outputs": stage.outputs}


# --------------------------------------------------------------------------------------------------
# State: what finished, with which config; what to do with each stage
# --------------------------------------------------------------------------------------------------


def read_state(output_dir: str | Path) -> dict[str, Any]:
    """``pipeline_state.json`` of a pipeline folder (``{"stages": {name: record}}``; empty when none)."""
    path = Path(output_dir) / STATE_FILE
    for _ in range(20):  # another process may be replacing it this instant
        try:
            return json.loads(path.read_text()) if path.is_file() else {"stages": {}}
        except ValueError:
            time.sleep(0.1)
    raise TrainingError(f"{path} is not valid JSON; delete it to start the pipeline over (finished stage "
                        "folders would then have to be removed too).")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes a stage's result: its resolved config without the keys the pipeline sets per run."""
    out = json.loads(json.dumps(config, default=str))
    for key in _RUN_CONTROL:
        (out.get("training") or {}).pop(key, None)
    return out


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    unset = "<unset>"
    return [f"{k}: {a.get(k, unset)!r} -> {b.get(k, unset)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, unset) != b.get(k, unset)]


@dataclass
class Decision:
    action: str  # run | resume | skip (finished, unchanged) | keep (finished, changed: kept) | not run
    note: str = ""
    remove: bool = False  # empty the stage's folder first (a rerun of what this pipeline wrote)


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _decide(stage: Stage, identity: dict[str, Any], inputs: dict[str, str], records: dict[str, dict],
            state_file: Path, forced: bool, why_forced: str) -> Decision:
    """What to do with ``stage``: skip it (finished, same config, same inputs), keep it (finished, changed:
    only --from reruns it), resume it (a complete checkpoint), or run it (emptying the folder of an earlier
    attempt first)."""
    from alignkit.training.checkpoint import list_checkpoints

    record = records.get(stage.name)
    folder = stage.output_dir
    if record and record.get("status") == "done" and not forced:
        if not folder.exists():
            return Decision("run", f"its folder {folder} is gone")
        changes = _changes(record.get("config") or {}, identity)
        reasons = [f"its config changed since it finished ({'; '.join(changes)})"] if changes else []
        reasons += [f"stage {name} ran again since it finished" for name, attempt in
                    (record.get("inputs") or {}).items() if inputs.get(name) != attempt]
        if reasons:
            return Decision("keep", f"{' and '.join(reasons)}; its output is kept: rerun it and the stages "
                                    f"after it with --from {stage.name}")
        return Decision("skip", "finished before")
    checkpoints = list_checkpoints(folder) if stage.method else []
    if checkpoints and not forced:
        return Decision("resume", f"from {checkpoints[-1]}")
    if _has_files(folder):
        if not record:
            raise ConfigError(f"stage {stage.name}: its folder {folder} holds files this pipeline did not "
                              f"write (no record of it in {state_file}); move them away or give the stage "
                              "another training.output_dir.")
        why = why_forced or "interrupted before its first checkpoint"
        return Decision("run", f"{why}: starting over, its previous output removed", remove=True)
    return Decision("run", why_forced)


def _selection(p: Pipeline, start_from: str | None, only: str | None) -> dict[str, str]:
    """stage -> why it is forced to start over ('' when not), or 'excluded' for the stages --from / --only
    leave out."""
    for flag, name in (("--from", start_from), ("--only", only)):
        if name is not None and p.stage(name) is None:
            raise ConfigError(f"{flag} {name}: no such stage{_suggest(name, p.names)}; stages: "
                              f"{', '.join(p.names)}.")
    if start_from and only:
        raise ConfigError("give --from or --only, not both.")
    out = {}
    for s in p.stages:
        if only:
            out[s.name] = f"--only {only}" if s.name == only else "excluded"
        elif start_from:
            first = p.stage(start_from).index
            out[s.name] = f"--from {start_from}" if s.index >= first else "excluded"
        else:
            out[s.name] = ""
    return out


# --------------------------------------------------------------------------------------------------
# The dry plan: every config built and checked before anything runs
# --------------------------------------------------------------------------------------------------


@dataclass
class PlannedStage:
    stage: Stage
    config: dict[str, Any]  # the resolved config (training: RunConfig.to_dict(); Python: run, args, outputs)
    decision: Decision


def plan(p: Pipeline, start_from: str | None = None, only: str | None = None) -> list[PlannedStage]:
    """Build and validate every stage's config and decide what each will do; raises before anything runs.

    A Python stage's outputs are known only once it has run: until then a reference to them stays as its
    ``${...}`` text (fine for paths and names, which are not opened while validating).
    """
    records = read_state(p.output_dir)["stages"]
    selection = _selection(p, start_from, only)
    outputs = {name: r.get("outputs") or {} for name, r in records.items()
               if r.get("status") == "done" and r.get("kind") == "python"}
    attempts = {name: r.get("attempt") for name, r in records.items() if r.get("status") == "done"}
    planned: list[PlannedStage] = []
    for stage in p.stages:
        if stage.method:
            cfg = _training_config(p, stage, outputs)
            _check_local_paths(p, stage, cfg)
            config = cfg.to_dict()
        else:
            config = _python_config(p, stage, outputs)
            fn = _step_function(stage)
            _check_step_args(stage, fn, config["args"])
        used = _used_stages(p, stage)
        if selection[stage.name] == "excluded":
            done = (records.get(stage.name) or {}).get("status") == "done"
            decision = Decision("skip", "finished before") if done else Decision("not run")
        else:
            why = selection[stage.name]
            decision = _decide(stage, _identity(config), {u: attempts.get(u) for u in used}, records,
                               p.state_file, forced=bool(why), why_forced=why)
            for name in used:
                before = next(x for x in planned if x.stage.name == name)
                if before.decision.action == "not run":
                    flag = f"--only {only}" if only else f"--from {start_from}"
                    raise ConfigError(f"{flag}: stage {stage.name} uses the output of stage {name}, which "
                                      f"has not finished; run the pipeline without {flag.split()[0]} first, "
                                      f"or --from {name}.")
        if stage.method and decision.action in ("run", "resume"):
            config = _training_config(p, stage, outputs, **_run_control(decision)).to_dict()
        planned.append(PlannedStage(stage, config, decision))
    trained = [x for x in planned if x.stage.method]
    for key in ("num_processes", "deepspeed"):
        first = trained[0].config["training"][key] if trained else None
        other = next((x for x in trained if x.config["training"][key] != first), None)
        if other is not None:
            raise ConfigError(f"stage {other.stage.name}: training.{key}={other.config['training'][key]!r} "
                              f"but stage {trained[0].stage.name} has {first!r}; every training stage of a "
                              "pipeline runs in the same processes: set it in defaults.training or with "
                              f"--{key.replace('_', '-')}.")
    return planned


def format_plan(p: Pipeline, planned: list[PlannedStage]) -> str:
    lines = [f"# pipeline {p.path}: {len(planned)} stages under {p.output_dir} (state: {p.state_file})"]
    for i, x in enumerate(planned, start=1):
        s, d = x.stage, x.decision
        what = f"method {s.method}" if s.method else f"python {s.run}"
        status = d.action + (f": {d.note}" if d.note else "")
        lines += ["", f"# --- stage {i}/{len(planned)}: {s.name} ({what}) -> {s.output_dir} [{status}]",
                  yaml.safe_dump(x.config, sort_keys=False, allow_unicode=True).rstrip()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Running: processes, stages, records
# --------------------------------------------------------------------------------------------------


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _start_processes() -> None:
    """Join the process group now (as training would), so the main process can share decisions."""
    if _world() > 1:
        import torch
        from accelerate import PartialState

        if torch.cuda.is_available():
            PartialState()
        else:
            PartialState(cpu=True, backend="gloo")


def _from_main(compute: Callable[[], Any]) -> Any:
    """``compute()`` on the main process; its value (or its failure) on every process."""
    if _world() == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    error = None
    if _is_main():
        try:
            box = [("ok", compute())]
        except Exception as e:
            error, box = e, [("error", str(e))]
    broadcast_object_list(box, from_process=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise TrainingError(f"the main process stopped the pipeline: {value}")
    return value


def _fresh_accelerator_state() -> None:
    """Each training stage sets up its own Accelerator (precision, DeepSpeed config, batch sizes); the
    process group (PartialState) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _training_metrics(result: dict[str, Any]) -> dict[str, float]:
    def numbers(d: dict, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in d.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    out = numbers(result.get("train") or {})
    out.update(numbers(result.get("eval") or {}))
    out.update(numbers(result.get("best_of_n") or {}, "best_of_n/"))
    out.update(numbers({k: v for k, v in result.items() if k != "step"}))
    return out


def _with_stage(e: AlignkitError, stage: Stage) -> AlignkitError:
    """The same error, saying which stage it comes from (and how to rerun it when it cannot resume)."""
    message = str(e)
    if not message.startswith(f"stage {stage.name}"):
        message = f"stage {stage.name} ({stage.kind}): {message}"
    if str(e).startswith("cannot resume"):
        message += f" In a pipeline: rerun the stage from its start with --from {stage.name}."
    try:
        return type(e)(message)
    except TypeError:
        return e


class _Runner:
    """Runs the stages of a plan on this process; the main process writes the state file."""

    def __init__(self, p: Pipeline, selection: dict[str, str]):
        self.p, self.selection = p, selection
        self.run_id, state = _from_main(lambda: (uuid.uuid4().hex[:12], read_state(p.output_dir)))
        self.records: dict[str, dict] = state["stages"]
        self.outputs = {name: r.get("outputs") or {} for name, r in self.records.items()
                        if r.get("status") == "done" and r.get("kind") == "python"}
        self.statuses: dict[str, str] = {}
        self.notes: dict[str, str] = {}  # why a stage was kept, resumed or started over

    def save(self, record: dict[str, Any]) -> None:
        self.records[record["stage"]] = record
        if _is_main():
            _write_json(self.p.state_file, {"pipeline": str(self.p.path), "stages": self.records})

    def run(self, stage: Stage) -> None:
        if self.selection[stage.name] == "excluded":
            done = (self.records.get(stage.name) or {}).get("status") == "done"
            self.statuses[stage.name] = "skipped" if done else "not run"
            return
        config = (_training_config(self.p, stage, self.outputs).to_dict() if stage.method
                  else _python_config(self.p, stage, self.outputs))
        used = _used_stages(self.p, stage)
        inputs = {u: (self.records.get(u) or {}).get("attempt") for u in used}
        identity = _identity(config)

        def decide() -> Decision:
            why = self.selection[stage.name]
            d = _decide(stage, identity, inputs, self.records, self.p.state_file, forced=bool(why),
                        why_forced=why)
            if d.remove:
                shutil.rmtree(stage.output_dir)
            return d

        decision = _from_main(decide)
        self.notes[stage.name] = decision.note
        verb = {"run": "running", "resume": "resuming", "skip": "skipped", "keep": "kept"}[decision.action]
        log = logger.warning if decision.action == "keep" else logger.info
        log(f"stage {stage.name} ({stage.kind}) -> {stage.output_dir}: {verb}"
            + (f" ({decision.note})" if decision.note else ""))
        if decision.action in ("skip", "keep"):
            self.statuses[stage.name] = "skipped" if decision.action == "skip" else "kept (changed)"
            return
        record = {"stage": stage.name, "kind": "training" if stage.method else "python", "method": stage.kind,
                  "status": "running", "output": str(stage.output_dir),
                  "attempt": f"{self.run_id}-{stage.name}",
                  "config_hash": _digest(identity), "config": identity, "inputs": inputs,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if stage.run:
            record["run"] = stage.run
        self.save(record)
        t0 = time.perf_counter()
        try:
            if stage.method:
                result = self.train(stage, _run_control(decision))
            else:
                result = self.step(stage, config["args"], record["attempt"])
        except BaseException as e:
            error = str(e) if isinstance(e, AlignkitError) else f"{type(e).__name__}: {e}".rstrip(": ")
            self.save({**record, "status": "failed", "error": " ".join(error.split()),
                       "seconds": round(time.perf_counter() - t0, 1)})
            if isinstance(e, AlignkitError):
                raise _with_stage(e, stage) from e
            raise
        self.save({**record, **result, "status": "done", "seconds": round(time.perf_counter() - t0, 1),
                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.statuses[stage.name] = "resumed" if decision.action == "resume" else "ran"

    def train(self, stage: Stage, control: dict[str, Any]) -> dict[str, Any]:
        cfg = _training_config(self.p, stage, self.outputs, **control)
        _fresh_accelerator_state()
        result = train(cfg)
        summary = {"steps": result.get("step"), "metrics": _training_metrics(result)}
        del result  # the trained models: free them before the next stage loads its own
        _free_memory()
        return summary

    def step(self, stage: Stage, args: dict[str, Any], attempt: str) -> dict[str, Any]:
        """The Python stage on the main process; the others wait for its record (no collective: a step may
        take longer than a process group's timeout)."""
        if _is_main():
            fn = _step_function(stage)  # its args were checked in the plan
            stage.output_dir.mkdir(parents=True, exist_ok=True)
            value = fn(**args, **({"output_dir": stage.output_dir} if _takes_output_dir(fn) else {}))
            if value is None:
                value = {}
            elif not isinstance(value, dict):
                value = {"result": value}
            value = _jsonable(value, f"the result of {stage.run}")
            missing = [k for k in stage.outputs if k not in value]
            if missing:
                raise TrainingError(f"{stage.run} returned no {missing[0]!r}, which the stage's outputs: "
                                    f"list declares (it returned: {', '.join(value) or 'nothing'}).")
        else:
            while True:
                record = read_state(self.p.output_dir)["stages"].get(stage.name) or {}
                if record.get("attempt") == attempt and record.get("status") in ("done", "failed"):
                    break
                time.sleep(0.5)
            if record["status"] == "failed":
                raise TrainingError(f"failed on the main process: {record.get('error')}")
            value = record["outputs"]
        self.outputs[stage.name] = value
        metrics = {k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {"outputs": value, "metrics": metrics}


def _summary(p: Pipeline, runner: _Runner, seconds: float) -> dict[str, Any]:
    stages = []
    for s in p.stages:
        r = runner.records.get(s.name) or {}
        stages.append({"stage": s.name, "method": s.kind, "status": runner.statuses.get(s.name, "not run"),
                       "note": runner.notes.get(s.name, ""),
                       "steps": r.get("steps"), "metrics": r.get("metrics") or {},
                       "outputs": r.get("outputs"),
                       "output_dir": str(s.output_dir), "seconds": r.get("seconds")})
    return {"pipeline": str(p.path), "output_dir": str(p.output_dir), "seconds": round(seconds, 1),
            "stages": stages}


def _key_metrics(entry: dict[str, Any]) -> str:
    metrics = entry["metrics"]
    keys = [k for k in KEY_METRICS if k in metrics] if entry["method"] != "python" else list(metrics)
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys[:4]) or "-"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table: stage, method, status, steps, key metrics, output folder, time."""
    header = ("stage", "method", "status", "steps", "key metrics", "output", "time")
    rows = [header]
    for e in summary["stages"]:
        time_taken = f"{e['seconds']:.0f} s" if e["seconds"] is not None else "-"
        rows.append((e["stage"], e["method"], e["status"], "-" if e["steps"] is None else str(e["steps"]),
                     _key_metrics(e), e["output_dir"], time_taken))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class ProcessesFailed(TrainingError):
    """The processes a pipeline relaunched itself in stopped; the launcher has printed why."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def run_pipeline(path: str | Path, *, overrides: list[str] | None = None, start_from: str | None = None,
                 only: str | None = None, dry_run: bool = False, num_processes: int | None = None,
                 deepspeed: str | None = None) -> dict[str, Any]:
    """Run (or with ``dry_run`` only plan and print) the pipeline file ``path``; returns the summary.

    ``overrides``: ``--set`` style items (``sft.training.max_steps=5``, ``defaults.model.dtype=bfloat16``,
    ``output_dir=...``); ``start_from`` / ``only``: start that stage (and, for ``start_from``, every later
    one) over; ``num_processes`` / ``deepspeed``: for every training stage (the pipeline relaunches itself in
    that many processes, unless it already runs under a launcher).
    """
    from alignkit.launch import inside_launcher, relaunch

    setup_logging()
    p = load_pipeline(path, overrides, num_processes=num_processes, deepspeed=deepspeed)
    planned = plan(p, start_from, only)
    if dry_run:
        if _is_main():
            print(format_plan(p, planned))
        return {"pipeline": str(p.path), "output_dir": str(p.output_dir),
                "stages": [{"stage": x.stage.name, "method": x.stage.kind, "status": x.decision.action,
                            "output_dir": str(x.stage.output_dir), "config": x.config} for x in planned]}
    trained = [x.config["training"] for x in planned if x.stage.method]
    processes = trained[0]["num_processes"] if trained else 1
    if processes > 1 and not inside_launcher():
        argv = ["pipeline", str(path), *[a for item in overrides or [] for a in ("--set", item)],
                *(["--from", start_from] if start_from else []), *(["--only", only] if only else []),
                "--num-processes", str(processes), *(["--deepspeed", trained[0]["deepspeed"]]
                                                     if trained[0]["deepspeed"] else [])]
        code = relaunch(processes, argv, deepspeed=bool(trained[0]["deepspeed"]))
        if code != 0:
            raise ProcessesFailed(f"the pipeline's {processes} processes stopped with exit code {code} (the "
                                  "error is printed above); rerun the same command to continue where it "
                                  "stopped.", code)
        return json.loads((p.output_dir / SUMMARY_FILE).read_text())

    t0 = time.perf_counter()
    _start_processes()
    runner = _Runner(p, _selection(p, start_from, only))
    for stage in p.stages:
        runner.run(stage)
    summary = _summary(p, runner, time.perf_counter() - t0)
    if _is_main():
        _write_json(p.output_dir / SUMMARY_FILE, summary)
        print(f"\npipeline {p.path} finished in {summary['seconds']:.0f} s:\n{format_summary(summary)}\n"
              f"(all metrics: {p.output_dir / SUMMARY_FILE})", flush=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a pipeline file: named stages in order, each an alignkit method (sft, rm, dpo, ppo, "
                    "...) or a Python step, that use earlier stages' outputs (${stage.output_dir}). Finished "
                    "stages are skipped on the next run; an interrupted stage resumes from its latest "
                    "checkpoint.",
        epilog="examples:\n  alignkit pipeline examples/sentiment/demo_pipeline.yaml --dry-run\n"
               "  alignkit pipeline my.yaml --from rm --set rm.training.learning_rate=1e-5\n"
               "  alignkit pipeline my.yaml --num-processes 2 --deepspeed zero2\n\nsee docs/pipeline.md")
    parser.add_argument("file", metavar="FILE.yaml", help="the pipeline file")
    parser.add_argument("--dry-run", action="store_true", help="print every stage's resolved config and what "
                                                               "it would do; train nothing")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--from", dest="start_from", metavar="STAGE", help="start STAGE and every later stage "
                                                                          "over")
    which.add_argument("--only", metavar="STAGE", help="start only STAGE over")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value: STAGE.section.key=value, defaults.section.key=value or "
                             "output_dir=PATH (repeatable)")
    parser.add_argument("--num-processes", type=int, help="processes for every training stage (free port "
                                                          "chosen)")
    parser.add_argument("--deepspeed", help="zero1, zero2, zero3 or a DeepSpeed JSON file, for every "
                                            "training stage")
    return parser


def pipeline_main(argv: list[str]) -> int:
    """``alignkit pipeline ...`` (argv: the words after ``pipeline``)."""
    args = build_parser().parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # module:function steps from the current folder, as `python -m` would
    try:
        run_pipeline(args.file, overrides=args.overrides, start_from=args.start_from, only=args.only,
                     dry_run=args.dry_run, num_processes=args.num_processes, deepspeed=args.deepspeed)
    except ProcessesFailed as e:
        return e.code  # the launcher printed the processes' error once already
    import torch.distributed

    if _world() > 1 and torch.distributed.is_initialized():
        from accelerate import PartialState

        state = PartialState()
        state.wait_for_everyone()
        state.destroy_process_group()  # a clean exit; an open group can abort a worker at shutdown
    return 0
