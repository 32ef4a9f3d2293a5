"""Runs inside a ``vllm serve`` process: the methods the ``vllm_server`` sampler calls through vLLM's
``/collective_rpc`` route (``VLLM_SERVER_DEV_MODE=1``).

Start a server with ``--worker-extension-cls alignkit.rollout.vllm_worker.WeightSync`` (alignkit does when
it starts the servers itself); vLLM then adds these methods to each of its workers. They use vLLM's own
in-place reload (``model_runner.reload_weights``), then re-pack a tied lm_head on CPU, which that reload
leaves stale (:func:`~alignkit.rollout.weights.refresh_tied_lm_head`).
"""

from __future__ import annotations

from alignkit.rollout.weights import refresh_tied_lm_head

EXTENSION = "alignkit.rollout.vllm_worker.WeightSync"


class WeightSync:
    """Mixed into vLLM's worker class (``self`` is the worker)."""

    def alignkit_reload_weights(self, path: str) -> dict:
        """Load every ``*.safetensors`` file of the folder ``path`` (HF checkpoint names) in place.

        A folder this server cannot see (another machine without a shared filesystem) is answered, not
        raised: the trainer turns it into one line, and vLLM's model config keeps its path."""
        import os

        if not os.path.isdir(path) or not any(f.endswith(".safetensors") for f in os.listdir(path)):
            return {"missing": path}
        self.model_runner.reload_weights(weights_path=path)
        tied = bool(self.model_runner.get_model() is not None and refresh_tied_lm_head(self.model_runner.get_model()))
        return {"tied_lm_head_refreshed": tied}

    def alignkit_model_info(self) -> dict:
        """What the trainer checks before it sends weights: the vocabulary and the architecture."""
        config = self.model_config
        return {"vocab_size": config.get_vocab_size(), "architectures": list(config.architectures or []),
                "hidden_size": config.get_hidden_size(), "dtype": str(config.dtype).removeprefix("torch.")}
