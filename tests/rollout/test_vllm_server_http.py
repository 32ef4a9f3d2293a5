"""The vllm_server sampler against fake local endpoints (no vLLM): a dead, slow or mismatched server is a
one-line error naming it, never a hang; prompts spread over the servers; the weights go as files.

The fakes listen on 127.0.0.1 only and answer a few routes the way vLLM 0.32 does; the real server is
tested in tests/rollout/test_vllm_server.py (``make test-vllm``). Two training processes through the CLI
sample from two fakes in the last test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

from alignkit.config import ConfigError
from alignkit.launch import free_port
from alignkit.rollout import SamplingConfig, build_sampler
from alignkit.rollout.vllm_server import EXTENSION, ServerError, VLLMServerSampler
from alignkit.testing import tiny_llama


def vllm_info(**model_config) -> dict:
    return {"vllm_config": {"model_config": {"logprobs_mode": "processed_logprobs", "generation_config": "vllm",
                                             **model_config},
                            "parallel_config": {"worker_extension_cls": EXTENSION}, "lora_config": None}}


class FakeVLLM:
    """A loopback HTTP server answering like ``vllm serve`` (``routes``: path -> JSON or a callable)."""

    def __init__(self, routes: dict, delay: float = 0.0):
        self.routes, self.delay, self.requests = routes, delay, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: dict | None):
                fake.requests.append((self.path, body))
                time.sleep(fake.delay)
                route = fake.routes.get(self.path)
                if route is None:
                    self.send_response(404)
                    self.end_headers()
                    self.wfile.write(b'{"detail": "Not Found"}')
                    return
                out = route(body) if callable(route) else route
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client gave up waiting (the timeout tests)
                    pass

            def do_GET(self):  # noqa: N802
                self._answer(None)

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self._answer(json.loads(self.rfile.read(length) or b"{}"))

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from alignkit.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok():
    from alignkit.testing import tiny_tokenizer

    return tiny_tokenizer()


def healthy_routes(tiny_dir: Path, vocab: int = 512, hidden: int = 64, loaded: list | None = None, **info) -> dict:
    def rpc(body):
        if body["method"] == "alignkit_model_info":
            return {"results": [{"vocab_size": vocab, "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
                                 "dtype": "float32"}]}
        if body["method"] == "alignkit_reload_weights":  # what vLLM's reload would read from the folder
            from safetensors.torch import load_file

            files = sorted(Path(body["kwargs"]["path"]).glob("*.safetensors"))
            loaded.append({k: v for f in files for k, v in load_file(f).items()})
            return {"results": [{"tied_lm_head_refreshed": False}]}
        raise AssertionError(body)

    return {"/health": {}, "/v1/models": {"data": [{"id": str(tiny_dir), "max_model_len": 512}]},
            "/server_info?config_format=json": vllm_info(**info), "/collective_rpc": rpc, "/reset_prefix_cache": {}}


def sampler_for(tok, tiny_dir, *urls, **fields) -> VLLMServerSampler:
    config = SamplingConfig(sampler="vllm_server", vllm_server_urls=list(urls), vllm_server_weight_sync="files",
                            **fields)
    return build_sampler(config, tok, model_name_or_path=str(tiny_dir), dtype="float32")


def test_a_dead_server_is_one_line_naming_it(tok, tiny_dir):
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with pytest.raises(ServerError, match=rf"vLLM server {url} is not reachable for the health check .*check that "
                                          r"`alignkit serve` \(or vllm with the flags of docs/rollouts_and_rewards.md\) runs there and the host and port in generation.vllm_server_urls"):
        sampler_for(tok, tiny_dir, url)


def test_a_slow_server_times_out_instead_of_hanging(tok, tiny_dir):
    fake = FakeVLLM(healthy_routes(tiny_dir), delay=30.0)
    try:
        start = time.monotonic()
        with pytest.raises(ServerError, match=rf"vLLM server {fake.url} did not answer the health check within 1 s"):
            sampler_for(tok, tiny_dir, fake.url, vllm_server_timeout=1)
        assert time.monotonic() - start < 20  # bounded by the timeout, not by the server's 30 s
    finally:
        fake.close()
    # a rollout request that takes longer than generation.vllm_server_timeout
    routes = healthy_routes(tiny_dir, loaded=[])
    fake = FakeVLLM(routes)
    try:
        sampler = sampler_for(tok, tiny_dir, fake.url, vllm_server_timeout=0.5)

        def slow_completion(body):
            time.sleep(5)
            return {}

        routes["/v1/completions"] = slow_completion
        with pytest.raises(ServerError, match=rf"{fake.url} did not answer the rollout of prompt 0 within 0.5 s: .*"
                                              "raise generation.vllm_server_timeout"):
            sampler.generate(tiny_llama(), [[5, 6, 7]])
    finally:
        fake.close()


def test_a_mismatched_or_misconfigured_server_says_what_to_check(tok, tiny_dir):
    cases = [
        (healthy_routes(tiny_dir, vocab=999), r"serves .* vocabulary 999, .* but the policy is .*vocabulary 512.*: "
                                              r"start the server with `alignkit serve"),
        (healthy_routes(tiny_dir, logprobs_mode="raw_logprobs"), "restart it with --logprobs-mode processed_logprobs"),
        (healthy_routes(tiny_dir, generation_config="auto"), "restart it with --generation-config vllm"),
        ({**healthy_routes(tiny_dir), "/server_info?config_format=json": None},
         r"refused /server_info \(dev mode\) \(HTTP 404.*start it with VLLM_SERVER_DEV_MODE=1"),
    ]
    chunked = healthy_routes(tiny_dir)
    chunked["/server_info?config_format=json"]["vllm_config"].update(
        device_config={"device": "cpu"}, scheduler_config={"enable_chunked_prefill": True})
    cases.append((chunked, "runs on CPU with chunked prefill, .* restart it with --no-enable-chunked-prefill"))
    no_extension = healthy_routes(tiny_dir)
    no_extension["/server_info?config_format=json"]["vllm_config"]["parallel_config"] = {}
    cases.append((no_extension, rf"started without --worker-extension-cls {EXTENSION}"))
    for routes, message in cases:
        fake = FakeVLLM({k: v for k, v in routes.items() if v is not None})
        try:
            with pytest.raises(ServerError, match=message) as error:
                sampler_for(tok, tiny_dir, fake.url)
            assert "\n" not in str(error.value) and fake.url in str(error.value)
        finally:
            fake.close()
    with pytest.raises(ConfigError, match=r"generation.vllm_server_urls: 'localhost:8000' is not a URL"):
        SamplingConfig(sampler="vllm_server", vllm_server_urls=["localhost:8000"]).check()


def test_prompts_spread_over_the_servers_and_the_weights_reach_each(tok, tiny_dir):
    policy = tiny_llama()
    loaded = [[], []]

    def completion(body):  # one sample per prompt: the prompt's last token, then eos; log-probs -0.5
        tokens = [body["prompt"][-1], tok.eos_token_id]
        return {"choices": [{"index": j, "token_ids": tokens, "logprobs": {"token_logprobs": [-0.5, -0.5]}}
                            for j in range(body["n"])]}

    fakes = [FakeVLLM({**healthy_routes(tiny_dir, loaded=loaded[i]), "/v1/completions": completion}) for i in range(2)]
    try:
        sampler = sampler_for(tok, tiny_dir, *(f.url for f in fakes), num_samples=2)
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13]]
        rollout = sampler.generate(policy, prompts, seed=3, logps=True)
        sent = [[b["prompt"] for p, b in f.requests if p == "/v1/completions"] for f in fakes]
        assert [sorted(s) for s in sent] == [[[5, 6, 7], [10, 11, 12]], [[8, 9], [13]]]  # round-robin
        seeds = [b["seed"] for f in fakes for p, b in f.requests if p == "/v1/completions"]
        assert len(set(seeds)) == 4  # one seed per prompt
        assert rollout.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert rollout.response_ids[:, 0].tolist() == [7, 7, 9, 9, 12, 12, 13, 13]
        assert rollout.ended_with_eos.all() and float(rollout.sampler_logps.sum()) == -0.5 * 16
        for weights in loaded:  # each server got every weight of the policy, under its HF name
            assert len(weights) == 1
            assert set(weights[0]) == {n for n, _ in policy.named_parameters()}
            assert torch.equal(weights[0]["model.embed_tokens.weight"], policy.model.embed_tokens.weight)
        # a frozen policy is sent once
        for p in policy.parameters():
            p.requires_grad_(False)
        sampler.generate(policy, prompts)
        sampler.generate(policy, prompts)
        assert [len(w) for w in loaded] == [2, 2]
        sampler.close()
        with pytest.raises(Exception, match="closed"):
            sampler.generate(policy, prompts)
    finally:
        for f in fakes:
            f.close()


def test_a_server_that_dies_while_starting_is_one_line_with_its_root_cause(tmp_path):
    import sys

    from alignkit.rollout.vllm_server import Server, _start, _wait_healthy

    log = tmp_path / "server-0.log"
    script = ("import sys; print('WARNING ulimit: errors like `OSError: [Errno 24]`'); "
              "print('ERROR ValueError: Available memory on node 0 (0.89 GiB) is less than requested for kv'); "
              "print('RuntimeError: Engine core initialization failed. See root cause above.'); sys.exit(1)")
    process = _start([sys.executable, "-c", script], log)
    server = Server(f"http://127.0.0.1:{free_port()}", process, log)
    with pytest.raises(ServerError, match=r"\(started here; log .*server-0.log\) exited with code 1 while starting: "
                                          r"ValueError: Available memory on node 0 \(0.89 GiB\)"):
        _wait_healthy(server, timeout=60)
    assert process.poll() == 1


def test_a_lora_policy_sends_its_adapter_only_to_lora_servers_else_its_merged_weights(tok, tiny_dir, caplog):
    from peft import LoraConfig, get_peft_model

    def completion(body):
        return {"choices": [{"index": 0, "token_ids": [tok.eos_token_id], "logprobs": {"token_logprobs": [-1.0]}}]}

    policy = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = []

    def load_adapter(body):  # what vLLM reads from the folder, while the request is in flight
        folder = Path(body["lora_path"])
        adapters.append((body, json.loads((folder / "adapter_config.json").read_text())["r"],
                         sorted(p.name for p in folder.iterdir())))
        return {}

    for lora_config, expect_adapter in [({"max_lora_rank": 8}, True), (None, False), ({"max_lora_rank": 2}, False)]:
        loaded, adapters[:] = [], []
        routes = {**healthy_routes(tiny_dir, loaded=loaded), "/v1/completions": completion,
                  "/v1/load_lora_adapter": load_adapter}
        routes["/server_info?config_format=json"]["vllm_config"]["lora_config"] = lora_config
        fake = FakeVLLM(routes)
        try:
            sampler = sampler_for(tok, tiny_dir, fake.url)
            with caplog.at_level("WARNING", logger="alignkit"):
                caplog.clear()
                sampler.generate(policy, [[5, 6]])
            models = [b["model"] for p, b in fake.requests if p == "/v1/completions"]
            if expect_adapter:
                assert loaded == [] and len(adapters) == 1
                body, rank, files = adapters[0]
                assert body["lora_name"] == "alignkit-policy" and body["load_inplace"] and rank == 4
                assert files == ["adapter_config.json", "adapter_model.safetensors"]
                assert models == ["alignkit-policy"]
            else:  # the merged weights under the base names, and one warning saying why
                assert adapters == [] and len(loaded) == 1
                assert "model.layers.0.self_attn.q_proj.weight" in loaded[0]
                assert not any("lora" in k for k in loaded[0])
                assert models == [str(tiny_dir)]
                assert "merged weights go to the servers" in caplog.text
            sampler.close()
        finally:
            fake.close()


def test_a_server_that_cannot_read_the_sync_folder_says_to_share_it(tok, tiny_dir, tmp_path):
    from alignkit.rollout.vllm_worker import WeightSync

    # the worker extension answers for a folder it cannot see (the server on another machine) ...
    assert WeightSync.alignkit_reload_weights(object(), str(tmp_path / "elsewhere")) == {
        "missing": str(tmp_path / "elsewhere")}
    # ... and the trainer makes it one line
    routes = healthy_routes(tiny_dir)
    routes["/collective_rpc"] = lambda body: (
        {"results": [{"missing": body["kwargs"]["path"]}]} if body["method"] == "alignkit_reload_weights" else
        healthy_routes(tiny_dir)["/collective_rpc"](body))
    fake = FakeVLLM(routes)
    try:
        sampler = sampler_for(tok, tiny_dir, fake.url)
        with pytest.raises(ServerError, match=rf"{fake.url} cannot read the weights alignkit wrote to .*weights-1: on "
                                              "another machine, set generation.vllm_server_sync_dir"):
            sampler.generate(tiny_llama(), [[5, 6]])
        sampler.close()
    finally:
        fake.close()


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_two_training_processes_share_the_servers_and_process_0_alone_sends_the_weights(tmp_path, tiny_dir):
    """GRPO with --num-processes 2 against two fake servers: every step one weight reload per server (from
    process 0; the other waits at the barrier), and both processes' prompts, spread over both servers."""
    import os
    import random
    import subprocess
    import sys

    import yaml

    from alignkit.testing import _WORDS

    rng = random.Random(0)

    def completion(body):  # random words of the tiny vocabulary, then eos
        tokens = [rng.randrange(10, 500) for _ in range(rng.randrange(1, 6))] + [2]
        return {"choices": [{"index": j, "token_ids": tokens, "logprobs": {"token_logprobs": [-1.0] * len(tokens)}}
                            for j in range(body["n"])]}

    loaded = [[], []]
    fakes = [FakeVLLM({**healthy_routes(tiny_dir, loaded=loaded[i]), "/v1/completions": completion}) for i in range(2)]
    try:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(4))}) + "\n"
                                   for _ in range(32)))
        reward = tmp_path / "length.py"
        reward.write_text("def length(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n")
        cfg = {"model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
               "data": {"train": [str(prompts)], "max_length": 32},
               "training": {"output_dir": str(tmp_path / "grpo"), "max_steps": 3, "learning_rate": 1e-3,
                            "per_device_batch_size": 4, "report_to": ["jsonl"], "mixed_precision": "no"},
               "grpo": {"generation": {"num_samples": 2, "max_new_tokens": 6, "sampler": "vllm_server",
                                       "vllm_server_urls": [f.url for f in fakes], "vllm_server_weight_sync": "files"},
                        "reward": {"functions": [f"{reward}:length"]}, "rollout_batch_size": 2}}
        path = tmp_path / "grpo.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "train", "grpo", str(path), "--num-processes", "2"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
        assert [len(w) for w in loaded] == [3, 3]  # one reload per step and server: process 0 alone sends
        assert all(set(w) == set(loaded[0][0]) for ws in loaded for w in ws)
        per_server = [sum(p == "/v1/completions" for p, _ in f.requests) for f in fakes]
        assert per_server == [6, 6]  # 3 steps x 2 prompts x 2 processes, spread over both servers
    finally:
        for f in fakes:
            f.close()


