"""Raw state dicts -> HF folders: every supported layout gives the base model's exact logits; bad
checkpoints give one-line errors; pickled objects are never unpickled without allow_pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignkit.convert import ConvertError, convert_main, convert_state_dict

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11], [300, 2, 64, 128, 9, 1, 77, 400]])


def _logits(model_dir: Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def base(tiny_model_dir) -> Path:
    """The tiny Llama HF folder shared by the suite (tests/conftest.py)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def trained(base) -> dict[str, torch.Tensor]:
    """The 'fine-tuned' weights: the base's, shifted, so a conversion that fell back to the base would fail."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(base).state_dict()
    generator = torch.Generator().manual_seed(0)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}


@pytest.fixture(scope="module")
def expected_logits(base, trained) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_state_dict(trained)
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def _save_torch(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _bare_pt(d: Path, sd: dict) -> Path:
    return _save_torch(d / "model.pt", sd)


def _halos(d: Path, sd: dict) -> Path:
    return _save_torch(d / "policy.pt", {"step_idx": 640, "state": sd, "metrics": {"loss": 0.42}})


def _ddp_module_prefix(d: Path, sd: dict) -> Path:
    return _save_torch(d / "ckpt.bin", {"module." + k: v for k, v in sd.items()})


def _lightning(d: Path, sd: dict) -> Path:
    return _save_torch(d / "last.ckpt", {"epoch": 1, "state_dict": {"model." + k: v for k, v in sd.items()}})


def _compiled_inner_model(d: Path, sd: dict) -> Path:
    """torch.compile's _orig_mod. on the inner LlamaModel's own keys (no outer model.)."""
    keys = {("_orig_mod." + k.removeprefix("model.")): v for k, v in sd.items() if k != "lm_head.weight"}
    return _save_torch(d / "inner.pt", {**keys, "lm_head.weight": sd["lm_head.weight"]})


def _safetensors(d: Path, sd: dict) -> Path:
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, d / "weights.safetensors")
    return d / "weights.safetensors"


def _deepspeed_fp32_folder(d: Path, sd: dict) -> Path:
    """zero_to_fp32.py's output: a bare fp32 state dict as pytorch_model.bin; the folder is given."""
    _save_torch(d / "pytorch_model.bin", {k: v.float() for k, v in sd.items()})
    return d


