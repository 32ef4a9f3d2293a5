"""alignkit estimate: hand-checkable counts on the tiny model, the phases of each method, suggestions that are
valid overrides and lower the peak, the JSON schema and one-line errors. No weights are loaded by the
estimate itself; a few tests load the real tiny model to compare counts with peft and autograd."""

from __future__ import annotations

import json

import pytest
import torch

import alignkit
from alignkit.estimate import (
    GIB,
    NF4_BYTES_PER_PARAM,
    EstimateError,
    arch_of,
    estimate,
    estimate_main,
    kv_cache_bytes,
    layer_activation_bytes,
    lora_parameters,
    parse_gib,
    setup_of,
)


def cfg_of(method: str, model_dir, *overrides: str, **sections):
    return alignkit.build_config(method, sections or None, [f"model.name_or_path={model_dir}", *overrides])


def json_file(folder, values: dict) -> str:
    path = folder / "config.json"
    path.write_text(json.dumps(values))
    return str(path)


def added(est, phase: str) -> dict[str, float]:
    """The parts of one phase that not every phase holds."""
    everywhere = set.intersection(*(set(parts) for parts in est.phases.values()))
    return {k: v for k, v in est.phases[phase].items() if k not in everywhere}


def part(est, phase: str, name: str) -> float:
    """Bytes of one part of one phase."""
    return est.phases[phase][name]


# --------------------------------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------------------------------


def test_arch_counts_match_the_real_tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    arch = arch_of(str(tiny_model_dir))
    assert arch.params == sum(p.numel() for p in model.parameters())
    assert arch.head_params == model.lm_head.weight.numel()  # not tied
    assert (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.head_dim) == (64, 2, 4, 2, 16)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert arch.quantizable == linear


def test_full_fine_tuning_bytes_are_exact(tiny_model_dir):
    """fp32 on CPU: weights 4P, AdamW m and v 8P, gradients 4P at the optimizer step."""
    P = arch_of(str(tiny_model_dir)).params
    est = estimate(cfg_of("sft", tiny_model_dir), 1, 80, device="cpu", suggest=False)
    step = est.phases["optimizer"]
    assert step["policy weights"] == 4 * P
    assert step["optimizer states (AdamW m, v)"] == 8 * P
    assert step["gradients"] == 4 * P
    # bf16 on a GPU (model.dtype auto): everything halves, AdamW's foreach copy of v is one more 2P
    gpu = estimate(cfg_of("sft", tiny_model_dir), 1, 80, suggest=False).phases["optimizer"]
    assert (gpu["policy weights"], gpu["optimizer states (AdamW m, v)"], gpu["gradients"]) == (2 * P, 4 * P, 2 * P)
    assert gpu["optimizer step temporaries"] == 2 * P


def test_lora_parameter_count_equals_peft(tiny_model_dir, tiny_tok):
    from alignkit.config import ModelConfig
    from alignkit.models import count_parameters, load_model

    for targets in (["all-linear"], ["q_proj", "v_proj"]):
        for task in ("causal_lm", "seq_cls"):
            cfg = ModelConfig(name_or_path=str(tiny_model_dir), finetune="lora", lora_r=8, lora_target_modules=targets)
            trainable, _ = count_parameters(load_model(cfg, tiny_tok, task=task))
            assert lora_parameters(arch_of(str(tiny_model_dir), task), targets, 8) == trainable, (targets, task)


def test_lora_run_keeps_fp32_adapters_and_frozen_base(tiny_model_dir):
    arch = arch_of(str(tiny_model_dir))
    n_lora = lora_parameters(arch, ["all-linear"], 16)
    est = estimate(cfg_of("sft", tiny_model_dir, "model.finetune=lora"), 1, 80, suggest=False)
    step = est.phases["optimizer"]
    assert step["policy weights"] == 2 * arch.params + 4 * n_lora  # bf16 base, fp32 adapters (peft's autocast)
    assert step["optimizer states (AdamW m, v)"] == 8 * n_lora
    assert step["gradients"] == 4 * n_lora


