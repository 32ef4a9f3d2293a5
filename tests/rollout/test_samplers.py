"""Samplers on the tiny Llama: padding, sample order, EOS, limits, seeds, wrappers, ZeRO-3 gathering, sampler
log-probs, the weights the vLLM sampler sends (vLLM itself: test_vllm.py)."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.rollout import HFSampler, Rollout, SamplingConfig, build_rollout, build_sampler


@pytest.fixture(scope="module")
def tok():
    from alignkit.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from alignkit.testing import tiny_llama

    return tiny_llama(tok).eval()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy(tok, max_new_tokens: int = 8, **kw) -> HFSampler:
    return HFSampler(tok, SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False, **kw))


def real_rows(rollout: Rollout) -> list[tuple[list[int], list[int]]]:
    """(prompt tokens, response tokens) of each row, padding removed."""
    return [(p[pm.bool()].tolist(), r[rm.bool()].tolist()) for p, pm, r, rm in
            zip(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)]


def test_left_padding_does_not_change_a_prompts_response(tok, model):
    short = ids(tok, "the cat sat")
    long = ids(tok, "please tell me a very long story about the big red dog under the tree")
    alone = greedy(tok).generate(model, [short])
    batch = greedy(tok).generate(model, [long, short])
    assert len(long) > len(short)
    assert batch.prompt_mask[1, 0] == 0 and batch.prompt_mask[1, -1] == 1  # left-padded
    assert real_rows(batch)[1] == real_rows(alone)[0]
    assert batch.response_texts[1] == alone.response_texts[0]


def test_layout_reproduces_generation_with_one_forward(tok, model):
    prompts = [ids(tok, "hello world"), ids(tok, "what is the capital of france please tell me")]
    rollout = greedy(tok, max_new_tokens=6).generate(model, prompts)
    input_ids, mask = rollout.sequences()
    P = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=rollout.position_ids()).logits
    predicted = logits[:, P - 1:-1].argmax(-1)
    m = rollout.response_mask.bool()
    assert torch.equal(predicted[m], rollout.response_ids[m])


def test_samples_of_a_prompt_are_consecutive(tok, model):
    prompts = [ids(tok, "the dog ran"), ids(tok, "a bird flew over the log")]
    cfg = SamplingConfig(max_new_tokens=5, num_samples=3, temperature=1.0)
    rollout = HFSampler(tok, cfg).generate(model, prompts, seed=0)
    assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert rollout.num_prompts == 2 and len(rollout) == 6
    rows = real_rows(rollout)
    assert [p for p, _ in rows] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert len({tuple(r) for _, r in rows[:3]}) > 1  # sampled, so the three answers differ


def test_stops_at_any_eos_id_and_masks_after(tok, model):
    prompts = [ids(tok, "the cat sat on the mat"), ids(tok, "one two three"), ids(tok, "hello")]
    free = greedy(tok, max_new_tokens=8).generate(model, prompts)
    row = int((~free.ended_with_eos).nonzero()[0])  # a response that did not end by itself
    stop = free.response_ids[row, 2].item()  # make its third token an extra eos id of the model
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    try:
        rollout = greedy(tok, max_new_tokens=8).generate(model, prompts)
    finally:
        model.generation_config.eos_token_id = original
    assert rollout.ended_with_eos[row]
    eos = {tok.eos_token_id, stop}
    for i, (response, mask, ended) in enumerate(zip(rollout.response_ids, rollout.response_mask,
                                                    rollout.ended_with_eos)):
        tokens = free.response_ids[i].tolist()
        first = next((j for j, t in enumerate(tokens) if t in eos), None)
        length = len(tokens) if first is None else first + 1
        assert bool(ended) == (first is not None)
        assert mask.tolist() == [1] * length + [0] * (len(mask) - length)
        assert response[:length].tolist() == tokens[:length]  # the eos token itself is part of the response
        assert (response[length:] == tok.pad_token_id).all()


def test_max_new_tokens_is_respected(tok, model):
    rollout = greedy(tok, max_new_tokens=3).generate(model, [ids(tok, "hello")])
    assert rollout.response_ids.shape == (1, 3)
    assert rollout.response_lengths.tolist() == [3] and not rollout.ended_with_eos[0]


def test_sampling_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone(tok, model):
    sampler = HFSampler(tok, SamplingConfig(max_new_tokens=6, temperature=0.9, top_p=0.95, top_k=50))
    prompts = [ids(tok, "the big red dog"), ids(tok, "tell me about paris")]
    state = torch.get_rng_state()
    a = sampler.generate(model, prompts, seed=123)
    b = sampler.generate(model, prompts, seed=123)
    c = sampler.generate(model, prompts, seed=124)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_micro_batches_give_the_same_responses(tok, model):
    prompts = [ids(tok, "a"), ids(tok, "the cat sat on the mat"), ids(tok, "one two")]
    whole = greedy(tok, max_new_tokens=5).generate(model, prompts)
    pieces = greedy(tok, max_new_tokens=5, batch_size=2).generate(model, prompts)
    assert real_rows(whole) == real_rows(pieces)


def test_train_mode_and_gradient_checkpointing_are_restored(tok):
    from alignkit.testing import tiny_llama

    m = tiny_llama(tok)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.config.use_cache = False
    m.train()
    prompts = [ids(tok, "the cat")]
    rollout = greedy(tok, max_new_tokens=4).generate(m, prompts)
    assert m.training and m.is_gradient_checkpointing
    m.eval()
    assert torch.equal(rollout.response_ids, greedy(tok, max_new_tokens=4).generate(m, prompts).response_ids)


def test_peft_model_generates_like_its_base_with_a_fresh_adapter(tok, model):
    from peft import LoraConfig, get_peft_model

    from alignkit.testing import tiny_llama

    peft_model = get_peft_model(tiny_llama(tok), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    prompts = [ids(tok, "hello world"), ids(tok, "one")]
    out = greedy(tok, max_new_tokens=5).generate(peft_model, prompts)
    assert peft_model.training
    assert real_rows(out) == real_rows(greedy(tok, max_new_tokens=5).generate(model, prompts))  # LoRA B starts at 0


def test_ddp_wrapped_model_is_unwrapped(tok, model):
    import torch.distributed as dist

    from alignkit.launch import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        prompts = [ids(tok, "the dog")]
        assert real_rows(greedy(tok).generate(wrapped, prompts)) == real_rows(greedy(tok).generate(model, prompts))
    finally:
        dist.destroy_process_group()


class _Recorder:
    """Stands in for deepspeed.zero.GatheredParameters and the ZeRO-3 hook owner."""

    def __init__(self):
        self.gathers: list[int] = []
        self.active = False
        self.removed = 0
        self.registered = 0
        self.forwards_inside: list[bool] = []


def _fake_zero3(monkeypatch, model, rec: _Recorder):
    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            self.params = list(params)

        def __enter__(self):
            rec.gathers.append(len(self.params))
            rec.active = True

        def __exit__(self, *exc):
            rec.active = False

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)

    class Hook:
        def remove(self):
            rec.removed += 1

    class Offload:
        def __init__(self):
            self.forward_hooks, self.backward_hooks, self.module = [Hook(), Hook()], [Hook()], model

        def _register_deepspeed_module(self, module):
            assert module is model
            rec.registered += 1

    class DeepSpeedEngine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = model
            self.optimizer = types.SimpleNamespace(parameter_offload=Offload())

    for i, p in enumerate(model.parameters()):
        p.ds_id = i
    model.register_forward_pre_hook(lambda *_: rec.forwards_inside.append(rec.active))
    return DeepSpeedEngine()


def test_zero3_parameters_are_gathered_once_per_rollout(tok, monkeypatch):
    from alignkit.testing import tiny_llama

    m = tiny_llama(tok).eval()
    rec = _Recorder()
    wrapped = _fake_zero3(monkeypatch, m, rec)
    prompts = [ids(tok, "a"), ids(tok, "the cat"), ids(tok, "one two three")]
    rollout = greedy(tok, max_new_tokens=4, batch_size=1).generate(wrapped, prompts)
    assert rec.gathers == [len(list(m.parameters()))]  # one gather for three micro-batches
    assert rec.forwards_inside and all(rec.forwards_inside)  # every forward ran on gathered weights
    assert rec.removed == 3 and rec.registered == 1  # ZeRO hooks off during generation, back after
    assert len(rollout) == 3


def test_ppo_engine_gathers_only_the_policy_to_generate(tok, monkeypatch):
    """PPO trains policy and critic as one ZeRO-3 engine; generating needs the policy's weights only."""
    from alignkit.critic import PolicyAndCritic
    from alignkit.testing import tiny_llama

    policy, critic = tiny_llama(tok).eval(), tiny_llama(tok).eval()
    both = PolicyAndCritic(policy, critic)
    rec = _Recorder()
    wrapped = _fake_zero3(monkeypatch, both, rec)
    rollout = greedy(tok, max_new_tokens=3).generate(wrapped, [ids(tok, "the cat")])
    assert rec.gathers == [len(list(policy.parameters()))] and len(rollout) == 1
    assert rec.removed == 3 and rec.registered == 1


