"""Config: YAML + overrides, typed values, unknown keys with suggestions, docs, saved config."""

from __future__ import annotations

import pytest
import yaml

from alignkit import build_config, load_config
from alignkit.config import ConfigError, describe
from alignkit.methods import config_class


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": "some/model", "finetune": "lora"},
        "data": {"train": ["a.jsonl", {"path": "b.jsonl", "ratio": 0.5, "columns": {"q": "prompt"}}]},
        "training": {"learning_rate": 1e-4},
    }))
    cfg = load_config("sft", path, ["training.learning_rate=3e-5", "training.max_steps=7", "sft.packing=true",
                                     "model.lora_target_modules=[q_proj, v_proj]"])
    assert cfg.training.learning_rate == 3e-5 and cfg.training.max_steps == 7
    assert cfg.method_args.packing is True
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert [s.path for s in cfg.data.train] == ["a.jsonl", "b.jsonl"]
    assert cfg.data.train[1].ratio == 0.5 and cfg.data.train[1].columns == {"q": "prompt"}


def test_bare_string_source_and_scientific_notation_string():
    cfg = build_config("sft", {"data": {"train": "x.json"}, "training": {"learning_rate": "1e-5"}})
    assert cfg.data.train[0].path == "x.json" and cfg.training.learning_rate == 1e-5


@pytest.mark.parametrize("raw, needle", [
    ({"training": {"learnig_rate": 1e-5}}, "training.learnig_rate (did you mean 'learning_rate'?)"),
    ({"trainig": {}}, "'trainig' (did you mean 'training'?)"),
    ({"model": {"finetune": "lora2"}}, "did you mean 'lora'?"),
    ({"training": {"max_steps": "ten"}}, "training.max_steps must be an integer"),
    ({"training": {"per_device_batch_size": 0}}, "training.per_device_batch_size=0: must be >= 1"),
    ({"sft": {"pakcing": True}}, "did you mean 'packing'?"),
    ({"training": {"deepspeed": "zero4"}}, "zero1, zero2, zero3"),
    ({"training": {"fsdp": "full"}}, "training.fsdp='full' is not valid (did you mean 'full_shard'?)"),
    ({"training": {"fsdp": "full_shard", "deepspeed": "zero3"}},
     "training.fsdp=full_shard and training.deepspeed=zero3 are both set"),
    ({"training": {"fsdp_cpu_offload": True}}, "training.fsdp_cpu_offload=true needs training.fsdp"),
    ({"data": {"train": [{"ratio": 2}]}}, "missing required key(s) path"),
])
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        build_config("sft", raw)
    assert needle in str(e.value)


def test_override_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config("sft", {}, ["learning_rate"])
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        build_config("sft", {}, ["training.max_step=3"])


def test_unknown_method_suggests():
    with pytest.raises(ConfigError, match="did you mean 'sft'"):
        build_config("sfft", {})


def test_describe_lists_every_option_with_doc():
    text = describe("sft", config_class("sft"))
    for key in ("learning_rate: 2.0e-05", "finetune: full", "packing: false", "on_bad_row: error"):
        assert key in text
    assert "# Peak learning rate" in text