def test_qlora_weights_are_nf4_with_double_quantisation(tiny_model_dir):
    arch = arch_of(str(tiny_model_dir))
    n_lora = lora_parameters(arch, ["all-linear"], 16)
    est = estimate(cfg_of("sft", tiny_model_dir, "model.finetune=qlora"), 1, 80, suggest=False)
    # 4 bits + an 8-bit absmax per 64 weights + an fp32 absmax per 256 blocks; the rest upcast to fp32 by peft
    assert NF4_BYTES_PER_PARAM == pytest.approx(0.5 + 1 / 64 + 1 / 4096)
    expected = arch.quantizable * NF4_BYTES_PER_PARAM + (arch.params - arch.quantizable) * 4 + 4 * n_lora
    assert est.phases["optimizer"]["policy weights"] == pytest.approx(expected)


def test_zero3_divides_weights_and_optimizer_state_by_the_gpus(tiny_model_dir):
    arch = arch_of(str(tiny_model_dir))
    one = estimate(cfg_of("sft", tiny_model_dir, "training.deepspeed=zero3"), 1, 80, suggest=False)
    four = estimate(cfg_of("sft", tiny_model_dir, "training.deepspeed=zero3"), 4, 80, suggest=False)
    for name in ("policy weights", "optimizer states (AdamW m, v)", "fp32 master weights", "gradients"):
        assert part(four, "optimizer", name) == pytest.approx(part(one, "optimizer", name) / 4), name
    # DeepSpeed bf16: 2-byte weights, fp32 master + m + v = 12 bytes per parameter, partitioned
    assert part(four, "optimizer", "policy weights") == pytest.approx(2 * arch.params / 4)
    assert part(four, "optimizer", "fp32 master weights") + part(four, "optimizer", "optimizer states (AdamW m, v)") \
        == pytest.approx(12 * arch.params / 4)
    zero2 = estimate(cfg_of("sft", tiny_model_dir, "training.deepspeed=zero2"), 4, 80, suggest=False)
    assert part(zero2, "optimizer", "policy weights") == 2 * arch.params  # ZeRO-2 keeps the whole model
    offload = estimate(cfg_of("sft", tiny_model_dir, "training.deepspeed=zero3", "training.zero_offload=true"), 4, 80,
                       suggest=False)
    assert part(offload, "optimizer", "policy weights") == 0
    assert part(offload, "optimizer", "optimizer states (AdamW m, v)") == 0


def test_fsdp2_full_shard_shards_like_zero3_with_fp32_masters_as_the_parameters(tiny_model_dir):
    """FSDP2 full_shard divides weights, gradients and optimizer state by the processes like ZeRO-3; under bf16
    accelerate upcasts what trains to fp32 (no separate master copy), and a frozen reference is whole on each."""
    arch = arch_of(str(tiny_model_dir))
    one = estimate(cfg_of("sft", tiny_model_dir, "training.fsdp=full_shard"), 1, 80, suggest=False)
    four = estimate(cfg_of("sft", tiny_model_dir, "training.fsdp=full_shard"), 4, 80, suggest=False)
    zero3 = estimate(cfg_of("sft", tiny_model_dir, "training.deepspeed=zero3"), 4, 80, suggest=False)
    assert "FSDP2 full_shard" in four.setup and "fp32 master weights" not in four.phases["optimizer"]
    for name in ("policy weights", "optimizer states (AdamW m, v)", "gradients"):
        assert part(four, "optimizer", name) == pytest.approx(part(one, "optimizer", name) / 4), name
    assert part(four, "optimizer", "policy weights") == pytest.approx(4 * arch.params / 4)  # fp32, sharded
    # weights + m + v: 12 bytes per parameter over the processes, as ZeRO-3's bf16 weights + fp32 master + m + v
    # hold 14 (the fp32 weights are the masters)
    fsdp_state = sum(part(four, "optimizer", k) for k in ("policy weights", "optimizer states (AdamW m, v)"))
    zero3_state = sum(part(zero3, "optimizer", k) for k in ("policy weights", "optimizer states (AdamW m, v)",
                                                              "fp32 master weights"))
    assert fsdp_state == pytest.approx(12 * arch.params / 4) and zero3_state == pytest.approx(14 * arch.params / 4)
    assert part(four, "train", "FSDP2 gathered weights") > 0
    offload = estimate(cfg_of("sft", tiny_model_dir, "training.fsdp=full_shard", "training.fsdp_cpu_offload=true"), 4,
                       80, suggest=False)
    assert part(offload, "optimizer", "policy weights") == part(offload, "optimizer", "gradients") == 0
    dpo = estimate(cfg_of("dpo", tiny_model_dir, "training.fsdp=full_shard", "dpo.precompute_ref_logps=false"), 4, 80,
                   suggest=False)
    assert dpo.phases["train"]["reference model"] == 2 * arch.params  # replicated, not sharded


