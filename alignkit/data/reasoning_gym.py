"""reasoning-gym's procedural tasks as a data source: ``path: reasoning_gym:TASK?size=N&seed=S&option=value``.

`reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ generates verifiable problems (arithmetic,
puzzles, logic, ...) from a task name, a size and a seed; each task scores an answer with its own verifier.
A source ``reasoning_gym:chain_sum?size=1000&seed=0&min_terms=2`` gives ``size`` prompt rows of the task
``chain_sum``; options other than ``size``, ``seed``, ``system`` and ``split`` go to the task's config (``min_terms``
here; ``split=test`` in the path does what ``split: test`` does, for commands that take only a path, such
as ``alignkit generate``). Each row holds:

- ``prompt``: chat messages, the task's question as the user turn, after a system message asking for the
  answer in ``<answer>...</answer>`` tags (reasoning-gym's own ``default`` prompt; ``system=none`` leaves it
  out, so ``data.system_prompt`` applies, and ``system=NAME`` picks another of ``reasoning_gym.utils.SYSTEM_PROMPTS``);
- ``answer``: the task's reference answer (for ``reward.answer: exact`` or ``math``);
- ``reasoning_gym``: ``{task, config, index}``, which regenerates the entry for the task's own verifier
  (``reward.answer: reasoning_gym``, :func:`score_answer`).

Held-out split by seed: a task's item ``i`` of seed ``s`` is drawn with ``Random(s + i)``, so seeds that differ
by less than ``size`` share items. ``split: test`` (or ``eval``/``validation``) of the same path therefore draws
from ``seed + HELD_OUT_SEED_OFFSET`` and drops every item whose question is also in the training split
(``train``, the default, with the path's ``seed``): ``data.eval: [{path: "reasoning_gym:chain_sum?size=1000",
split: test, limit: 200}]`` is disjoint from ``data.train: reasoning_gym:chain_sum?size=1000``.

The optional dependency is ``pip install 'alignkit[reasoning]'``.
"""

from __future__ import annotations

import difflib
import functools
import json
from typing import Any
from urllib.parse import parse_qsl

import yaml

from alignkit.config import DataSource
from alignkit.data.rows import DataError, Row

PREFIX = "reasoning_gym:"
INSTALL_HINT = "pip install 'alignkit[reasoning]'"
HELD_OUT_SEED_OFFSET = 1_000_000_000
TRAIN_SPLITS, HELD_OUT_SPLITS = ("train",), ("test", "eval", "validation")
DEFAULT_SIZE, DEFAULT_SEED = 1000, 0
FIELD = "reasoning_gym"  # the row column that names the task, its config and the item's index


def is_reasoning_gym_path(path: str) -> bool:
    return path.startswith(PREFIX)


def import_reasoning_gym():
    """The ``reasoning_gym`` module, or a one-line MissingPackageError naming the pip command."""
    try:
        import reasoning_gym
    except ImportError as e:
        from alignkit.models import MissingPackageError

        raise MissingPackageError(f"reasoning_gym: sources and rewards need the reasoning-gym package: "
                                  f"{INSTALL_HINT} ({e}).") from e
    return reasoning_gym


