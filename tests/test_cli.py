"""The command line: what it can do, and every expected error as one line (exit code 2), also under two
processes; the traceback only with --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.methods import METHODS


def _cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("alignkit: error:")]


def test_help_lists_every_method_with_a_line(tmp_path):
    for args in (["--help"], ["train", "--help"]):
        out = _cli(*args, cwd=tmp_path).stdout
        for name, spec in METHODS.items():
            assert f"  {name}" in out and spec.summary in out, (args, name)


@pytest.mark.parametrize("args, needle", [
    (["train", "dpoo"], "unknown method 'dpoo' (did you mean 'dpo'?)"),
    (["train", "sft", "--set", "training.learning_rate=-1"], "training.learning_rate=-1.0: must be > 0"),
    (["train", "sft", "--set", "training.save_steps=-1"], "training.save_steps=-1: must be >= 0"),
    (["train", "sft", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["config", "grpoo"], "did you mean 'grpo'?"),
    (["train", "sft", "--num-processes", "0"], "--num-processes 0: must be at least 1"),  # was ignored: 1 process
])
def test_expected_errors_are_one_line_with_exit_code_2(tmp_path, args, needle):
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert _errors(proc) == [line for line in _errors(proc) if needle in line] and len(_errors(proc)) == 1
    assert "Traceback" not in proc.stderr


def _bad_data_config(tmp_path: Path, tiny_model_dir: Path, **training) -> Path:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n"
                    + '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n')
    cfg = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
           "data": {"train": [str(data)], "max_length": 64},
           "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "report_to": ["jsonl"], **training}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_data_error_is_one_line_and_debug_shows_the_traceback(tmp_path, tiny_model_dir):
    path = _bad_data_config(tmp_path, tiny_model_dir)
    proc = _cli("train", "sft", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = _errors(proc)
    assert "bad.jsonl line 2" in line and "robot" in line
    debug = _cli("--debug", "train", "sft", str(path), cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_under_two_processes_the_error_is_printed_once(tmp_path, tiny_model_dir):
    path = _bad_data_config(tmp_path, tiny_model_dir)
    proc = _cli("train", "sft", str(path), "--num-processes", "2", cwd=tmp_path)
    assert proc.returncode == 2
    assert len(_errors(proc)) == 1 and "bad.jsonl line 2" in _errors(proc)[0]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_reward_functions_import_from_the_current_folder(tmp_path, tiny_model_dir):
    (tmp_path / "my_rewards.py").write_text("def length(prompts, completions, **_):\n"
                                            "    return [float(len(c)) for c in completions]\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(8)))
    proc = _cli("train", "rloo", "--set", f"model.name_or_path={tiny_model_dir}", "--set", "model.dtype=float32",
                "--set", "data.train=[p.jsonl]", "--set", "training.max_steps=1", "--set", "training.output_dir=o",
                "--set", "training.report_to=[jsonl]", "--set", "rloo.reward.functions=[my_rewards:length]",
                "--set", "rloo.rollout_batch_size=2", "--set", "rloo.generation.max_new_tokens=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reward/length" in (tmp_path / "o" / "metrics.jsonl").read_text()


def test_the_workflow_commands_are_wired(tmp_path):
    """pipeline and estimate run through `alignkit` itself (their own parsers take the rest)."""
    root = Path(__file__).resolve().parents[1]
    proc = _cli("pipeline", str(root / "examples/sentiment/demo_pipeline.yaml"), "--dry-run", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "stage 8/8: answers" in proc.stdout
    proc = _cli("estimate", "sft", "--set", "model.name_or_path=smollm2-135m-instruct", "--gpus", "1",
                "--gpu-memory", "40GB", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fits"] is True
    proc = _cli("pipeline", "missing.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and len(_errors(proc)) == 1, proc.stderr


def test_the_help_of_every_command_imports_no_heavy_library(tmp_path):
    """`alignkit COMMAND --help` answers at once: torch, transformers and matplotlib load only when a command
    runs (measured: chat 4.0 s, convert 4.0 s, plot 2.9 s, generate 2.4 s before; 0.3 s each after)."""
    from alignkit.cli import OWN_PARSERS

    probe = ("import sys, contextlib, io\nfrom alignkit.cli import main\n"
             "try:\n    with contextlib.redirect_stdout(io.StringIO()):\n        code = main([sys.argv[1], '--help'])\n"
             "except SystemExit as e:  # argparse's own --help\n    code = e.code\n"
             "heavy = ('torch', 'transformers', 'matplotlib', 'accelerate', 'peft', 'numpy')\n"
             "print(code, [m for m in heavy if m in sys.modules])")
    for command in [*OWN_PARSERS, "train", "config", "merge"]:
        proc = subprocess.run([sys.executable, "-c", probe, command], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert proc.stdout.split() == ["0", "[]"], (command, proc.stdout, proc.stderr[-2000:])


def test_log_lines_go_to_the_stderr_of_the_moment(capsys):
    """The handler made while stderr was a stream that is closed later (a test's capture, a progress bar's
    redirect) must not print '--- Logging error ---' tracebacks on the next log line."""
    import io
    import logging

    from alignkit.api import setup_logging

    log = logging.getLogger("alignkit")
    saved = log.handlers, log.level, log.propagate
    log.handlers, real_stderr, first = [], sys.stderr, io.StringIO()
    try:
        sys.stderr = first
        setup_logging()
        log.info("first line")
        sys.stderr = real_stderr
        first.close()
        log.info("second line")
    finally:
        sys.stderr = real_stderr
        log.handlers, log.level, log.propagate = saved
    err = capsys.readouterr().err
    assert "second line" in err and "Logging error" not in err