def test_fsdp2_suggestions_stay_with_fsdp(tiny_model_dir):
    from alignkit.estimate.command import candidate_changes

    sets = candidate_changes(cfg_of("sft", tiny_model_dir, "training.fsdp=shard_grad_op"), 2, "cuda")
    assert ["training.fsdp=full_shard"] in sets and ["training.fsdp_cpu_offload=true"] in sets
    assert not any(x.startswith("training.deepspeed") for s in sets for x in s)  # would be refused with fsdp
    # SmolLM2-135M's 30 layers (its preset when the asset is not cached): two gathered at a time with full_shard
    gathered = estimate(cfg_of("sft", "smollm2-135m-instruct", "training.fsdp=shard_grad_op"), 2, 80, suggest=False)
    sharded = estimate(cfg_of("sft", "smollm2-135m-instruct", "training.fsdp=full_shard"), 2, 80, suggest=False)
    assert part(gathered, "train", "FSDP2 gathered weights") > part(sharded, "train", "FSDP2 gathered weights")


def test_kv_cache_formula():
    arch = arch_of("Qwen/Qwen2-7B")  # a preset: no Hub needed
    assert (arch.layers, arch.kv_heads, arch.head_dim) == (28, 4, 128)
    assert kv_cache_bytes(arch, 8, 320, 2) == 8 * 320 * 28 * 2 * 4 * 128 * 2


def test_layer_activation_formula_matches_what_autograd_saves(tmp_path):
    """The per-layer formula counts exactly the bytes saved_tensors_hooks sees in a middle decoder layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)

    def saved_bytes(layers: int, padded: bool) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **values)).train()
        ids = torch.randint(0, 300, (2, 32))
        mask = torch.ones(2, 32, dtype=torch.long)
        if padded:
            mask[0, -4:] = 0
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
        return sum(seen.values())

    arch = arch_of("test-layer", config_override=json_file(tmp_path, {"model_type": "llama", "num_hidden_layers": 1,
                                                                     **values}))
    cfg = alignkit.build_config("sft", {}, ["model.dtype=float32", 'training.mixed_precision="no"'])
    s = setup_of(cfg, 1, "cpu")
    for padded in (False, True):
        measured = saved_bytes(3, padded) - saved_bytes(2, padded)
        assert layer_activation_bytes(arch, 2, 32, s, padded=padded) == measured


def test_gradient_checkpointing_keeps_one_input_per_layer(tiny_model_dir):
    """Checkpointing keeps each layer's input (b x s x h in the weight dtype) and recomputes one layer."""
    arch = arch_of(str(tiny_model_dir))
    plain = estimate(cfg_of("sft", tiny_model_dir), 1, 80, device="cpu", suggest=False)
    checkpointed = estimate(cfg_of("sft", tiny_model_dir, "model.gradient_checkpointing=true"), 1, 80, device="cpu",
                            suggest=False)
    layer = layer_activation_bytes(arch, 4, 1024, setup_of(plain_cfg := cfg_of("sft", tiny_model_dir), 1, "cpu"))
    assert plain_cfg.data.max_length == 1024 and plain_cfg.training.per_device_batch_size == 4
    saved = part(plain, "train", "activations") - part(checkpointed, "train", "activations")
    assert saved == (arch.layers - 1) * layer - arch.layers * 4 * 1024 * arch.hidden * 4


