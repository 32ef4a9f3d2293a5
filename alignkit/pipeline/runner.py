"""Running a pipeline: the state file (what finished, with which config), what to do with each stage (skip,
keep, resume, run), the dry plan, the stages in one or several processes, the summary, the command line."""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignkit.api import setup_logging, train
from alignkit.config import ConfigError
from alignkit.errors import AlignkitError, TrainingError
from alignkit.pipeline.spec import (
    RUN_CONTROL,
    STATE_FILE,
    Pipeline,
    Stage,
    check_local_paths,
    check_step_args,
    did_you_mean,
    load_pipeline,
    python_config,
    step_function,
    training_config,
    used_stages,
)

logger = logging.getLogger("alignkit")

SUMMARY_FILE = "pipeline_summary.json"
# shown in the summary table when a stage has them; every scalar metric is in pipeline_summary.json
KEY_METRICS = ("loss", "eval/loss", "rewards/accuracies", "eval/rewards/accuracies", "mae", "eval/mae",
               "reward", "kl", "best_of_n/mean_best_score", "best_of_n/kept_rows")


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
    for key in RUN_CONTROL:
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


def _run_control(decision: Decision) -> dict[str, Any]:
    """The training keys the pipeline sets: resume an interrupted stage, otherwise start it over."""
    return {"resume": "latest"} if decision.action == "resume" else {"overwrite_output_dir": True}


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
            raise ConfigError(f"{flag} {name}: no such stage{did_you_mean(name, p.names)}; stages: "
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
            cfg = training_config(p, stage, outputs)
            check_local_paths(p, stage, cfg)
            config = cfg.to_dict()
        else:
            config = python_config(p, stage, outputs)
            fn = step_function(stage)
            check_step_args(stage, fn, config["args"])
        used = used_stages(p, stage)
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
            config = training_config(p, stage, outputs, **_run_control(decision)).to_dict()
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


def _takes_output_dir(fn: Callable) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(q.name == "output_dir" or q.kind is q.VAR_KEYWORD for q in params)


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
        config = (training_config(self.p, stage, self.outputs).to_dict() if stage.method
                  else python_config(self.p, stage, self.outputs))
        used = used_stages(self.p, stage)
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
            if stage.run and isinstance(e, Exception):  # the user's step raised: one line, its traceback with --debug
                raise TrainingError(f"stage {stage.name} failed: {' '.join(error.split())} (in {stage.run}; "
                                    "--debug shows the traceback).") from e
            raise
        self.save({**record, **result, "status": "done", "seconds": round(time.perf_counter() - t0, 1),
                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.statuses[stage.name] = "resumed" if decision.action == "resume" else "ran"

    def train(self, stage: Stage, control: dict[str, Any]) -> dict[str, Any]:
        cfg = training_config(self.p, stage, self.outputs, **control)
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
            fn = step_function(stage)  # its args were checked in the plan
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
