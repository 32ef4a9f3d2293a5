"""Write real Megatron-core checkpoints of a tiny GQA/SwiGLU GPT on the CPU, with Megatron's own logits.

Run inside ``.venv-megatron`` (megatron-core 0.16.1, torch 2.13.0 CPU)::

    python tests/convert/megatron_writer.py OUT_DIR [CASE ...]

Four gloo processes write every case in turn, with the case's tensor- and pipeline-parallel sizes
(the remaining factor is data parallel); every rank builds its shard of a ``GPTModel`` (local layer
spec: RMSNorm, SwiGLU, RoPE, 4 heads in 2 query groups) and runs Megatron's forward on fixed tokens
(pipeline stages hand their hidden states over with ``send``/``recv``, logits gathered across tensor
ranks by Megatron itself). It then writes, under ``OUT_DIR/CASE/``:

- ``torch_dist/``: ``dist_checkpointing.save(model.sharded_state_dict())`` in Megatron-LM's layout
  (``latest_checkpointed_iteration.txt`` + ``iter_0000001/``), layers stacked on a leading axis;
- ``torch_dist_per_layer/`` (tp2 only): the same with ``singleton_local_shards`` metadata: one key per
  layer, SwiGLU halves stored as ``linear_fc1.weight_w`` / ``_v``;
- ``legacy/``: each rank's ``model.state_dict()`` as ``iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt``
  (``{"model": ..., "checkpoint_version": 3.0, "iteration": 1}``). Megatron-LM's training loop, which
  writes this layout, is not part of megatron-core, so the per-rank state dict is saved the way it does;
- ``legacy_language_model/`` (tp2 only): those real per-rank tensors renamed to the older Megatron-LM
  ``language_model.encoder.*`` layout (megatron-core 0.16 cannot build that model any more);
- ``legacy_args/`` (pp2_tied only): the per-rank files plus a Megatron-LM ``args`` Namespace, which
  needs pickle to load; pp2_tied's ``torch_dist`` also stores those args in ``common.pt``, as Megatron-LM does;
- ``reference.pt`` (tokens, logits) and ``case.json`` (the architecture facts a user would pass).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HIDDEN, HEADS, GROUPS, FFN, LAYERS = 64, 4, 2, 128, 4
TOKENIZER_VOCAB = 512  # alignkit.testing.tiny_tokenizer()
VOCAB = 528  # padded past the tokenizer, as Megatron-LM pads (make_vocab_size_divisible_by)
BATCH, SEQ = 2, 12
WORLD_SIZE = 4  # every case's tp * pp divides it; the remaining factor is data parallel
ITERATION_DIR = "iter_0000001"


@dataclass(frozen=True)
class Case:
    name: str
    tp: int
    pp: int
    tied: bool
    qkv_bias: bool = False
    all_biases: bool = False  # add_bias_linear: every linear layer has a bias
    rotary_base: int = 10000
    norm_eps: float = 1e-5


CASES = {
    c.name: c
    for c in [
        Case("tp1", tp=1, pp=1, tied=False),
        Case("tp1_tied", tp=1, pp=1, tied=True, rotary_base=500000, norm_eps=1e-6),
        Case("tp2", tp=2, pp=1, tied=False, all_biases=True),
        Case("pp2_tied", tp=1, pp=2, tied=True, rotary_base=1000000),
        Case("tp2_pp2_qkv_bias", tp=2, pp=2, tied=False, qkv_bias=True, norm_eps=1e-6),
    ]
}


def _cpu_shims() -> None:
    """megatron-core calls CUDA in a few places; on a CPU these calls can safely do nothing."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.cuda.current_device = lambda: "cpu"  # RoPE frequencies are built on this device
    torch.cuda.synchronize = lambda *a, **k: None  # dist_checkpointing.save
    get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()  # dropout RNG (eval: unused)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """Tied embeddings with pipeline stages: Megatron all-reduces the head copy after ``.cuda()``."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _build_model(case: Case):
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        ffn_hidden_size=FFN, use_cpu_initialization=True, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=case.tp, pipeline_model_parallel_size=case.pp,
        normalization="RMSNorm", layernorm_epsilon=case.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=case.all_biases, add_qkv_bias=case.qkv_bias,
        init_method_std=0.1,  # the 0.02 default gives near-zero logits: a weak comparison
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(1234)  # the same on every rank: CPU init builds full weights, then slices
    with _tensor_cuda_is_identity():
        model = GPTModel(
            config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
            max_sequence_length=64, position_embedding_type="rope", rotary_base=case.rotary_base,
            share_embeddings_and_output_weights=case.tied,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
    _randomize_norms_and_biases(model)
    return model.eval()


def _randomize_norms_and_biases(model) -> None:
    """Norm weights start at 1 and biases at 0: random values make a swapped or dropped one visible.

    Norms and row-parallel biases are replicated across tensor ranks, so their values depend on the
    pipeline rank only; column-parallel biases are shards and differ per rank.
    """
    from megatron.core import parallel_state

    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        if "layernorm" in name:
            seed, base = zlib.crc32(f"{name}/{pp}".encode()), 1.0
        elif name.endswith(("linear_proj.bias", "linear_fc2.bias")):  # row-parallel: replicated
            seed, base = zlib.crc32(f"{name}/{pp}".encode()), 0.0
        elif name.endswith(".bias"):
            seed, base = zlib.crc32(f"{name}/{pp}/{tp}".encode()), 0.0
        else:
            continue
        noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(seed))
        param.data.copy_(base + 0.3 * noise)