# --------------------------------------------------------------------------------------------------
# What each method holds
# --------------------------------------------------------------------------------------------------


def test_ppo_holds_critic_reference_and_reward_model(tiny_model_dir):
    est = estimate(cfg_of("ppo", tiny_model_dir, f"ppo.reward.model={tiny_model_dir}"), 1, 80, suggest=False)
    assert set(est.models) == {"policy", "critic", "reference", "reward model"}
    train = est.phases["train"]
    arch, critic = arch_of(str(tiny_model_dir)), arch_of(str(tiny_model_dir), "seq_cls")
    assert train["reference model"] == 2 * arch.params  # full fine-tuning: a frozen bf16 copy
    assert train["critic weights"] == 2 * critic.params
    assert train["reward model"] == 2 * critic.params
    assert train["optimizer states (AdamW m, v)"] == 4 * (arch.params + critic.params)  # one optimizer, both
    assert {"rollout", "scoring", "train", "optimizer"} == set(est.phases)
    assert est.phases["rollout"]["generation KV cache"] > 0
    assert "sampler scores (log-probs)" not in est.phases["rollout"]  # bf16: old log-probs are recomputed


def test_fp32_ppo_keeps_the_samplers_scores(tiny_model_dir):
    """fp32 without autocast: PPO takes its old log-probs from the HF sampler, whose generate keeps every
    step's float32 [sequences, vocab] scores."""
    cfg = cfg_of("ppo", tiny_model_dir, "ppo.reward.functions=[m:f]", "model.dtype=float32",
                 "ppo.generation.max_new_tokens=32", 'training.mixed_precision="no"')
    rollout = estimate(cfg, 1, 80, suggest=False).phases["rollout"]
    assert rollout["sampler scores (log-probs)"] == 4 * 8 * 32 * arch_of(str(tiny_model_dir)).vocab


def test_lora_reference_is_the_adapter_off_policy(tiny_model_dir):
    for method in ("dpo", "kto", "grpo"):
        est = estimate(cfg_of(method, tiny_model_dir, "model.finetune=lora",
                              *(["grpo.reward.functions=[m:f]"] if method == "grpo" else [])), 1, 80, suggest=False)
        assert "adapter off" in est.models["reference"]
        assert all("reference model" not in parts for parts in est.phases.values()), method
    live = estimate(cfg_of("dpo", tiny_model_dir, "dpo.precompute_ref_logps=false"), 1, 80, suggest=False)
    assert "reference model" in live.phases["train"]


def test_reference_free_methods_hold_no_reference(tiny_model_dir):
    for method in ("simpo", "cpo", "orpo", "sft", "rm"):
        est = estimate(cfg_of(method, tiny_model_dir), 1, 80, suggest=False)
        assert "reference" not in est.models
        assert all("reference model" not in parts for parts in est.phases.values())


def test_dpo_precompute_frees_the_reference_before_training(tiny_model_dir):
    # precompute_ref_logps auto: precomputed when the run visits every row (one epoch, no max_steps)
    for overrides in (["dpo.precompute_ref_logps=true", "training.max_steps=5"], []):
        est = estimate(cfg_of("dpo", tiny_model_dir, *overrides), 1, 80, suggest=False)
        assert "reference model" in est.phases["reference precompute"]
        assert "reference model" not in est.phases["train"]
        assert "optimizer states (AdamW m, v)" not in est.phases["reference precompute"]  # before training
    live = estimate(cfg_of("dpo", tiny_model_dir, "training.max_steps=5"), 1, 80, suggest=False)
    assert "reference model" in live.phases["train"]  # auto: the estimate cannot tell every row is visited


