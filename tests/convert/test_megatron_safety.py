"""Megatron reading is safe by default (fast; no megatron-core needed): booby-trapped pickles in rank files and
in torch_dist ``.metadata`` are refused without running, while torch's own ``.metadata`` records are read."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from alignkit.convert import ConvertError, convert_megatron
from alignkit.convert.megatron import find_iteration_dir, read_dcp_metadata

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class _CreatesFileWhenUnpickled:
    """Unpickling this calls open(marker, "w"): any code run by pickle would show as the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_tok, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tok.save_pretrained(folder)
    return folder


def _torch_dist_like(folder: Path) -> Path:
    """A checkpoint written by torch.distributed.checkpoint itself (what Megatron's torch_dist builds on)."""
    import torch.distributed.checkpoint as dcp

    state = {"embedding.word_embeddings.weight": torch.randn(8, 4), "decoder.final_layernorm.weight": torch.ones(4)}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_torchs_own_metadata_records_are_read_without_pickle(tmp_path):
    folder = _torch_dist_like(tmp_path / "iter_0000001")
    metadata = read_dcp_metadata(folder, allow_pickle=False)
    assert metadata.state_dict_metadata["embedding.word_embeddings.weight"].size == torch.Size([8, 4])


def test_a_trap_inside_torch_dist_metadata_is_refused(tmp_path, tokenizer_dir):
    folder = _torch_dist_like(tmp_path / "ckpt" / "iter_0000001")
    marker = tmp_path / "pickle-ran"
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the test's own file: a genuine record to hide the trap in
    metadata.planner_data = _CreatesFileWhenUnpickled(marker)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))

    with pytest.raises(ConvertError) as error:
        convert_megatron(folder, str(tokenizer_dir), tmp_path / "hf", num_attention_heads=2)
    message = str(error.value)
    assert "\n" not in message and ".metadata" in message and "--allow-pickle" in message
    assert not marker.exists()


def test_pickled_args_in_a_rank_file_are_refused(tmp_path, tokenizer_dir):
    marker = tmp_path / "pickle-ran"
    rank_file = tmp_path / "ckpt" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    rank_file.parent.mkdir(parents=True)
    torch.save({"model": {"embedding.word_embeddings.weight": torch.randn(8, 4)},
                "args": _CreatesFileWhenUnpickled(marker), "iteration": 1}, rank_file)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1")

    with pytest.raises(ConvertError) as error:
        convert_megatron(tmp_path / "ckpt", str(tokenizer_dir), tmp_path / "hf", num_attention_heads=2)
    message = str(error.value)
    assert "\n" not in message and "model_optim_rng.pt" in message and "--allow-pickle" in message
    assert not marker.exists()


def test_a_folder_without_a_megatron_checkpoint_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="latest_checkpointed_iteration.txt, iter_"):
        find_iteration_dir(tmp_path / "empty")


def test_an_iteration_that_is_not_there_lists_the_available_ones(tmp_path):
    _torch_dist_like(tmp_path / "ckpt" / "iter_0000010")
    assert find_iteration_dir(tmp_path / "ckpt") == tmp_path / "ckpt" / "iter_0000010"
    with pytest.raises(ConvertError, match="available iterations: iter_0000010"):
        find_iteration_dir(tmp_path / "ckpt", iteration=20)