def _sharded_index(d: Path, sd: dict) -> Path:
    """Two safetensors shards and a model.safetensors.index.json (zero_to_fp32's sharded output)."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: sd[k].contiguous() for k in names}, d / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d / "model.safetensors.index.json"


LAYOUTS = [_bare_pt, _halos, _ddp_module_prefix, _lightning, _compiled_inner_model, _safetensors,
           _deepspeed_fp32_folder, _sharded_index]


@pytest.mark.parametrize("write", LAYOUTS, ids=[f.__name__.strip("_") for f in LAYOUTS])
def test_each_layout_converts_to_the_same_logits(write, base, trained, expected_logits, tmp_path):
    checkpoint = write(tmp_path / "ckpt", trained)
    out = convert_state_dict(checkpoint, str(base), tmp_path / "hf")
    assert torch.equal(_logits(out), expected_logits)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_output_dtype_is_the_users_choice(base, trained, expected_logits, tmp_path):
    checkpoint = _bare_pt(tmp_path / "ckpt", trained)
    out = convert_state_dict(checkpoint, str(base), tmp_path / "hf", dtype="bfloat16")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        logits = model.float().eval()(TOKENS).logits
    assert torch.allclose(logits, expected_logits, atol=0.1)  # bf16 rounding of the weights only


def test_auto_dtype_keeps_the_checkpoints_own(base, trained, tmp_path):
    checkpoint = _bare_pt(tmp_path / "ckpt", {k: v.half() for k, v in trained.items()})
    out = convert_state_dict(checkpoint, str(base), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


@pytest.fixture(scope="module")
def tied_base(base, tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tied")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def test_tied_embeddings_without_a_head_stay_tied(tied_base, trained, tmp_path):
    head_less = {k: v for k, v in trained.items() if k != "lm_head.weight"}
    out = convert_state_dict(_bare_pt(tmp_path / "ckpt", head_less), str(tied_base), tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, head_less["model.embed_tokens.weight"])


def test_a_head_that_differs_from_tied_embeddings_unties_them(tied_base, trained, expected_logits, tmp_path):
    out = convert_state_dict(_bare_pt(tmp_path / "ckpt", trained), str(tied_base), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(_logits(out), expected_logits)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_and_unexpected_keys_are_listed(base, trained, tmp_path):
    broken = {k: v for k, v in trained.items() if k != "model.norm.weight"}
    broken["model.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ConvertError) as error:
        convert_state_dict(_bare_pt(tmp_path / "ckpt", broken), str(base), tmp_path / "hf")
    message = _one_line(error)
    assert "1 missing: model.norm.weight" in message and "1 unexpected: model.extra_head.weight" in message
    assert not (tmp_path / "hf").exists()


def test_shape_mismatch_names_the_key_and_both_shapes(base, trained, tmp_path):
    broken = dict(trained)
    broken["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    with pytest.raises(ConvertError) as error:
        convert_state_dict(_bare_pt(tmp_path / "ckpt", broken), str(base), tmp_path / "hf")
    assert "model.layers.1.mlp.up_proj.weight (100, 64) vs (128, 64)" in _one_line(error)


def test_two_keys_naming_one_parameter_are_refused(base, trained, tmp_path):
    doubled = {**trained, "module.model.norm.weight": trained["model.norm.weight"]}
    with pytest.raises(ConvertError, match="both name 'model.norm.weight'"):
        convert_state_dict(_bare_pt(tmp_path / "ckpt", doubled), str(base), tmp_path / "hf")


def test_a_file_without_a_state_dict_is_refused(base, tmp_path):
    with pytest.raises(ConvertError, match="no state dict found"):
        convert_state_dict(_save_torch(tmp_path / "x.pt", {"step": 3, "notes": ["a"]}), str(base), tmp_path / "hf")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", bytes(range(256)) * 4], ids=["text", "binary"])
def test_a_damaged_file_is_reported_in_one_line(content, base, tmp_path):
    (tmp_path / "broken.bin").write_bytes(content)
    with pytest.raises(ConvertError) as error:
        convert_state_dict(tmp_path / "broken.bin", str(base), tmp_path / "hf")
    assert "broken.bin: not a readable torch checkpoint" in _one_line(error)


def test_a_folder_with_several_weights_files_asks_for_one(base, trained, tmp_path):
    _bare_pt(tmp_path / "ckpt", trained)
    _halos(tmp_path / "ckpt", trained)
    with pytest.raises(ConvertError, match="give one weights file"):
        convert_state_dict(tmp_path / "ckpt", str(base), tmp_path / "hf")


def test_an_existing_output_folder_needs_overwrite(base, trained, tmp_path):
    checkpoint = _bare_pt(tmp_path / "ckpt", trained)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(ConvertError, match="--overwrite"):
        convert_state_dict(checkpoint, str(base), tmp_path / "hf")
    convert_state_dict(checkpoint, str(base), tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "hf" / "keep.txt").exists()


class _CreatesFileWhenUnpickled:
    """Unpickling this calls open(marker, "w"): any code run by pickle would show as the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_objects_are_refused_without_allow_pickle(base, trained, tmp_path):
    marker = tmp_path / "pickle-ran"
    checkpoint = _save_torch(tmp_path / "trap.pt", {"state": trained, "extra": _CreatesFileWhenUnpickled(marker)})
    with pytest.raises(ConvertError) as error:
        convert_state_dict(checkpoint, str(base), tmp_path / "hf")
    message = _one_line(error)
    assert "--allow-pickle" in message and "io.open" in message and "trap.pt" in message
    assert not marker.exists()

    # the trap is real: with the flag, unpickling runs it (and the state dict still converts)
    convert_state_dict(checkpoint, str(base), tmp_path / "hf", allow_pickle=True)
    assert marker.exists()


def test_cli_converts_and_reports_errors_in_one_line(base, trained, expected_logits, tmp_path, capsys):
    checkpoint = _halos(tmp_path / "ckpt", trained)
    out = tmp_path / "hf"
    assert convert_main(["state-dict", str(checkpoint), "--base", str(base), "-o", str(out)]) == 0
    assert torch.equal(_logits(out), expected_logits)

    capsys.readouterr()
    assert convert_main(["state-dict", str(checkpoint), "--base", str(base), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignkit convert: error:") and "--overwrite" in err and "\n" not in err


def test_cli_help_says_what_allow_pickle_risks(capsys):
    assert convert_main(["state-dict", "--help"]) == 0
    assert "arbitrary code" in " ".join(capsys.readouterr().out.split())