def test_vllm_share_and_sleep_mode(tiny_model_dir):
    base = ["grpo.reward.functions=[m:f]", "grpo.generation.sampler=vllm", "grpo.generation.vllm_gpu_memory_utilization=0.25"]
    awake = estimate(cfg_of("grpo", tiny_model_dir, *base, "grpo.generation.vllm_sleep_mode=false"), 1, 40,
                     suggest=False)
    for phase in awake.phases.values():  # held for the whole run
        assert phase["vLLM (weights + KV cache)"] == 0.25 * 40 * GIB
    assert "generation KV cache" not in awake.phases["rollout"]
    asleep = estimate(cfg_of("grpo", tiny_model_dir, *base), 1, 40, suggest=False)  # sleep mode: on with CUDA
    assert asleep.phases["rollout"]["vLLM (weights + KV cache)"] == 0.25 * 40 * GIB
    assert all("vLLM (weights + KV cache)" not in asleep.phases[p] for p in ("scoring", "train", "optimizer"))
    sized = estimate(cfg_of("grpo", tiny_model_dir, *base, "grpo.generation.vllm_kv_cache_gb=2"), 1, 40,
                     suggest=False)
    weights = 2 * arch_of(str(tiny_model_dir)).params
    assert sized.phases["rollout"]["vLLM (weights + KV cache)"] == weights + 2 * GIB


def test_vllm_server_rollouts_hold_no_generation_memory_on_the_trainer(tiny_model_dir):
    """generation.sampler: vllm_server generates in the servers, so the trainer holds no KV cache and no
    generation workspace (the estimate counted them as for the HF sampler). Servers at URLs run elsewhere;
    servers started here (no URLs) stay on this machine's first GPU for the whole run."""
    base = ["grpo.reward.functions=[m:f]", "grpo.rollout_batch_size=64", "grpo.generation.max_new_tokens=512"]
    remote = [*base, "grpo.generation.sampler=vllm_server", "grpo.generation.vllm_server_urls=[http://gpu1:8000]"]
    hf = estimate(cfg_of("grpo", tiny_model_dir, *base), 1, 40, suggest=False)
    served = estimate(cfg_of("grpo", tiny_model_dir, *remote), 1, 40, suggest=False)
    assert hf.phases["rollout"]["generation KV cache"] > 0
    assert added(served, "rollout") == {}  # full fine-tuning, no sharding: each tensor goes as it is
    assert served.per_gpu_peak_gb <= hf.per_gpu_peak_gb
    assert any("run elsewhere" in a for a in served.assumptions)
    # ZeRO-3 gathers (and copies) one parameter at a time; a LoRA policy sent merged, one matrix at a time
    zero3 = estimate(cfg_of("grpo", tiny_model_dir, *remote, "training.deepspeed=zero3"), 2, 40, suggest=False)
    arch = arch_of(str(tiny_model_dir))
    assert added(zero3, "rollout") == {"ZeRO-3 gathered policy": 2 * arch.largest * 2}
    merged = estimate(cfg_of("grpo", tiny_model_dir, *remote, "model.finetune=lora", "grpo.generation.vllm_server_lora=false"),
                      1, 40, suggest=False)
    assert 0 < added(merged, "rollout")["vLLM weight sync (one merged LoRA matrix)"] <= arch.largest * 2
    adapter = estimate(cfg_of("grpo", tiny_model_dir, *remote, "model.finetune=lora"), 1, 40, suggest=False)
    assert added(adapter, "rollout") == {}  # only the adapter goes
    # no URLs: the run starts vllm_server_count servers here, which never sleep
    here = estimate(cfg_of("grpo", tiny_model_dir, *base, "grpo.generation.sampler=vllm_server",
                           "grpo.generation.vllm_server_count=2", "grpo.generation.vllm_gpu_memory_utilization=0.25"),
                    1, 40, suggest=False)
    for phase in here.phases.values():
        assert phase["vLLM servers started here (weights + KV cache)"] == 2 * 0.25 * 40 * GIB
    # rejection sampling: the model stays loaded (its weights go to the servers), nothing generates here
    rs = estimate(cfg_of("rejection_sampling", tiny_model_dir, "rejection_sampling.reward.functions=[m:f]",
                         "rejection_sampling.generation.sampler=vllm_server",
                         "rejection_sampling.generation.vllm_server_urls=[http://gpu1:8000]"), 1, 40, suggest=False)
    assert set(rs.phases["sampling"]) == {"sampling model"}