def test_saved_config_round_trips(tmp_path):
    cfg = build_config("sft", {"training": {"max_steps": 3}, "data": {"train": ["a.jsonl"]}})
    cfg.save(tmp_path / "c.yaml")
    again = load_config("sft", tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_docs_config_reference_is_current():
    from pathlib import Path

    from alignkit.methods import config_reference

    doc = Path(__file__).parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_reference() + "\n", "regenerate: alignkit config --markdown > docs/config.md"


def test_nested_sections_keep_the_methods_own_defaults():
    """A partial generation: section keeps GRPO's num_samples; rejection sampling's differs; both documented."""
    cfg = build_config("grpo", {"grpo": {"generation": {"max_new_tokens": 64}, "reward": {"functions": ["m:f"]}}},
                       ["grpo.generation.temperature=0.7"])
    g = cfg.method_args.generation
    assert (g.max_new_tokens, g.temperature, g.num_samples) == (64, 0.7, 8)
    assert build_config("rloo", {"rloo": {"reward": {"url": "http://x"}}}).method_args.generation.num_samples == 4
    text = describe("grpo", config_class("grpo"))
    assert "  generation:  # How responses are sampled" in text and "    num_samples: 8  #" in text
    assert "    functions: []  #" in text  # reward sources, nested


@pytest.mark.parametrize("raw, needle", [
    ({"grpo": {"generation": {"max_new_token": 5}}}, "grpo.generation.max_new_token (did you mean 'max_new_tokens'?)"),
    ({"grpo": {"reward_functions": ["m:f"]}}, "grpo.reward_functions (did you mean grpo.reward.functions?)"),
    ({"grpo": {"reward_model": "x"}}, "(did you mean grpo.reward.model?)"),
    ({"grpo": {"num_samples": 4}}, "(did you mean grpo.generation.num_samples?)"),
    ({"grpo": {"engine": "vllm"}}, "(did you mean grpo.generation.sampler?)"),
    ({"grpo": {"generation_batch_size": 4}}, "(did you mean grpo.generation.batch_size?)"),
    ({"grpo": {"generation": {"engine": "hf"}}}, "grpo.generation.engine (did you mean 'sampler'?)"),
    ({"grpo": {"generation": {"num_samples": 1}, "reward": {"functions": ["m:f"]}}},
     "grpo.generation.num_samples=1: the group baseline needs at least 2"),
    ({"grpo": {}}, "grpo.reward: no reward source; set grpo.reward.model"),
])
def test_nested_section_errors_name_the_full_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        build_config("grpo", raw)
    assert needle in str(e.value)


def test_a_key_given_twice_in_a_yaml_config_is_refused(tmp_path):
    """YAML keeps the last of two equal keys silently; a config file names the line instead (as data files do).
    Merge keys (`<<: *defaults`) may still be overridden."""
    from alignkit.config import UniqueKeyLoader

    path = tmp_path / "run.yaml"
    path.write_text("training:\n  learning_rate: 1.0e-5\n  max_steps: 3\n  learning_rate: 2.0e-5\n")
    with pytest.raises(ConfigError) as e:
        load_config("sft", path)
    assert str(e.value) == (f"{path} line 4: the key 'learning_rate' is given twice in one section (first on "
                            "line 2); keep one.")
    merged = yaml.load("base: &base {lr: 1, steps: 3}\nrun:\n  <<: *base\n  steps: 5\n", Loader=UniqueKeyLoader)
    assert merged["run"] == {"lr": 1, "steps": 5}


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_an_eval_split_that_is_neither_a_fraction_nor_a_row_count_is_refused(value):
    """data.eval_split=1.5 held out int(1.5) = 1 row without a word."""
    with pytest.raises(ConfigError, match=rf"data.eval_split={value}: give a fraction below 1 \(e.g. 0.05\) or a "
                                          r"whole number of rows \(e.g. 100\)"):
        build_config("sft", {"data": {"eval_split": value}})
    assert build_config("sft", {"data": {"eval_split": 2}}).data.eval_split == 2


def test_an_output_dir_that_is_a_file_is_refused_before_the_run(tmp_path):
    """A file at training.output_dir (or above it) ended in a FileExistsError / NotADirectoryError traceback."""
    taken = tmp_path / "notes.txt"
    taken.write_text("x")
    for output_dir in (taken, taken / "run"):
        with pytest.raises(ConfigError) as e:
            build_config("sft", {"training": {"output_dir": str(output_dir)}})
        assert str(e.value) == (f"training.output_dir={str(output_dir)!r}: {taken} is a file, not a folder; choose "
                                "another output_dir.")
    assert build_config("sft", {"training": {"output_dir": str(tmp_path / "new" / "run")}})


@pytest.mark.parametrize("method, raw, needle", [
    ("ppo", {"ppo": {"generation": {"sampler": "vllm"}, "reward": {"functions": ["m.py:f"]}}},
     "training.fsdp=full_shard with ppo.generation.sampler=vllm: ppo under FSDP2 would send weight shards"),
    ("grpo", {"model": {"finetune": "lora"},
              "grpo": {"generation": {"sampler": "vllm_server", "vllm_server_urls": ["http://127.0.0.1:1"]},
                       "reward": {"functions": ["m.py:f"]}}},
     "set grpo.generation.vllm_server_lora=false"),
])
def test_fsdp_with_a_vllm_sampler_that_would_send_shards_is_refused(method, raw, needle):
    raw = {**raw, "training": {"fsdp": "full_shard"}}
    with pytest.raises(ConfigError) as e:
        build_config(method, raw)
    assert needle in str(e.value)
    build_config(method, {**raw, "model": {}, method: {**raw[method], "generation": {"sampler": "hf"}}})