def test_weights_for_vllm_are_gathered_one_layer_at_a_time_under_zero3(tok, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from alignkit.rollout.weights import policy_weights
    from alignkit.testing import tiny_llama

    m = tiny_llama(tok)
    rec = _Recorder()
    sent = list(policy_weights(_fake_zero3(monkeypatch, m, rec)))
    params = dict(m.named_parameters())
    assert rec.gathers == [1] * len(params) and [n for n, _ in sent] == list(params)
    for name, tensor in sent:  # copies: vLLM holds them after the gather is released
        assert torch.equal(tensor, params[name]) and tensor.data_ptr() != params[name].data_ptr()
    lora = get_peft_model(tiny_llama(tok), LoraConfig(r=4, target_modules=["q_proj"]))
    rec = _Recorder()
    sent = list(policy_weights(_fake_zero3(monkeypatch, lora, rec)))
    assert rec.gathers.count(3) == 2  # each LoRA layer whole (base weight, A, B), once per layer
    assert len(sent) == len(params) and rec.gathers.count(1) == len(params) - 2


def test_vllm_memory_share_must_leave_room_for_the_policy(monkeypatch):
    from alignkit.rollout.vllm import _check_gpu_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 * 2**30, 80 * 2**30))
    _check_gpu_memory(0.3, None)  # 24 of the 40 free GiB
    with pytest.raises(ConfigError, match=r"vllm_gpu_memory_utilization=0.6 asks vLLM for 48.0 GiB .* <= 0.45"):
        _check_gpu_memory(0.6, None)
    policy = torch.nn.Linear(2**15, 2**14, device="meta")  # 2 GiB of trainable fp32 weights: Adam needs ~6 more
    _check_gpu_memory(0.3, policy)
    with pytest.raises(ConfigError, match=r"about 6.0 GiB more: set generation.vllm_gpu_memory_utilization <= 0.38"):
        _check_gpu_memory(0.45, policy)
    with pytest.raises(ConfigError, match="use generation.sampler: hf, LoRA"):
        _check_gpu_memory(0.3, torch.nn.Linear(2**16, 2**16, device="meta"))  # 16 GiB: 48 more