def parse_path(path: str) -> tuple[str, dict[str, Any]]:
    """(task, options) of ``reasoning_gym:TASK?key=value&...``; values are read as YAML scalars (``2`` is an
    int, ``[1, 3]`` a list, ``true`` a bool)."""
    spec = path[len(PREFIX):]
    task, _, query = spec.partition("?")
    if not task:
        raise DataError("no task named", source=path, fix="Write reasoning_gym:TASK, e.g. reasoning_gym:chain_sum?size=500.")
    options: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as e:
        raise DataError(f"cannot read the options {query!r} ({e})", source=path,
                        fix="Write them as ?key=value&key=value, e.g. ?size=500&seed=0.") from e
    for key, value in pairs:
        if key in options:
            raise DataError(f"option {key!r} given twice", source=path, fix="Give each option once.")
        try:
            options[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            options[key] = value
    return task.strip(), options


@functools.lru_cache(maxsize=64)
def _dataset(task: str, config_json: str):
    rg = import_reasoning_gym()
    return rg.create_dataset(task, **json.loads(config_json))


def dataset(task: str, config: dict[str, Any], where: str):
    """The reasoning-gym dataset of ``task`` built with ``config`` (which holds ``size`` and ``seed``); cached."""
    rg = import_reasoning_gym()
    names = sorted(rg.factory.DATASETS)
    if task not in names:
        close = difflib.get_close_matches(task, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise DataError(f"reasoning-gym has no task {task!r}", source=where,
                        fix=f"{hint}Its {len(names)} tasks: python -c \"import reasoning_gym; "
                            "print(sorted(reasoning_gym.factory.DATASETS))\".")
    try:
        return _dataset(task, json.dumps(config, sort_keys=True))
    except (TypeError, ValueError, AssertionError) as e:  # an unknown option or a bad value, from the task
        config_cls = rg.factory.DATASETS[task][1]
        raise DataError(f"reasoning-gym task {task!r} rejects the options {config} ({type(e).__name__}: {e})",
                        source=where, fix=f"Use the fields of {config_cls.__module__}.{config_cls.__name__}.") from e


def system_prompt(name: str, where: str) -> str | None:
    if str(name).lower() in ("none", "", "false"):
        return None
    prompts = import_reasoning_gym().utils.SYSTEM_PROMPTS
    if name not in prompts:
        raise DataError(f"system={name!r} is not one of reasoning-gym's system prompts", source=where,
                        fix=f"Use system=none or one of: {', '.join(prompts)}.")
    return prompts[name]


def read_reasoning_gym(src: DataSource) -> list[Row]:
    """The rows of a ``reasoning_gym:`` source (module docstring); ``src.split`` picks the training items or
    the held-out ones."""
    task, options = parse_path(src.path)
    size, seed = options.pop("size", DEFAULT_SIZE), options.pop("seed", DEFAULT_SEED)
    system = system_prompt(options.pop("system", "default"), src.path)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f"size={size!r} must be a positive integer", source=src.path, fix="e.g. size=1000.")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed={seed!r} must be an integer >= 0", source=src.path, fix="e.g. seed=0.")
    split = str(options.pop("split", src.split)).lower()  # in the path too, for commands that take only a path
    if split not in TRAIN_SPLITS + HELD_OUT_SPLITS:
        raise DataError(f"split={split!r} is not a reasoning-gym split", source=src.path,
                        fix="Use split: train (the path's seed) or split: test (held out: another seed, "
                            "training questions removed).")
    config = {**options, "size": size, "seed": seed}
    seen: set[str] = set()
    if split in HELD_OUT_SPLITS:
        seen = {item["question"] for item in dataset(task, config, src.path)}
        config["seed"] = seed + HELD_OUT_SEED_OFFSET
    data = dataset(task, config, src.path)
    name = f"{src.path} ({split})"
    rows = []
    for index in range(size):
        if src.limit is not None and len(rows) >= src.limit:
            break
        item = data[index]
        if item["question"] in seen:
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": item["question"]}]
        rows.append(Row({"prompt": messages, "answer": str(item["answer"]),
                         FIELD: {"task": task, "config": config, "index": index}}, name, index))
    return rows


@functools.lru_cache(maxsize=4096)
def _entry(task: str, config_json: str, index: int) -> dict[str, Any]:
    return _dataset(task, config_json)[index]


def score_answer(answer: str | None, spec: dict[str, Any]) -> float:
    """The task's own verifier on ``answer`` (the text extracted from a completion; None = no answer found)
    for the item that ``spec`` (a row's ``reasoning_gym`` field: task, config, index) names: a float in
    [0, 1], 1 for a correct answer. The item is regenerated from the task, config and index (deterministic)."""
    try:
        task, config, index = spec["task"], spec["config"], int(spec["index"])
    except (TypeError, KeyError, ValueError) as e:
        raise DataError(f"the {FIELD!r} field {spec!r} does not name a task, config and index",
                        fix="Score rows that come from a reasoning_gym: source.") from e
    config_json = json.dumps(config, sort_keys=True)
    dataset(task, config, f"{PREFIX}{task}")  # validates the task name and config with a readable error
    return float(_dataset(task, config_json).score_answer(answer, _entry(task, config_json, index)))
