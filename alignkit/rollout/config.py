"""How responses are sampled: the ``generation:`` section of the online methods, rejection sampling and
distillation (e.g. ``grpo.generation.num_samples``)."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.config import ConfigError, check_choice, opt

SAMPLERS = ("hf", "vllm", "vllm_server")
SERVER_WEIGHT_SYNCS = ("auto", "files", "nccl")


@dataclass
class SamplingConfig:
    """Sampling settings (YAML section ``generation:``). Log-probs in RL assume the same temperature."""

    max_new_tokens: int = opt(128, "Most tokens generated per response; a response cut here has ended_with_eos=False.")
    temperature: float = opt(1.0, "Sampling temperature (0 = greedy). RL log-probs assume the same temperature.")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest token set with this much probability (1 = off).")
    top_k: int = opt(0, "Keep only the k most likely tokens (0 = off).")
    num_samples: int = opt(1, "Responses sampled per prompt (the group size of RLOO/GRPO); consecutive rows.")
    do_sample: bool = opt(True, "Sample; false = greedy decoding (temperature/top_p/top_k ignored).")
    batch_size: int = opt(0, "Sequences (prompts x samples) per generate call; 0 = all at once. Lower it when "
                             "generation runs out of memory.")
    share_prefill: bool = opt(True, "hf sampler: run each prompt's prefill once and copy its KV cache to its "
                                    "num_samples rows, instead of once per row (same responses; batch_size, if "
                                    "set, is rounded down to whole prompts).")
    sampler: str = opt("hf", "hf (model.generate on the training model), vllm (a colocated vLLM; "
                             "pip install alignkit[vllm]) or vllm_server (`vllm serve` processes over HTTP).")
    zero3_gather: bool = opt(True, "Under DeepSpeed ZeRO-3, gather the full weights once per rollout (fast; every GPU "
                                   "holds the whole model while generating). false: fetch layer by layer per token (slow).")
    vllm_gpu_memory_utilization: float = opt(0.3, "Fraction of GPU memory vLLM may take (weights + KV cache), next to training.")
    vllm_tensor_parallel_size: int = opt(1, "GPUs one vLLM instance spans; must divide the number of training processes.")
    vllm_max_model_len: int | None = opt(None, "vLLM context length (prompt + response); None = the model's maximum.")
    vllm_kv_cache_gb: float | None = opt(None, "GiB of KV cache per vLLM instance; None = what "
                                               "vllm_gpu_memory_utilization leaves after the weights (CPU: 1 GiB).")
    vllm_sleep_mode: bool | None = opt(None, "Free vLLM's GPU memory (weights and KV cache) while the policy trains; "
                                             "None = on with CUDA. Not supported on CPU.")
    vllm_server_urls: list[str] = opt(factory=list, doc="vllm_server: URLs of running `vllm serve` processes "
                                      "(http://host:port), requests spread over them; empty = start "
                                      "vllm_server_count servers on this machine, stopped when the run ends.")
    vllm_server_count: int = opt(1, "vllm_server without URLs: how many servers to start here.")
    vllm_server_timeout: float = opt(600.0, "vllm_server: seconds one request (a rollout's share, a weight sync) may "
                                            "take before the server counts as stuck (an error naming it).")
    vllm_server_start_timeout: float = opt(900.0, "vllm_server: seconds a server started here may take to load.")
    vllm_server_weight_sync: str = opt("auto", "vllm_server: how the policy's weights reach the servers: files "
                                               "(safetensors in vllm_server_sync_dir, loaded by vLLM's reload_weights), "
                                               "nccl (vLLM's NCCL weight transfer, GPUs), auto = nccl with CUDA.")
    vllm_server_sync_dir: str | None = opt(None, "vllm_server, files: a folder the trainer writes and every server "
                                                 "reads (a shared filesystem for servers on other machines); "
                                                 "None = a temporary folder here (/dev/shm when it exists).")
    vllm_server_lora: bool = opt(True, "vllm_server: a LoRA policy sends only its adapter (/v1/load_lora_adapter) "
                                       "when the servers have LoRA enabled; false = the merged weights.")

    def check(self, section: str = "generation") -> None:
        """Raise ConfigError naming ``section.key`` for a bad value."""
        check_choice(f"{section}.sampler", self.sampler, SAMPLERS)
        check_choice(f"{section}.vllm_server_weight_sync", self.vllm_server_weight_sync, SERVER_WEIGHT_SYNCS)
        bad_urls = [u for u in self.vllm_server_urls if not str(u).startswith(("http://", "https://"))]
        if bad_urls:
            raise ConfigError(f"{section}.vllm_server_urls: {bad_urls[0]!r} is not a URL: write http://HOST:PORT.")
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("num_samples", self.num_samples >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("batch_size", self.batch_size >= 0, ">= 0 (0 = all at once)"),
            ("vllm_gpu_memory_utilization", 0 < self.vllm_gpu_memory_utilization <= 1, "in (0, 1]"),
            ("vllm_tensor_parallel_size", self.vllm_tensor_parallel_size >= 1, "at least 1"),
            ("vllm_max_model_len", self.vllm_max_model_len is None or self.vllm_max_model_len >= 2, "at least 2 (or null)"),
            ("vllm_kv_cache_gb", self.vllm_kv_cache_gb is None or self.vllm_kv_cache_gb > 0, "> 0 (or null)"),
            ("vllm_server_count", self.vllm_server_count >= 1, "at least 1"),
            ("vllm_server_timeout", self.vllm_server_timeout > 0, "> 0 seconds"),
            ("vllm_server_start_timeout", self.vllm_server_start_timeout > 0, "> 0 seconds"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{section}.{key}={getattr(self, key)!r}: must be {rule}.")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0