def test_distillation_and_sampling_methods_have_their_models(tiny_model_dir):
    kd = estimate(cfg_of("kd", tiny_model_dir, f"kd.teacher={tiny_model_dir}"), 1, 80, suggest=False)
    assert "teacher" in kd.models and "teacher" in kd.phases["train"]
    rs = estimate(cfg_of("rejection_sampling", tiny_model_dir, f"rejection_sampling.reward.model={tiny_model_dir}",
                         "rejection_sampling.train_sft=true"), 1, 80, suggest=False)
    assert {"sampling", "train", "optimizer"} == set(rs.phases)
    assert "reward model" in rs.phases["sampling"] and "reward model" not in rs.phases["train"]


# --------------------------------------------------------------------------------------------------
# Suggestions, verdict, JSON, CLI
# --------------------------------------------------------------------------------------------------


def test_suggestions_are_valid_overrides_that_lower_the_estimate(tiny_model_dir):
    # SmolLM2-135M's architecture (the asset's config, or its preset when it is not cached): no weights read
    cfg = alignkit.build_config("ppo", {}, ["model.name_or_path=smollm2-135m-instruct", "training.per_device_batch_size=4",
                                            f"ppo.reward.model={tiny_model_dir}", "ppo.rollout_batch_size=8",
                                            "data.max_length=256"])
    base = estimate(cfg, 2, 0.01)
    assert not base.fits and base.suggestions
    assert [s["saves_gb"] for s in base.suggestions] == sorted((s["saves_gb"] for s in base.suggestions), reverse=True)
    kinds = {s["set"][0].split("=")[0] for s in base.suggestions}
    assert {"model.gradient_checkpointing", "model.finetune", "training.per_device_batch_size"} <= kinds
    raw = cfg.to_dict()
    raw.pop("method")
    for s in base.suggestions:
        changed = alignkit.build_config("ppo", json.loads(json.dumps(raw)), s["set"])  # a valid --set
        again = estimate(changed, 2, 0.01, suggest=False)
        assert again.per_gpu_peak_gb == pytest.approx(s["peak_gb"], abs=1e-3)
        assert again.per_gpu_peak_gb < base.per_gpu_peak_gb
        assert s["saves_gb"] == pytest.approx(base.per_gpu_peak_gb - again.per_gpu_peak_gb, abs=1e-3)


def test_verdict_and_allowance(tiny_model_dir):
    cfg = cfg_of("sft", tiny_model_dir)
    roomy = estimate(cfg, 1, 80, suggest=False)
    assert roomy.fits and roomy.verdict().startswith("fits:")
    assert roomy.per_gpu_peak_gb == pytest.approx(roomy.tensor_peak_gb * 1.05 + 0.75)
    assert estimate(cfg, 1, 80, device="cpu", suggest=False).allowance_gb == 0
    tight = estimate(cfg, 1, 0.5)
    assert not tight.fits and tight.verdict().startswith("does not fit:")