def _reference_tokens() -> torch.Tensor:
    return torch.randint(0, TOKENIZER_VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Megatron's forward across the pipeline; the full-vocabulary logits on the last stage, else None."""
    from megatron.core import parallel_state

    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    causal_mask = torch.triu(torch.ones(1, 1, SEQ, SEQ), diagonal=1).bool()  # True = masked
    if not parallel_state.is_pipeline_first_stage():
        hidden = torch.empty(SEQ, BATCH, HIDDEN)
        torch.distributed.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    output = model(tokens, positions, causal_mask, runtime_gather_output=True)
    if not parallel_state.is_pipeline_last_stage():
        torch.distributed.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return None
    return output


def _rank_file(root: Path, tp_rank: int, pp_rank: int, pp: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return root / ITERATION_DIR / name / "model_optim_rng.pt"


def _mark_latest(root: Path) -> None:
    (root / "latest_checkpointed_iteration.txt").write_text("1")


# The older Megatron-LM (megatron.legacy.model) names for the megatron-core module paths.
_LEGACY_LAYER_NAMES = {
    "input_layernorm.": "input_norm.",
    "self_attention.linear_qkv.": "self_attention.query_key_value.",
    "self_attention.linear_proj.": "self_attention.dense.",
    "pre_mlp_layernorm.": "post_attention_norm.",
    "mlp.linear_fc1.": "mlp.dense_h_to_4h.",
    "mlp.linear_fc2.": "mlp.dense_4h_to_h.",
}


def legacy_language_model_layout(state_dict: dict) -> dict:
    """Rename a megatron-core GPT state dict to the nested ``language_model`` layout of older Megatron-LM."""
    embedding, encoder, output_layer = {}, {}, {}
    for key, value in state_dict.items():
        if key.endswith("._extra_state"):
            continue
        if key == "embedding.word_embeddings.weight":
            embedding["word_embeddings"] = {"weight": value}
        elif key == "output_layer.weight":
            output_layer["weight"] = value
        elif key.startswith("decoder.final_layernorm."):
            encoder["final_norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("decoder.layers."):
            rest = key.removeprefix("decoder.")
            for new, old in _LEGACY_LAYER_NAMES.items():
                rest = rest.replace(new, old)
            encoder[rest] = value
        else:
            raise KeyError(f"no legacy name for {key}")
    language_model = {"encoder": encoder}
    if embedding:
        language_model["embedding"] = embedding
    if output_layer:
        language_model["output_layer"] = output_layer
    return {"language_model": language_model}


def megatron_lm_args(case: Case) -> argparse.Namespace:
    """The subset of Megatron-LM's training arguments a converter reads (stored pickled in its checkpoints)."""
    return argparse.Namespace(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        group_query_attention=True, num_query_groups=GROUPS, kv_channels=HIDDEN // HEADS,
        max_position_embeddings=64, seq_length=64, padded_vocab_size=VOCAB, rotary_base=case.rotary_base,
        norm_epsilon=case.norm_eps, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
        untie_embeddings_and_output_weights=not case.tied, add_qkv_bias=case.qkv_bias,
        add_bias_linear=case.all_biases,
        tensor_model_parallel_size=case.tp, pipeline_model_parallel_size=case.pp, params_dtype=torch.float32,
    )


def _save(model, case: Case, out: Path) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    dist_folders = ["torch_dist"] + (["torch_dist_per_layer"] if case.name == "tp2" else [])
    for folder in dist_folders:
        (out / folder / ITERATION_DIR).mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    sharded = model.sharded_state_dict()
    if case.name == "pp2_tied":  # as Megatron-LM does: its args go to common.pt, pickled
        sharded["args"] = megatron_lm_args(case)
    dist_checkpointing.save(sharded, str(out / "torch_dist" / ITERATION_DIR))
    if case.name == "tp2":
        metadata = {"singleton_local_shards": True, "non_homogeneous_layers": True}
        dist_checkpointing.save(model.sharded_state_dict(metadata=metadata),
                                str(out / "torch_dist_per_layer" / ITERATION_DIR))

    state = model.state_dict()
    payloads = {"legacy": {"model": state, "checkpoint_version": 3.0, "iteration": 1}}
    if case.name == "tp2":
        payloads["legacy_language_model"] = {"model": legacy_language_model_layout(state),
                                             "checkpoint_version": 3.0, "iteration": 1}
    if case.name == "pp2_tied":
        payloads["legacy_args"] = {**payloads["legacy"], "args": megatron_lm_args(case)}
    if parallel_state.get_data_parallel_rank() == 0:  # data-parallel replicas hold the same shards
        for folder, payload in payloads.items():
            path = _rank_file(out / folder, tp_rank, pp_rank, case.pp)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(payload, path)
    if torch.distributed.get_rank() == 0:
        for folder in dist_folders + list(payloads):
            _mark_latest(out / folder)


def _write_case(case: Case, out: Path) -> None:
    """All ranks: one checkpoint with tensor/pipeline sizes of ``case`` (the other ranks are data parallel)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(case.tp, case.pp)
    _cpu_shims()
    model = _build_model(case)
    tokens = _reference_tokens()
    logits = _megatron_logits(model, tokens)
    _save(model, case, out)
    first_replica = parallel_state.get_data_parallel_rank() == 0
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0 and first_replica:
        torch.save({"tokens": tokens, "logits": logits.float()}, out / "reference.pt")
        facts = {**asdict(case), "num_attention_heads": HEADS, "num_query_groups": GROUPS,
                 "vocab_size": VOCAB, "num_layers": LAYERS, "hidden_size": HIDDEN, "ffn_hidden_size": FFN}
        (out / "case.json").write_text(json.dumps(facts, indent=1))
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()


def _worker(rank: int, names: list[str], out: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    for name in names:
        _write_case(CASES[name], Path(out) / name)
        if rank == 0:
            print(f"wrote {Path(out) / name}", flush=True)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"cases to write (default all: {', '.join(CASES)})")
    args = parser.parse_args(argv)
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    names = args.cases or list(CASES)
    # One group of processes for every case: importing megatron-core once per process saves minutes.
    mp.spawn(_worker, args=(names, str(args.out_dir), _free_port()), nprocs=WORLD_SIZE, join=True)
    absent = [n for n in names if not (args.out_dir / n / "reference.pt").is_file()]
    if absent:
        raise RuntimeError(f"no reference logits were written for {absent}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