def test_config_validation_names_the_key(tok):
    with pytest.raises(ConfigError, match=r"grpo\.generation\.sampler='vlm'"):
        SamplingConfig(sampler="vlm").check("grpo.generation")
    with pytest.raises(ConfigError, match=r"ppo\.generation\.top_p"):
        SamplingConfig(top_p=0).check("ppo.generation")
    with pytest.raises(ValueError, match="empty"):
        greedy(tok).generate(torch.nn.Linear(1, 1), [[1], []])


def test_vllm_missing_gives_the_install_hint_and_hf_still_works(tok, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError, match=r"pip install alignkit\[vllm\]"):
        build_sampler(SamplingConfig(sampler="vllm"), tok, model_name_or_path="unused")
    sampler = build_sampler(SamplingConfig(max_new_tokens=2, do_sample=False), tok)
    assert isinstance(sampler, HFSampler)
    assert len(sampler.generate(model, [ids(tok, "hi")])) == 1


def test_alignkit_imports_without_vllm():
    import subprocess

    code = ("import sys; sys.modules['vllm'] = None; import alignkit, alignkit.rollout, alignkit.rewards; "
            "assert sys.modules['vllm'] is None")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_build_rollout_cuts_after_the_first_eos(tok):
    eos = tok.eos_token_id
    r = build_rollout([[5, 6], [7]], [[10, eos, 11], [12, 13, 14]], torch.tensor([0, 1]), [eos], 0, tok)
    assert r.response_ids.tolist() == [[10, eos, 0], [12, 13, 14]]
    assert r.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert r.ended_with_eos.tolist() == [True, False]
    assert r.prompt_ids.tolist() == [[5, 6], [0, 7]] and r.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert r.position_ids().tolist() == [[0, 1, 2, 3, 0], [0, 0, 1, 2, 3]]


