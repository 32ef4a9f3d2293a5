"""Pipelines (alignkit/pipeline/): SFT -> RM -> PPO and SFT -> DPO on the tiny models, with a Python step
that writes the data; a rerun skips finished stages; an interrupted stage resumes to the result of an
uninterrupted run; --only / --from; bad references and config typos are rejected before anything runs;
--dry-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import crash_after_checkpoint

from alignkit.config import ConfigError
from alignkit.pipeline import SUMMARY_FILE, pipeline_main, read_state, run_pipeline

# A Python step: writes the pipeline's data files and logs each call (a rerun must not call it again).
STEPS = '''
import json
import random
from pathlib import Path

GOOD = "happy good great wonderful love yes".split()
BAD = "sad bad awful boring hate no".split()
TOPICS = "cat dog bird tree film movie story music".split()


def write_data(output_dir, rows=16, seed=0):
    with open(Path(__file__).with_name("calls.log"), "a") as f:
        f.write("write_data\\n")
    rng = random.Random(seed)
    out = Path(output_dir)
    files = {
        "chat": [{"messages": [{"role": "user", "content": f"what is the {TOPICS[i % 8]} {i}"},
                               {"role": "assistant", "content": "the dog sat on the mat"}]}
                 for i in range(rows)],
        "prefs": [{"prompt": f"tell me about the {rng.choice(TOPICS)}",
                   "chosen": " ".join(rng.choice(GOOD) for _ in range(4)),
                   "rejected": " ".join(rng.choice(BAD) for _ in range(4))} for _ in range(rows)],
        "prompts": [{"prompt": f"tell me about the {rng.choice(TOPICS)}"} for _ in range(rows)],
    }
    paths = {}
    for name, records in files.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\\n" for r in records))
    return {**paths, "rows": rows}


def count_rows(path):
    return sum(1 for _ in open(path))
'''


@pytest.fixture
def steps(tmp_path) -> Path:
    path = tmp_path / "steps.py"
    path.write_text(STEPS)
    return path


def _defaults(model_dir: Path) -> dict:
    return {"model": {"name_or_path": str(model_dir), "dtype": "float32"},
            "data": {"max_length": 64},
            "training": {"max_steps": 3, "per_device_batch_size": 4, "learning_rate": 1e-2,
                         "lr_scheduler": "constant", "report_to": ["jsonl"], "mixed_precision": "no",
                         "seed": 0}}


def _sft_rm_ppo(tmp_path: Path, model_dir: Path, steps: Path) -> dict:
    return {"output_dir": str(tmp_path / "out"), "defaults": _defaults(model_dir), "stages": [
        {"name": "data", "run": f"{steps}:write_data", "args": {"rows": 16},
         "outputs": ["chat", "prefs", "prompts"]},
        {"name": "sft", "method": "sft", "data": {"train": ["${data.chat}"]}},
        {"name": "rm", "method": "rm", "data": {"train": ["${data.prefs}"], "eval_split": 4}},
        {"name": "ppo", "method": "ppo", "model": {"name_or_path": "${sft.output_dir}"},
         "data": {"train": ["${data.prompts}"]}, "training": {"max_steps": 2},
         "ppo": {"generation": {"max_new_tokens": 8}, "reward": {"model": "${rm.output_dir}"},
                 "rollout_batch_size": 4}},
        {"name": "check", "run": f"{steps}:count_rows", "args": {"path": "${data.prefs}"}},
    ]}


def _write(tmp_path: Path, spec: dict, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _mtimes(out: Path, stages: list[str]) -> dict[str, int]:
    files = {s: out / s / ("model.safetensors" if s != "data" else "chat.jsonl") for s in stages}
    return {s: f.stat().st_mtime_ns for s, f in files.items()}


def _statuses(summary: dict) -> dict[str, str]:
    return {e["stage"]: e["status"] for e in summary["stages"]}


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sft_rm_ppo_runs_and_a_rerun_skips_finished_stages(tmp_path, tiny_model_dir, steps):
    path = _write(tmp_path, _sft_rm_ppo(tmp_path, tiny_model_dir, steps))
    out = tmp_path / "out"
    summary = run_pipeline(path)
    assert _statuses(summary) == {"data": "ran", "sft": "ran", "rm": "ran", "ppo": "ran", "check": "ran"}

    # each stage used the outputs of the earlier ones
    def saved(stage: str) -> dict:
        return yaml.safe_load((out / stage / "alignkit_config.yaml").read_text())

    assert saved("sft")["data"]["train"][0]["path"] == str(out / "data" / "chat.jsonl")
    assert saved("rm")["data"]["train"][0]["path"] == str(out / "data" / "prefs.jsonl")
    assert saved("ppo")["model"]["name_or_path"] == str(out / "sft")
    assert saved("ppo")["ppo"]["reward"]["model"] == str(out / "rm")
    # ... and learned: the SFT loss fell, the RM ranks held-out pairs, PPO moved the policy away from SFT
    sft_loss = [r["loss"] for r in _metrics(out / "sft") if "loss" in r]
    assert sft_loss[-1] < sft_loss[0]
    rm_eval = [r for r in _metrics(out / "rm") if "eval/rewards/accuracies" in r]
    assert rm_eval[-1]["eval/rewards/accuracies"] >= 0.75
    ppo_rows = _metrics(out / "ppo")
    assert [r["step"] for r in ppo_rows] == [1, 2] and ppo_rows[-1]["kl"] > 0

    # the state and the summary record every stage
    state = read_state(out)["stages"]
    assert {s: (r["status"], r.get("steps")) for s, r in state.items()} == {
        "data": ("done", None), "sft": ("done", 3), "rm": ("done", 3), "ppo": ("done", 2),
        "check": ("done", None)}
    assert state["check"]["outputs"] == {"result": 16}  # a function without output_dir, returning a number
    assert state["data"]["outputs"]["rows"] == 16
    assert state["data"]["outputs"]["chat"] == str(out / "data/chat.jsonl")
    written = json.loads((out / SUMMARY_FILE).read_text())
    by_stage = {e["stage"]: e for e in written["stages"]}
    assert by_stage["rm"]["metrics"]["eval/rewards/accuracies"] >= 0.75 and by_stage["ppo"]["steps"] == 2
    assert by_stage["sft"]["output_dir"] == str(out / "sft") and by_stage["sft"]["seconds"] > 0

    # a rerun trains nothing and calls no step again
    before = _mtimes(out, ["data", "sft", "rm", "ppo"])
    summary = run_pipeline(path)
    assert set(_statuses(summary).values()) == {"skipped"}
    assert _mtimes(out, ["data", "sft", "rm", "ppo"]) == before
    assert (tmp_path / "calls.log").read_text().splitlines() == ["write_data"]
    assert read_state(out)["stages"] == state

    # a changed config is reported, and the finished stage is kept until --from asks for it
    summary = run_pipeline(path, overrides=["sft.training.learning_rate=0.02"])
    assert _statuses(summary)["sft"] == "kept (changed)" and _statuses(summary)["ppo"] == "skipped"
    note = summary["stages"][1]["note"]
    assert "training.learning_rate: 0.01 -> 0.02" in note
    assert "rerun it and the stages after it with --from sft" in note
    assert _mtimes(out, ["data", "sft", "rm", "ppo"]) == before


def test_only_and_from_start_stages_over(tmp_path, tiny_model_dir, steps):
    path = _write(tmp_path, _sft_rm_ppo(tmp_path, tiny_model_dir, steps))
    out = tmp_path / "out"
    run_pipeline(path)
    first = _mtimes(out, ["data", "sft", "rm", "ppo"])

    summary = run_pipeline(path, only="rm")
    assert _statuses(summary) == {"data": "skipped", "sft": "skipped", "rm": "ran", "ppo": "skipped",
                                  "check": "skipped"}
    after_only = _mtimes(out, ["data", "sft", "rm", "ppo"])
    assert [s for s in first if first[s] != after_only[s]] == ["rm"]
    assert [r["step"] for r in _metrics(out / "rm") if "loss" in r] == [1, 2, 3]  # started over, not appended

    # PPO was trained with the old reward model: said, not silently rerun
    summary = run_pipeline(path)
    assert _statuses(summary)["ppo"] == "kept (changed)"
    assert summary["stages"][3]["note"].startswith("stage rm ran again since it finished; its output is kept")

    summary = run_pipeline(path, start_from="rm")
    assert _statuses(summary) == {"data": "skipped", "sft": "skipped", "rm": "ran", "ppo": "ran",
                                  "check": "ran"}
    after_from = _mtimes(out, ["data", "sft", "rm", "ppo"])
    assert [s for s in first if after_only[s] != after_from[s]] == ["rm", "ppo"]
    assert set(_statuses(run_pipeline(path)).values()) == {"skipped"}  # consistent again
    assert (tmp_path / "calls.log").read_text().splitlines() == ["write_data"]


def _sft_dpo(tmp_path: Path, model_dir: Path, steps: Path, out: str) -> Path:
    spec = {"output_dir": str(tmp_path / out), "defaults": _defaults(model_dir), "stages": [
        {"name": "data", "run": f"{steps}:write_data", "outputs": ["chat", "prefs"]},
        {"name": "sft", "method": "sft", "data": {"train": ["${data.chat}"]}, "training": {"max_steps": 2}},
        {"name": "dpo", "method": "dpo", "model": {"name_or_path": "${sft.output_dir}"},
         "data": {"train": ["${data.prefs}"]},
         "training": {"max_steps": 4, "save_steps": 2, "learning_rate": 3e-3}},
    ]}
    return _write(tmp_path, spec, f"{out}.yaml")


def test_an_interrupted_stage_resumes_to_the_result_of_an_uninterrupted_run(tmp_path, tiny_model_dir, steps,
                                                                            monkeypatch):
    run_pipeline(_sft_dpo(tmp_path, tiny_model_dir, steps, "straight"))

    path = _sft_dpo(tmp_path, tiny_model_dir, steps, "resumed")
    with crash_after_checkpoint(monkeypatch, 2, method="dpo"):
        run_pipeline(path)
    records = read_state(tmp_path / "resumed")["stages"]
    assert (records["sft"]["status"], records["dpo"]["status"]) == ("done", "failed")
    sft_mtime = (tmp_path / "resumed/sft/model.safetensors").stat().st_mtime_ns

    torch.manual_seed(1234)  # another global RNG state: the resume must restore the saved one
    summary = run_pipeline(path)
    assert _statuses(summary) == {"data": "skipped", "sft": "skipped", "dpo": "resumed"}
    assert (tmp_path / "resumed/sft/model.safetensors").stat().st_mtime_ns == sft_mtime
    resumed_cfg = yaml.safe_load((tmp_path / "resumed/dpo/alignkit_config.yaml").read_text())
    assert resumed_cfg["training"]["resume"] == "latest"

    a, b = _metrics(tmp_path / "straight/dpo"), _metrics(tmp_path / "resumed/dpo")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "lr"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert a[-1]["rewards/margins"] > a[0]["rewards/margins"]  # DPO moved the margin
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "straight/dpo/model.safetensors")
    wb = load_file(tmp_path / "resumed/dpo/model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    summary_a = json.loads((tmp_path / "straight" / SUMMARY_FILE).read_text())["stages"][2]["metrics"]
    assert summary["stages"][2]["metrics"]["loss"] == pytest.approx(summary_a["loss"], rel=1e-5)


def _edit(spec: dict, stage: str, edit) -> dict:
    edit(next(s for s in spec["stages"] if s["name"] == stage))
    return spec


@pytest.mark.parametrize("stage, edit, message", [
    ("ppo", lambda s: s["ppo"]["reward"].update(model="${rmm.output_dir}"),
     r"stage ppo: ppo\.reward\.model: \$\{rmm\.output_dir\} refers to no stage 'rmm' "
     r"\(did you mean 'rm'\?\)"),
    ("sft", lambda s: s.update(model={"name_or_path": "${ppo.output_dir}"}),
     r"stage sft: model\.name_or_path: \$\{ppo\.output_dir\} refers to stage ppo, which runs after sft"),
    ("ppo", lambda s: s["model"].update(name_or_path="${sft.output}"),
     r"stage ppo: model\.name_or_path: \$\{sft\.output\}: stage sft has no field 'output' \(did you mean "
     r"'output_dir'\?\)"),
    ("rm", lambda s: s["data"].update(train=["${data.pref}"]),
     r"stage rm: data\.train\[0\]: \$\{data\.pref\}: stage data has no field 'pref' "
     r"\(did you mean 'prefs'\?\); "
     r"its fields: output_dir, chat, prefs, prompts"),
    ("ppo", lambda s: s["training"].update(learnig_rate=1e-3),
     r"stage ppo: unknown key training\.learnig_rate \(did you mean 'learning_rate'\?\)"),
    ("ppo", lambda s: s["ppo"].update(kl_coeff=0.1), r"stage ppo: unknown key ppo\.kl_coeff"),
    ("ppo", lambda s: s["ppo"].update(rollout_batch_size=0),
     r"stage ppo: ppo\.rollout_batch_size=0: must be"),
    ("rm", lambda s: s.update(method="rmm"), r"stage rm: unknown method 'rmm' \(did you mean 'rm'\?\)"),
    ("sft", lambda s: s.update(dpo={"beta": 0.1}), r"stage sft: unknown key 'dpo'"),
    ("rm", lambda s: s["data"].update(eval=["heldout/prefs.jsonl"]),
     r"stage rm: data\.eval\[0\]\.path=heldout/prefs\.jsonl: no such file or folder"),
    ("ppo", lambda s: s["ppo"]["reward"].update(model="./rm-final"),
     r"stage ppo: ppo\.reward\.model=\./rm-final: no such file or folder"),
    ("data", lambda s: s["args"].update(rowz=4), r"stage data: args\.rowz is not a parameter of .*steps\.py:"
                                                 r"write_data \(did you mean 'rows'\?\)"),
    ("data", lambda s: s.update(run="steps_nowhere:write_data"), r"stage data: run: cannot import module"),
    ("sft", lambda s: s.setdefault("training", {}).update(resume="latest"),
     r"stage sft: training\.resume is set by the pipeline"),
])
def test_bad_references_and_typos_are_rejected_before_anything_runs(tmp_path, tiny_model_dir, steps, stage,
                                                                      edit, message):
    spec = _edit(_sft_rm_ppo(tmp_path, tiny_model_dir, steps), stage, edit)
    with pytest.raises(ConfigError, match=message):
        run_pipeline(_write(tmp_path, spec))
    assert not (tmp_path / "out").exists() and not (tmp_path / "calls.log").exists()  # nothing ran


def test_selection_and_folder_errors(tmp_path, tiny_model_dir, steps):
    spec = _sft_rm_ppo(tmp_path, tiny_model_dir, steps)
    path = _write(tmp_path, spec)
    with pytest.raises(ConfigError, match=r"--only ppo: stage ppo uses the output of stage data, which has "
                                          r"not finished"):
        run_pipeline(path, only="ppo")
    with pytest.raises(ConfigError, match=r"--from rn: no such stage \(did you mean 'rm'\?\)"):
        run_pipeline(path, start_from="rn")
    with pytest.raises(ConfigError, match=r"--set 'sfft.training.max_steps=1': .* has no stage 'sfft' "
                                          r"\(did you mean 'sft'\?\)"):
        run_pipeline(path, overrides=["sfft.training.max_steps=1"])
    spec["stages"][3]["training"]["output_dir"] = str(tmp_path / "out" / "rm" / "ppo")
    with pytest.raises(ConfigError, match=r"stage ppo: its folder .* overlaps stage rm's"):
        run_pipeline(_write(tmp_path, spec))
    spec["stages"][3]["training"]["num_processes"] = 2
    spec["stages"][3]["training"].pop("output_dir")
    with pytest.raises(ConfigError, match=r"stage ppo: training\.num_processes=2 but stage sft has 1; every "
                                          r"training stage of a pipeline runs in the same processes"):
        run_pipeline(_write(tmp_path, spec))
    (tmp_path / "out" / "rm").mkdir(parents=True)
    (tmp_path / "out" / "rm" / "model.safetensors").write_text("someone else's")
    with pytest.raises(ConfigError, match=r"stage rm: its folder .*out/rm holds files this pipeline did not "
                                          r"write"):
        run_pipeline(path)
    assert not (tmp_path / "calls.log").exists()


def test_a_python_stage_that_raises_fails_in_one_line(tmp_path, monkeypatch, capsys):
    """User code that raises: one line naming the stage (the state file records it), the traceback only with
    --debug."""
    from alignkit.cli import main
    from alignkit.errors import TrainingError

    (tmp_path / "broken_steps.py").write_text("def explode(n):\n    raise ValueError(f'no rows in part {n}')\n")
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "prepare", "run": "broken_steps.py:explode", "args": {"n": 3}}]})
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("alignkit: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("alignkit: error: stage prepare failed: ValueError: no rows in part 3 (in "
                                "broken_steps.py:explode; --debug shows the traceback)")
    record = read_state(tmp_path / "out")["stages"]["prepare"]
    assert record["status"] == "failed" and record["error"] == "ValueError: no rows in part 3"
    with pytest.raises(TrainingError, match="stage prepare failed") as info:  # --debug: the traceback
        main(["--debug", "pipeline", str(path)])
    assert isinstance(info.value.__cause__, ValueError)
    assert "ALIGNKIT_DEBUG" not in os.environ  # --debug of one in-process call does not leak into the next


# block style needs no quotes; inside [...] or {...} a reference must be quoted
DRY_RUN = """\
output_dir: {out}
defaults:
  model:
    name_or_path: {model}
