"""GPUs: the ``vllm_server`` sampler's weight sync through vLLM's NCCL weight transfer
(``generation.vllm_server_weight_sync: nccl``; the servers started with
``--weight-transfer-config '{"backend": "nccl"}'``).

Written from vLLM 0.32's own trainer-side API (``vllm.distributed.weight_transfer``:
``NCCLTrainerWeightTransferEngine`` driving the server's ``/init_weight_transfer_engine``,
``/start_weight_update``, ``/update_weights`` and ``/finish_weight_update`` through
``HTTPVLLMWeightSyncClient``). One NCCL group per server: the trainer's process 0 is rank 0, the server's
workers follow. It needs CUDA on both sides, so it is not run on this project's CPU machines; the
``files`` transport is what the CPU tests exercise.
"""

from __future__ import annotations

import os
import socket

import torch

from alignkit.errors import AlignkitError
from alignkit.launch import free_port
from alignkit.rollout.weights import policy_weights


def _address_for(url: str) -> str:
    """The address the server reaches the trainer at: ALIGNKIT_VLLM_SYNC_ADDRESS, else this host's."""
    if os.environ.get("ALIGNKIT_VLLM_SYNC_ADDRESS"):
        return os.environ["ALIGNKIT_VLLM_SYNC_ADDRESS"]
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "[::1]"):
        return "127.0.0.1"
    return socket.gethostbyname(socket.gethostname())


class NCCLWeightSender:
    """Sends the policy's weights to one server over NCCL; every training process makes one (ZeRO-3
    gathers are collectives), process 0 (``sends``) alone talks to the server."""

    def __init__(self, server, model: torch.nn.Module, *, timeout: float, sends: bool):
        if not torch.cuda.is_available():
            raise AlignkitError("generation.vllm_server_weight_sync=nccl needs CUDA on the trainer: use files.")
        from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        class PolicySource(WeightSource):
            """The policy's weights under HF names (LoRA merged); shapes and dtypes learnt once."""

            def __init__(self):
                self.model, self._meta = model, None

            def metadata(self):
                if self._meta is None:
                    self._meta = [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in policy_weights(self.model)]
                return self._meta

            def __iter__(self):
                return iter(policy_weights(self.model))

        parallel = (server.info.get("parallel_config") or {})
        workers = (int(parallel.get("tensor_parallel_size") or 1) * int(parallel.get("pipeline_parallel_size") or 1)
                   * int(parallel.get("data_parallel_size") or 1))
        self.source = PolicySource()
        self.source.metadata()  # every process: the first gather is a collective
        info = NCCLTrainerInitInfo(master_address=_address_for(server.url), master_port=free_port(),
                                   world_size=1 + workers, rank=0 if sends else 1)
        client = HTTPVLLMWeightSyncClient(server.url, timeout=timeout)
        try:
            self.engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=client, source=self.source)
        except Exception as e:  # the server's side failed (no --weight-transfer-config, unreachable address)
            raise AlignkitError(f"vLLM server {server.url} could not open the NCCL weight transfer ({e}): start it "
                                "with --weight-transfer-config '{\"backend\": \"nccl\"}', let it reach this machine "
                                "(ALIGNKIT_VLLM_SYNC_ADDRESS), or set generation.vllm_server_weight_sync: files."
                                ) from e

    def send(self, model: torch.nn.Module) -> None:
        self.source.model = model
        self.engine.send_weights()

    def close(self) -> None:
        self.engine.shutdown()