def test_lora_weights_for_vllm_are_the_merged_model_under_hf_names(tok):
    from peft import LoraConfig, get_peft_model

    from alignkit.rollout.weights import policy_weights
    from alignkit.testing import tiny_llama

    base = tiny_llama(tok)
    names = set(dict(base.named_parameters()))
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                 modules_to_save=["lm_head"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n or "lora_embedding_B" in n:
            torch.nn.init.normal_(p)  # a trained adapter: merging changes q_proj and the embeddings
        if "modules_to_save" in n:
            p.data.add_(1.0)  # the trained copy of lm_head, not the original, must be sent
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    sent = dict(policy_weights(peft_model))
    assert set(sent) == names  # every base weight, HF names, no LoRA tensors
    for n, p in peft_model.named_parameters():
        assert torch.equal(p, before[n])  # the training model is untouched
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    for name in names:
        assert torch.allclose(sent[name], expected[name], atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sent[q], before["base_model.model." + q.replace(".weight", ".base_layer.weight")])
    assert torch.equal(sent["lm_head.weight"], before["base_model.model.lm_head.modules_to_save.default.weight"])


def test_dora_and_other_adapters_are_refused_for_vllm(tok):
    from peft import IA3Config, LoraConfig, get_peft_model

    from alignkit.rollout.weights import policy_weights
    from alignkit.testing import tiny_llama

    dora = get_peft_model(tiny_llama(tok), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="DoRA.*generation.sampler: hf"):
        dict(policy_weights(dora))
    ia3 = get_peft_model(tiny_llama(tok), IA3Config(target_modules=["k_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"]))
    with pytest.raises(ConfigError, match="IA3.*only fold LoRA"):
        dict(policy_weights(ia3))


def test_sampler_logps_are_the_sampled_distributions(tok, model):
    """HF's processed scores: log_softmax of logits / T after top-k and top-p, 0 off the response mask."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    prompts = [ids(tok, "the big red dog"), ids(tok, "tell me about paris please")]
    cfg = SamplingConfig(max_new_tokens=10, num_samples=2, temperature=0.7, top_k=40, top_p=0.9)
    rollout = HFSampler(tok, cfg).generate(model, prompts, seed=1, logps=True)
    assert HFSampler(tok, cfg).generate(model, prompts, seed=1).sampler_logps is None  # only when asked
    input_ids, mask = rollout.sequences()
    P = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=rollout.position_ids()).logits
    warped = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(40)(None, logits[:, P - 1:-1].flatten(0, 1) / 0.7))
    expected = torch.log_softmax(warped, -1).gather(-1, rollout.response_ids.reshape(-1, 1))
    expected = expected.view_as(rollout.response_ids) * rollout.response_mask
    on = rollout.response_mask.bool()
    assert rollout.sampler_logps.dtype == torch.float32 and (rollout.sampler_logps[~on] == 0).all()
    assert torch.isfinite(rollout.sampler_logps).all() and (rollout.sampler_logps[on] < 0).all()
    assert torch.allclose(rollout.sampler_logps, expected, atol=1e-5)
    assert rollout.to("cpu").sampler_logps is not None


def test_checkpoint_generation_defaults_do_not_change_the_sampling(tok, model):
    from peft import LoraConfig, get_peft_model

    from alignkit.testing import tiny_llama

    prompts = [ids(tok, "the cat sat on the mat")]
    clean = greedy(tok, max_new_tokens=8).generate(model, prompts)
    for m in (tiny_llama(tok), get_peft_model(tiny_llama(tok), LoraConfig(r=4, target_modules=["q_proj"]))):
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        first = clean.response_ids[0, 0].item()
        base.generation_config.suppress_tokens = [first]  # a generation_config.json default
        out = greedy(tok, max_new_tokens=8).generate(m, prompts)
        assert real_rows(out) == real_rows(clean)
        assert base.generation_config.suppress_tokens == [first]  # restored
        assert m.generate(torch.tensor(prompts), max_new_tokens=1, do_sample=False)[0, -1] != first  # it matters


@pytest.mark.parametrize("batch_size, sampled", [(0, True), (6, True), (5, False)])
def test_shared_prefill_gives_the_responses_of_one_prefill_per_row(tok, model, batch_size, sampled):
    """Each prompt prefilled once and its cache copied to its samples: the same tokens and sampler log-probs
    (greedy; seeded sampling with the same micro-batches, since their shapes decide the random draws; a
    micro-batch of 5 is rounded down to whole prompts, 3 rows)."""
    prompts = [ids(tok, "the big red dog"), ids(tok, "tell me about paris please"), ids(tok, "one two three four")]
    for kw in [dict(do_sample=False)] + [dict(temperature=0.9, top_k=40)] * sampled:
        cfg = dict(max_new_tokens=7, num_samples=3, batch_size=batch_size, **kw)
        shared = HFSampler(tok, SamplingConfig(**cfg)).generate(model, prompts, seed=5, logps=True)
        apart = HFSampler(tok, SamplingConfig(share_prefill=False, **cfg)).generate(model, prompts, seed=5,
                                                                                    logps=True)
        assert real_rows(shared) == real_rows(apart)
        assert torch.allclose(shared.sampler_logps, apart.sampler_logps, atol=1e-5)


def test_shared_prefill_runs_one_prefill_per_prompt(tok, model, monkeypatch):
    """The model sees each prompt's prefix once (3 rows, not 3 x 4), then only new tokens per step."""
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        prompts = [ids(tok, "the big red dog"), ids(tok, "tell me about paris please"), ids(tok, "one two")]
        HFSampler(tok, SamplingConfig(max_new_tokens=4, num_samples=4)).generate(model, prompts, seed=0)
    finally:
        hook.remove()
    P = max(map(len, prompts))
    assert seen[0] == (3, P - 1)  # the shared prefix
    assert all(shape == (12, 1) for shape in seen[1:])  # the last prompt token, then one token per step