def test_async_steps_send_the_next_rollout_before_the_update_and_never_reload_under_a_request(tmp_path, tiny_dir):
    """GRPO with async_steps 1 against a fake server: the first weights answer the rollouts of steps 1 and 2,
    each later weight sync the one of the step after next (sent before that step's update), the last syncs are
    skipped (nothing left to sample), and no reload ever starts while a rollout request is being answered."""
    import random

    import alignkit
    from alignkit.testing import _WORDS

    rng = random.Random(0)
    events, in_flight, lock = [], [0], threading.Lock()

    def completion(body):  # slow enough to still be in flight if a reload did not wait for it
        with lock:
            in_flight[0] += 1
        time.sleep(0.05)
        tokens = [rng.randrange(10, 500) for _ in range(3)] + [2]
        with lock:
            in_flight[0] -= 1
            events.append("rollout")
        return {"choices": [{"index": j, "token_ids": tokens, "logprobs": {"token_logprobs": [-1.0] * 4}}
                            for j in range(body["n"])]}

    loaded = []
    routes = healthy_routes(tiny_dir, loaded=loaded)
    rpc = routes["/collective_rpc"]

    def reload(body):
        if body["method"] == "alignkit_reload_weights":
            with lock:
                events.append("reload" if in_flight[0] == 0 else "reload under a request")
        return rpc(body)

    fake = FakeVLLM({**routes, "/collective_rpc": reload, "/v1/completions": completion})
    try:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(4))}) + "\n"
                                   for _ in range(16)))
        reward = tmp_path / "length.py"
        reward.write_text("def length(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n")
        alignkit.train("grpo", model={"name_or_path": str(tiny_dir), "dtype": "float32"},
                       data={"train": [str(prompts)], "max_length": 32},
                       training={"output_dir": str(tmp_path / "grpo"), "max_steps": 4, "learning_rate": 1e-3,
                                 "per_device_batch_size": 4, "report_to": ["jsonl"], "mixed_precision": "no"},
                       grpo={"generation": {"num_samples": 2, "max_new_tokens": 6, "sampler": "vllm_server",
                                            "vllm_server_urls": [fake.url], "vllm_server_weight_sync": "files"},
                             "reward": {"functions": [f"{reward}:length"]}, "rollout_batch_size": 2,
                             "async_steps": 1, "tis_cap": 2.0})
        rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
        assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
        # 2 prompts a step: steps 1-2 after the first sync, step 3 after step 1's update, step 4 after step 2's
        assert events == ["reload"] + ["rollout"] * 4 + ["reload"] + ["rollout"] * 2 + ["reload"] + ["rollout"] * 2
        assert len(loaded) == 3
    finally:
        fake.close()


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_async_steps_on_two_processes_under_fsdp2(tmp_path, tiny_dir):
    """GRPO async_steps 1 through a (fake) server on two FSDP2 processes: the weight push after each update
    gathers the shards on every process (a collective outside the sampling thread), so the run neither hangs
    nor sends shards, and both processes train one step ahead."""
    import random

    from alignkit.testing import _WORDS

    rng = random.Random(0)

    def completion(body):
        tokens = [rng.randrange(10, 500) for _ in range(3)] + [2]
        return {"choices": [{"index": j, "token_ids": tokens, "logprobs": {"token_logprobs": [-1.0] * 4}}
                            for j in range(body["n"])]}

    loaded = []
    fake = FakeVLLM({**healthy_routes(tiny_dir, loaded=loaded), "/v1/completions": completion})
    try:
        (tmp_path / "prompts.jsonl").write_text("".join(
            json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(4))}) + "\n" for _ in range(16)))
        (tmp_path / "length.py").write_text(
            "def length(prompts, completions, **_):\n    return [len(c) / 10 for c in completions]\n")
        config = {"model": {"name_or_path": str(tiny_dir), "dtype": "float32"},
                  "data": {"train": ["prompts.jsonl"], "max_length": 32},
                  "training": {"output_dir": "grpo", "max_steps": 3, "learning_rate": 1e-3, "per_device_batch_size": 4,
                               "report_to": ["jsonl"], "mixed_precision": "no", "fsdp": "full_shard"},
                  "grpo": {"generation": {"num_samples": 2, "max_new_tokens": 6, "sampler": "vllm_server",
                                          "vllm_server_urls": [fake.url], "vllm_server_weight_sync": "files"},
                           "reward": {"functions": ["length.py:length"]}, "rollout_batch_size": 2, "kl_coef": 0.0,
                           "async_steps": 1}}
        (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(config))
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "alignkit.cli", "train", "grpo", "grpo.yaml", "--num-processes",
                               "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
        assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0]
        assert rows[-1]["episodes"] == 3 * 2 * 2 * 2  # steps x prompts x samples x processes
        # the weights reached the server whole: every tensor of the model, at its full shape
        from safetensors.torch import load_file

        full = load_file(tmp_path / "grpo" / "model.safetensors")
        assert loaded and all(set(w) >= set(full) and all(w[k].shape == full[k].shape for k in full) for w in loaded)
    finally:
        fake.close()
