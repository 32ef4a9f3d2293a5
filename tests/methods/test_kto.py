"""KTO: mismatched pairs for the KL reference point, its cross-process reduction, and learning."""

from __future__ import annotations

import contextlib

import pytest
import torch

from alignkit import build_config
from alignkit.config import ConfigError
from alignkit.forward import batch_logps
from alignkit.losses import kto_loss
from alignkit.methods.kto import KTOConfig, KTOMethod, kl_part
from alignkit.reference import Reference

from . import metrics, preference_records, train, write_jsonl


def _rows():
    return [{"prompt_ids": [5, 6], "completion_ids": [7], "label": True},
            {"prompt_ids": [8], "completion_ids": [9, 10], "label": False},
            {"prompt_ids": [11, 12, 13], "completion_ids": [14], "label": True}]


def test_collate_pairs_each_prompt_with_the_previous_rows_completion():
    batch = KTOMethod(KTOConfig(), pad_token_id=0, max_length=4, reference=Reference()).collate(_rows())
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 10, 0], [11, 12, 13, 14]]
    # KL rows: prompt i + completion i-1 (row 0 takes the last row's); prompts cut from the left to fit
    kl = kl_part(batch)
    assert kl["input_ids"].tolist() == [[5, 6, 14, 0], [8, 7, 0, 0], [12, 13, 9, 10]]
    assert kl["labels"][2].tolist() == [-100, -100, 9, 10]
    no_kl = KTOMethod(KTOConfig(reference_point=False), 0, 8, reference=Reference()).collate(_rows())
    assert no_kl["input_ids"].shape[0] == 3 and not kl_part(no_kl)


class _TwoProcesses:
    """An accelerator stand-in for 2 processes: the other process contributes ``other`` to every sum."""

    num_processes = 2

    def __init__(self, other: list[float]):
        self.other, self.calls = torch.tensor(other), []

    def reduce(self, tensor, reduction):
        self.calls.append((tensor.clone(), reduction))
        assert reduction == "sum"
        return tensor + self.other

    def autocast(self):
        return contextlib.nullcontext()


def test_kl_reference_point_and_class_counts_are_all_reduced_before_use(tiny_tok):
    from alignkit.testing import tiny_llama

    policy, ref = tiny_llama(tiny_tok, seed=1), tiny_llama(tiny_tok, seed=2).eval()
    # the other process: z0 estimate 2.0, one desirable and one undesirable row
    acc = _TwoProcesses(other=[2.0, 1.0, 1.0])
    method = KTOMethod(KTOConfig(beta=0.5), tiny_tok.pad_token_id, 64, accelerator=acc, reference=Reference(ref))
    batch = method.collate(_rows())
    loss, m = method.loss(policy, batch)
    (sent, _), = acc.calls
    B = 3
    with torch.no_grad():
        pol = torch.cat([batch_logps(policy, b)[0] for b in (batch, kl_part(batch))])
        ref_logps = torch.cat([batch_logps(ref, b)[0] for b in (batch, kl_part(batch))])
    local_kl = float((pol[B:] - ref_logps[B:]).mean())
    assert sent.tolist() == pytest.approx([local_kl, 2.0, 1.0], abs=1e-5)  # this process' z0 and class counts
    z0 = max(0.0, (local_kl + 2.0) / 2)  # the mean over the two processes is the one used
    assert float(m["kl"]) / B == pytest.approx(z0, abs=1e-5)
    d = batch["desirable"]
    expected, chosen_rewards, *_ = kto_loss(pol[:B][d], pol[:B][~d], None, ref_logps[:B][d], ref_logps[:B][~d],
                                            None, beta=0.5, kl=z0)
    assert float(loss.detach()) == pytest.approx(float(expected.sum()), abs=1e-5)
    # class means over both processes: 5 rows in the micro-step, 3 desirable
    assert float(m["rewards/chosen"]) == pytest.approx(float(chosen_rewards.sum()) * 5 / 3, abs=1e-5)


def test_kto_moves_the_margin(tmp_path, tiny_model_dir):
    # preference pairs read as unpaired data: chosen -> desirable, rejected -> undesirable
    data = write_jsonl(tmp_path / "pref.jsonl", preference_records(16))
    out = tmp_path / "kto"
    train("kto", tiny_model_dir, data, out, max_steps=8, learning_rate=2e-3)
    steps, final_eval = metrics(out)
    first, last = steps[1], steps[8]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert last["rewards/margins"] > 0.1 and last["rewards/accuracies"] > first["rewards/accuracies"]
    assert last["loss"] < first["loss"]
    assert final_eval["eval/rewards/margins"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen",
                "logits/rejected", "kl", "count/desirable"):
        assert key in last


def test_kto_config_errors():
    with pytest.raises(ConfigError, match="per_device_batch_size=1.*at least 2 rows.*reference_point=false"):
        build_config("kto", {"training": {"per_device_batch_size": 1}})
    build_config("kto", {"training": {"per_device_batch_size": 1}, "kto": {"reference_point": False}})
    with pytest.raises(ConfigError, match="kto.beta"):
        build_config("kto", {"kto": {"beta": -1}})


def test_padding_free_and_chunked_logps_train_identically(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pref.jsonl", preference_records(16))
    for name, on in (("off", "false"), ("on", "true")):
        train("kto", tiny_model_dir, data, tmp_path / name, max_steps=4, learning_rate=2e-3,
              overrides=[f"kto.padding_free={on}", f"kto.chunked_logps={on}"])
    off, off_eval = metrics(tmp_path / "off")
    on, on_eval = metrics(tmp_path / "on")
    for step in off:
        for key in ("loss", "kl", "rewards/margins", "logps/chosen", "logits/rejected"):
            assert on[step][key] == pytest.approx(off[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert on_eval["eval/loss"] == pytest.approx(off_eval["eval/loss"], rel=1e-4, abs=1e-5)