def test_json_schema(tiny_model_dir, capsys):
    assert estimate_main(["ppo", "--set", f"model.name_or_path={tiny_model_dir}", "--set",
                          f"ppo.reward.model={tiny_model_dir}", "--gpus", "2", "--gpu-memory", "1GB",
                          "--deepspeed", "zero2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["per_gpu_peak_gb"], float) and isinstance(out["fits"], bool)
    assert out["gpus"] == 2 and out["gpu_memory_gb"] == 1.0
    assert set(out["phases"]) == {"rollout", "scoring", "train", "optimizer"}
    assert all(isinstance(v, float) for v in out["phases"].values())
    assert max(out["phases"].values()) == pytest.approx(out["tensor_peak_gb"], abs=1e-3)
    for s in out["suggestions"]:
        assert isinstance(s["set"], list) and all("=" in x for x in s["set"])
        assert isinstance(s["saves_gb"], float) and s["saves_gb"] > 0
    assert "ZeRO-2" in out["setup"]


def test_table_names_phases_models_and_verdict(tiny_model_dir, capsys):
    assert estimate_main(["dpo", "--set", f"model.name_or_path={tiny_model_dir}", "--gpu-memory", "24GB"]) == 0
    text = capsys.readouterr().out
    for word in ("train", "optimizer", "policy weights", "reference model", "activations", "fits:"):
        assert word in text


def test_parse_gpu_memory():
    assert parse_gib("40GB") == 40 and parse_gib("80") == 80 and parse_gib("24576MiB") == 24
    for bad in ("lots", "-4GB", "40PB"):
        with pytest.raises(EstimateError, match="--gpu-memory"):
            parse_gib(bad)


@pytest.mark.parametrize("argv, match", [
    (["sft", "--gpu-memory", "forty"], "--gpu-memory 'forty'"),
    (["sft", "--set", "model.name_or_path=./no/such/model", "--gpu-memory", "40GB"], "not a model folder"),
    (["sft", "--set", "model.name_or_path=someone/unknown-model", "--gpu-memory", "40GB"], "--model-config"),
    (["sft", "--model-config", "/no/config.json", "--gpu-memory", "40GB"], "no such config file"),
    (["sft", "--set", "training.learnig_rate=1", "--gpu-memory", "40GB"], "did you mean"),
    (["sft", "--gpus", "0", "--gpu-memory", "40GB"], "--gpus 0"),
    (["sft", "--gpu-memory", "-5GB"], "--gpu-memory '-5GB'"),  # as --gpu-memory=-5GB, not argparse's usage
    (["sft", "--gpu-memory=-5GB"], "--gpu-memory '-5GB'"),
])
def test_cli_errors_are_one_line(argv, match, capsys):
    from alignkit.cli import report_error

    with pytest.raises(alignkit.AlignkitError, match=match) as info:
        estimate_main(argv)
    assert "\n" not in str(info.value)
    assert report_error(str(info.value)) == 2
    err = capsys.readouterr().err
    assert err.startswith("alignkit: error: ") and err.count("\n") == 1


def test_model_config_file_folder_and_preset(tmp_path, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    by_file = arch_of("anything", config_override=json_file(tmp_path, config))
    assert by_file.params == arch_of(str(tiny_model_dir)).params
    qwen = arch_of("Qwen/Qwen2-7B")
    assert round(qwen.params / 1e9, 2) == 7.62
    est = estimate(alignkit.build_config("sft", {}, []), 1, 80, model_config="Qwen/Qwen2-7B", suggest=False)
    assert "Qwen/Qwen2-7B (7.62B" in est.models["policy"]


# --------------------------------------------------------------------------------------------------
# When nothing fits: suggestions combined; LoRA reward models; CPU runs
# --------------------------------------------------------------------------------------------------


def _rloo_7b(*overrides: str):
    return alignkit.build_config("rloo", {}, ["model.name_or_path=Qwen/Qwen2-7B", "rloo.reward.model=Qwen/Qwen2-7B",
                                              "training.num_processes=2", *overrides])


def test_plan_combines_suggestions_until_the_run_fits():
    """7B RLOO on 2 x 40 GB at defaults: no single suggestion fits; the plan is a combination that does, each
    of its changes needed, and rebuilding the config with its --sets gives the peak it reports."""
    cfg = _rloo_7b()
    est = estimate(cfg, 2, 40)
    assert not est.fits and est.suggestions and not any(s["fits"] for s in est.suggestions)
    plan = est.plan
    assert plan["fits"] and len(plan["set"]) >= 2 and plan["peak_gb"] <= 40
    raw = cfg.to_dict()
    raw.pop("method")

    def peak(sets):
        return estimate(alignkit.build_config("rloo", json.loads(json.dumps(raw)), sets), 2, 40,
                        suggest=False).per_gpu_peak_gb

    assert peak(plan["set"]) == pytest.approx(plan["peak_gb"], abs=1e-3)
    for item in plan["set"]:  # minimal: without any one of its changes it does not fit
        assert peak([x for x in plan["set"] if x != item]) > 40
    assert f"It fits with --set {' --set '.join(plan['set'])}" in est.verdict()
    assert "the cheapest way to fit" in est.table()


def test_plan_says_when_nothing_fits_and_what_comes_closest():
    cfg = _rloo_7b()
    est = estimate(cfg, 2, 8)
    plan = est.plan
    assert not plan["fits"] and plan["set"]
    assert plan["peak_gb"] < min(s["peak_gb"] for s in est.suggestions)  # closer than any single change
    assert plan["peak_gb"] > 8
    verdict = est.verdict()
    assert "No combination of the suggestions fits; the closest" in verdict and "--set " in verdict
    # the fewest GPUs of this size the closest combination fits on
    raw = cfg.to_dict()
    raw.pop("method")
    closest = alignkit.build_config("rloo", raw, plan["set"])
    n = plan["gpus_needed"]
    assert n > 2 and estimate(closest, n, 8, suggest=False).fits
    assert not estimate(closest, n // 2, 8, suggest=False).fits
    assert f"it fits on {n} GPUs of 8.00 GiB" in verdict
    assert "nothing fits; the closest combination" in est.table()
    assert est.to_json()["plan"] == plan


def test_lora_reward_model_folder(tmp_path, tiny_model_dir):
    """A reward model saved as a LoRA adapter (what `train rm` with finetune: lora writes; `train ppo` loads
    it): its base model plus the adapter, counted as peft builds it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    rm_dir = tmp_path / "rm-lora"
    peft_model.save_pretrained(str(rm_dir))
    assert not (rm_dir / "config.json").exists() and (rm_dir / "adapter_config.json").is_file()

    arch = arch_of(str(rm_dir), "seq_cls", key="ppo.reward.model")
    assert arch.params == sum(p.numel() for p in peft_model.parameters())  # base + adapter + saved score head
    cfg = cfg_of("ppo", tiny_model_dir, f"ppo.reward.model={rm_dir}")
    est = estimate(cfg, 1, 40, device="cpu", suggest=False)
    assert "LoRA r=4" in est.models["reward model"]
    assert part(est, "scoring", "reward model") == arch.params * 4  # frozen, fp32 on CPU


def test_cpu_device_needs_no_gpu_memory(tiny_model_dir, capsys):
    import os

    assert estimate_main(["sft", "--set", f"model.name_or_path={tiny_model_dir}", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    assert f"1 CPU process(es) x {ram:.1f} GiB" in text and "fits:" in text and "per process" in text
    cfg = cfg_of("sft", tiny_model_dir)
    assert estimate(cfg, 2, device="cpu", suggest=False).gpu_memory_gb == pytest.approx(ram / 2)