stages:
  - name: data
    run: {steps}:write_data
    outputs: [chat, prefs]
  - name: sft
    method: sft
    data:
      train:
        - ${{data.chat}}
  - name: dpo
    method: dpo
    model:
      name_or_path: ${{sft.output_dir}}
    data: {{train: ["${{data.prefs}}"]}}
    dpo: {{beta: 0.2}}
"""


def test_dry_run_prints_every_stage_config_and_runs_nothing(tmp_path, tiny_model_dir, steps, capsys):
    path = tmp_path / "p.yaml"
    out = tmp_path / "out"
    path.write_text(DRY_RUN.format(out=out, model=tiny_model_dir, steps=steps))
    assert pipeline_main([str(path), "--dry-run", "--set", "dpo.training.max_steps=7"]) == 0
    printed = capsys.readouterr().out
    blocks = printed.split("# --- stage ")[1:]
    assert [b.split(":")[0] for b in blocks] == ["1/3", "2/3", "3/3"]
    data, sft, dpo = (yaml.safe_load(b.split("\n", 1)[1]) for b in blocks)
    assert data == {"run": f"{steps}:write_data", "args": {}, "outputs": ["chat", "prefs"]}
    assert sft["data"]["train"][0]["path"] == "${data.chat}"  # known once the step has run
    assert sft["model"]["name_or_path"] == str(tiny_model_dir)
    assert sft["sft"]["packing"] is False  # the full config, defaults included
    assert dpo["model"]["name_or_path"] == str(out / "sft") and dpo["dpo"]["beta"] == 0.2
    assert dpo["training"]["max_steps"] == 7 and dpo["training"]["output_dir"] == str(out / "dpo")
    assert "sft (method sft) -> " + str(out / "sft") + " [run]" in blocks[1]
    assert not out.exists() and not (tmp_path / "calls.log").exists()

    path.write_text(DRY_RUN.format(out=out, model=tiny_model_dir, steps=steps).replace('["${data.prefs}"]',
                                                                                      "[${data.prefs}]"))
    with pytest.raises(ConfigError, match=r"not valid YAML.*must be quoted"):
        pipeline_main([str(path), "--dry-run"])


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_two_processes_run_steps_once_and_train_every_stage(tmp_path, tiny_model_dir, steps):
    """Under a launcher (torchrun here; --num-processes relaunches the same way): the step runs on the main
    process only while the other waits, and both train each stage."""
    from alignkit.launch import free_port

    path = _sft_dpo(tmp_path, tiny_model_dir, steps, "out")
    spec = yaml.safe_load(path.read_text())
    spec["stages"][2]["training"].update(max_steps=2, save_steps=0, per_device_batch_size=2)
    path.write_text(yaml.safe_dump(spec))
    driver = tmp_path / "driver.py"
    driver.write_text("import sys\nfrom alignkit.pipeline import "
                      "pipeline_main\nsys.exit(pipeline_main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(driver), str(path)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "calls.log").read_text().splitlines() == ["write_data"]
    records = read_state(tmp_path / "out")["stages"]
    assert {s: r["status"] for s, r in records.items()} == {"data": "done", "sft": "done", "dpo": "done"}
    rows = _metrics(tmp_path / "out" / "dpo")
    assert [r["step"] for r in rows] == [1, 2]
    assert records["dpo"]["metrics"]["loss"] == pytest.approx(rows[-1]["loss"])
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert {e["stage"]: e["status"] for e in summary["stages"]} == {"data": "ran", "sft": "ran", "dpo": "ran"}


@pytest.mark.parametrize("name", ["examples/sentiment/demo_pipeline.yaml",
                                  "examples/gpu/sft_rm_ppo_1p5b.yaml"])
def test_the_shipped_pipeline_files_pass_the_dry_run(tmp_path, name, capsys):
    """Every stage's config of the demo and of the GPU example builds and validates (no model is loaded)."""
    path = Path(__file__).resolve().parents[1] / name
    summary = run_pipeline(path, overrides=[f"output_dir={tmp_path / 'out'}"], dry_run=True)
    assert {e["status"] for e in summary["stages"]} == {"run"}
    assert capsys.readouterr().out.count("# --- stage ") == len(summary["stages"])
    assert not (tmp_path / "out").exists()


def test_a_key_given_twice_in_a_pipeline_file_is_refused(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("output_dir: out\noutput_dir: elsewhere\nstages: []\n")
    with pytest.raises(ConfigError, match=r"pipeline\.yaml line 2: the key 'output_dir' is given twice"):
        run_pipeline(path)
