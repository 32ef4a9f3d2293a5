"""The DPO family (dpo, simpo, cpo, orpo): batching, log-probs, learning, references, config traps, ZeRO-3."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alignkit import build_config
from alignkit.config import ConfigError
from alignkit.forward import BatchLayout, completion_logps
from alignkit.methods.preference import DPOConfig, PreferenceMethod
from alignkit.reference import Reference

from . import metrics, preference_records, train, write_jsonl


@pytest.fixture
def pref_file(tmp_path):
    return write_jsonl(tmp_path / "pref.jsonl", preference_records())


def _rows():
    return [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12, 13]},
            {"prompt_ids": [5], "chosen_ids": [14, 15, 16], "rejected_ids": [17]}]


def test_collate_puts_chosen_then_rejected_in_one_padded_batch():
    batch = PreferenceMethod("dpo", DPOConfig(), pad_token_id=0, reference=Reference()).collate(_rows())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0], [5, 14, 15, 16, 0, 0, 0],
                                           [5, 6, 7, 10, 11, 12, 13], [5, 17, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, -100, -100], [-100, 14, 15, 16, -100, -100, -100],
                                        [-100, -100, -100, 10, 11, 12, 13], [-100, 17, -100, -100, -100, -100, -100]]
    assert batch["attention_mask"].sum(-1).tolist() == [5, 4, 7, 2]
    assert "ref_logps" not in batch
    rows = [dict(r, ref_chosen_logps=-1.0 - i, ref_rejected_logps=-3.0 - i) for i, r in enumerate(_rows())]
    assert PreferenceMethod("dpo", DPOConfig(), 0).collate(rows)["ref_logps"].tolist() == [-1.0, -2.0, -3.0, -4.0]


def test_completion_logps_equal_a_full_log_softmax_and_skip_prompt_logits(tiny_tok):
    from alignkit.testing import tiny_llama

    model = tiny_llama(tiny_tok)
    batch = PreferenceMethod("dpo", DPOConfig(), tiny_tok.pad_token_id).collate(_rows())
    seen = {}
    real_forward = model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        seen["positions"] = out.logits.shape[1]
        return out

    model.forward = forward
    logps, n_tokens, _ = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    # the first completion token of the batch is at position 1: positions 0..5 predict tokens 1..6
    assert seen["positions"] == batch["input_ids"].shape[1] - 1
    full = real_forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    expected = (full[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert n_tokens.tolist() == [2, 3, 4, 1]

    long_prompt = [dict(r, prompt_ids=[5] * 6 + r["prompt_ids"]) for r in _rows()]
    batch = PreferenceMethod("dpo", DPOConfig(), tiny_tok.pad_token_id).collate(long_prompt)
    completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert seen["positions"] == batch["input_ids"].shape[1] - 7  # no LM-head logits over the shared prompt


LEARNS = {
    "dpo-sigmoid": ("dpo", []),
    "dpo-ipo": ("dpo", ["dpo.loss_type=ipo"]),
    "simpo": ("simpo", []),
    "cpo": ("cpo", []),
    "cpo-simpo": ("cpo", ["cpo.loss_type=simpo"]),
    "orpo": ("orpo", []),
}


@pytest.mark.parametrize("case", list(LEARNS))
def test_method_moves_the_preference_margin(tmp_path, tiny_model_dir, pref_file, case):
    method, overrides = LEARNS[case]
    train(method, tiny_model_dir, pref_file, tmp_path / "out", overrides=overrides)
    steps, final_eval = metrics(tmp_path / "out")
    first, last = steps[1], steps[max(steps)]
    assert last["rewards/margins"] > first["rewards/margins"] + 0.02, (first, last)
    assert last["rewards/accuracies"] >= 0.75
    assert final_eval["eval/rewards/margins"] > 0 and final_eval["eval/rewards/accuracies"] >= 0.75
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen",
                "logits/rejected"):
        assert key in last
    if method in ("cpo", "orpo"):
        assert last["nll"] < first["nll"]  # the NLL term trains the chosen completions
    if method == "dpo":
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert (tmp_path / "out" / "config.json").is_file()


def test_lora_adapter_reference_equals_an_explicit_frozen_copy(tmp_path, tiny_model_dir, pref_file):
    lora = {"finetune": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    handler = _Capture()
    logging.getLogger("alignkit").addHandler(handler)
    try:
        live = ["dpo.precompute_ref_logps=false"]  # the reference runs every step
        train("dpo", tiny_model_dir, pref_file, tmp_path / "adapter", model=lora, learning_rate=5e-3, overrides=live)
        train("dpo", tiny_model_dir, pref_file, tmp_path / "explicit", model=lora, learning_rate=5e-3,
              overrides=live + [f"dpo.ref_model={tiny_model_dir}"])
    finally:
        logging.getLogger("alignkit").removeHandler(handler)
    assert any("adapter disabled" in m for m in handler.messages)
    a, _ = metrics(tmp_path / "adapter")
    b, _ = metrics(tmp_path / "explicit")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-5), step
        assert a[step]["rewards/margins"] == pytest.approx(b[step]["rewards/margins"], abs=1e-5), step
    assert a[6]["rewards/margins"] > a[1]["rewards/margins"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_precomputed_reference_equals_the_live_reference(tmp_path, tiny_model_dir, pref_file):
    handler = _Capture()
    logging.getLogger("alignkit").addHandler(handler)
    try:
        train("dpo", tiny_model_dir, pref_file, tmp_path / "live", max_steps=4,
              overrides=["dpo.precompute_ref_logps=false"])
        train("dpo", tiny_model_dir, pref_file, tmp_path / "pre", max_steps=4,
              overrides=["dpo.precompute_ref_logps=true"])
    finally:
        logging.getLogger("alignkit").removeHandler(handler)
    # full fine-tuning without dpo.ref_model: a frozen copy is loaded, and the log says so
    assert any("frozen copy" in m and "dpo.ref_model" in m for m in handler.messages)
    assert any("precomputed" in m for m in handler.messages)
    a, ea = metrics(tmp_path / "live")
    b, eb = metrics(tmp_path / "pre")
    for step in a:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-5), step
    assert ea["eval/loss"] == pytest.approx(eb["eval/loss"], abs=1e-5)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("method", ["simpo", "cpo", "orpo"])
@pytest.mark.parametrize("where", [{"training": {"mixed_precision": "fp16"}}, {"model": {"dtype": "float16"}}])
def test_fp16_is_refused_for_reference_free_methods(method, where):
    with pytest.raises(ConfigError, match=rf"{method} in float16.*bf16.*fp32"):
        build_config(method, where)


def test_dpo_allows_fp16_config_and_other_traps_are_named():
    build_config("dpo", {"training": {"mixed_precision": "fp16"}})  # DPO's log-ratios are fine in fp16
    with pytest.raises(ConfigError, match="dpo.label_smoothing=0.1 has no meaning for loss_type ipo"):
        build_config("dpo", {"dpo": {"loss_type": "ipo", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match=r"dpo.loss_type='kto'.*sigmoid, ipo, hinge, robust"):
        build_config("dpo", {"dpo": {"loss_type": "kto"}})
    with pytest.raises(ConfigError, match=r"robust needs it in \[0, 0.5\)"):
        build_config("dpo", {"dpo": {"loss_type": "robust", "label_smoothing": 0.5}})
    with pytest.raises(ConfigError, match="simpo.beta=0.0: must be > 0"):
        build_config("simpo", {"simpo": {"beta": 0}})
    with pytest.raises(ConfigError, match="unknown key cpo.ref_model"):
        build_config("cpo", {"cpo": {"ref_model": "x"}})  # reference-free: no such option


def test_a_reference_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir, pref_file):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    other.resize_token_embeddings(700)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"dpo.ref_model=.*vocabulary of 700 tokens.*policy's tokenizer"):
        train("dpo", tiny_model_dir, pref_file, tmp_path / "out", overrides=[f"dpo.ref_model={tmp_path / 'other'}"])


@pytest.mark.distributed
@pytest.mark.xdist_group("distributed")
def test_dpo_zero3_two_processes_trains_and_saves(tmp_path, tiny_model_dir, pref_file):
    out = tmp_path / "z3"
    # overwrite_output_dir: engine.fit checks output_dir on every process while the main one already
    # writes its config there, so a slower process can take the fresh run for an old one (an engine race)
    cfg = {"model": {"name_or_path": str(tiny_model_dir), "dtype": "float32"},
           "data": {"train": [str(pref_file)], "max_length": 64, "eval_split": 4},
           "training": {"output_dir": str(out), "max_steps": 6, "learning_rate": 1e-3, "per_device_batch_size": 2,
                        "report_to": ["jsonl"], "mixed_precision": "no", "lr_scheduler": "constant",
                        "overwrite_output_dir": True}}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = Path(sys.executable).parent / "alignkit"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(cli), "train", "dpo", str(path), "--num-processes", "2", "--deepspeed", "zero3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    steps, final_eval = metrics(out)
    assert steps[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[6]["rewards/margins"] > 0.05 and final_eval["eval/rewards/margins"] > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # a plain, complete HF folder
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) == len(base.state_dict())


# --------------------------------------------------------------------------------------------------
# Speed and memory switches: identical training, the layouts they pick, the reference precompute decision
# --------------------------------------------------------------------------------------------------

ALL_OFF = ["padding_free=false", "shared_prompt=false", "chunked_logps=false"]
ALL_ON = ["padding_free=true", "shared_prompt=true", "chunked_logps=true"]


@pytest.mark.parametrize("method", ["dpo", "simpo"])
def test_padding_free_shared_prompt_and_chunked_logps_train_identically(tmp_path, tiny_model_dir, pref_file, method):
    log = logging.getLogger("alignkit")
    handler, level = _Capture(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # api.setup_logging leaves a logger that already has a handler as it is
    try:
        for name, switches in (("off", ALL_OFF), ("on", ALL_ON)):
            live = ["dpo.precompute_ref_logps=false"] if method == "dpo" else []
            train(method, tiny_model_dir, pref_file, tmp_path / name, max_steps=4,
                  overrides=[f"{method}.{s}" for s in switches] + live)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert any("padded rows" in m for m in handler.messages)
    assert any("padding-free (packed rows), shared prompt: always" in m for m in handler.messages)
    off, off_eval = metrics(tmp_path / "off")
    on, on_eval = metrics(tmp_path / "on")
    for step in off:
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen"):
            assert on[step][key] == pytest.approx(off[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert on_eval["eval/loss"] == pytest.approx(off_eval["eval/loss"], rel=1e-4, abs=1e-5)
    assert on[4]["rewards/margins"] > on[1]["rewards/margins"]


def test_collate_follows_the_layout():
    rows = _rows()
    # attention that costs a lot per (query, key) pair: rows no wider than the longest sequence
    packed = PreferenceMethod("dpo", DPOConfig(), 0, layout=BatchLayout(packed=True, attention_cost=1.0)).collate(rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (3, 7)  # 7 | 5+2 | 4 (+3 pad)
    assert packed["sequence_tokens"].tolist() == [2, 3, 4, 1]
    # cheap attention: no padding at all, in the narrowest rows that allow it (7+2 | 5+4)
    cheap = BatchLayout(packed=True, attention_cost=1e-6)
    assert PreferenceMethod("dpo", DPOConfig(), 0, layout=cheap).collate(rows)["input_ids"].shape == (2, 9)
    varlen = BatchLayout(packed=True, one_row=True)  # a varlen kernel: everything in one row
    assert PreferenceMethod("dpo", DPOConfig(), 0, layout=varlen).collate(rows)["input_ids"].shape == (1, 18)
    shared_layout = BatchLayout(shared_prompt="always", attention_cost=1.0)
    shared = PreferenceMethod("dpo", DPOConfig(), 0, layout=shared_layout).collate(rows)
    assert shared["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13], [5, 14, 15, 16, 17, 0, 0, 0, 0]]
    assert shared["attention_mask"].shape == (2, 1, 9, 9)
    method = PreferenceMethod("dpo", DPOConfig(), 0)
    assert method.count_items(shared) == 2 and method.count_tokens(shared) == 14  # each prompt counted once


class _OneProcess:
    num_processes = 1
    state = None


@pytest.mark.parametrize("max_steps, expected", [(-1, True), (6, True), (1, False)])
def test_precompute_ref_logps_auto_when_the_run_visits_every_row(max_steps, expected):
    from alignkit.methods.preference import _precompute_reference

    cfg = build_config("dpo", {"training": {"max_steps": max_steps, "per_device_batch_size": 4}})
    assert cfg.method_args.precompute_ref_logps == "auto"
    assert _precompute_reference(cfg, _OneProcess(), Reference(), n_train=20) is expected
    cfg = build_config("dpo", {"training": {"max_steps": 1}, "dpo": {"precompute_ref_logps": True}})
    assert _precompute_reference(cfg, _OneProcess(), Reference(), n_train=20) is True
    with pytest.raises(ConfigError, match="precompute_ref_logps='always': use auto, true or false"):
        build_config("dpo", {"dpo": {"precompute_ref_logps": "always"}})
    with pytest.raises(ConfigError, match="shared_prompt='sometimes'"):
        build_config("simpo", {"simpo": {"shared_prompt": "sometimes"}})
