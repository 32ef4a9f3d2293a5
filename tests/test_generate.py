"""alignkit generate: the output file, samples and scores, resume after a crash, refusal of other settings; and
load_inference_model, which chat shares."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import COUNT_E_REWARD

from alignkit.config import ConfigError
from alignkit.errors import AlignkitError
from alignkit.generate import generate, generate_main, load_inference_model
from alignkit.rewards import RewardSourcesConfig
from alignkit.rollout import SamplingConfig

REWARD = COUNT_E_REWARD


@pytest.fixture
def reward_spec(tmp_path) -> str:
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD)
    return f"{path}:count_e"


@pytest.fixture
def prompts(tmp_path) -> Path:
    """Seven prompts, chat and plain text mixed, each with an id column."""
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"what is the cat {i}"}] if i % 2 else f"the dog {i} sat",
             "id": f"q{i}"} for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sampled(**kwargs) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=6, **kwargs)


def test_one_line_per_prompt_in_file_order_with_n_scored_responses(tiny_model_dir, prompts, reward_spec, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = generate(str(tiny_model_dir), str(prompts), out, sampling=sampled(num_samples=3), batch_size=3,
                       reward=RewardSourcesConfig(functions=[reward_spec]), seed=1)
    lines = read_lines(out)
    assert [r["prompt_id"] for r in lines] == list(range(7))
    assert [r["id"] for r in lines] == [f"q{i}" for i in range(7)]  # the file's order and its other columns
    assert lines[1]["prompt"] == [{"role": "user", "content": "what is the cat 1"}] and lines[2]["prompt"] == "the dog 2 sat"
    for r in lines:
        assert set(r) == {"id", "prompt_id", "prompt", "responses", "ended_with_eos", "scores"}
        assert len(r["responses"]) == len(r["ended_with_eos"]) == 3
        assert r["scores"] == [float(text.count("e")) for text in r["responses"]]
    assert len({text for r in lines for text in r["responses"]}) > 7  # sampled: the responses differ
    all_scores = [s for r in lines for s in r["scores"]]
    assert summary == {"out": str(out), "prompts": 7, "responses": 21, "mean_score": sum(all_scores) / 21}


def test_greedy_responses_are_what_transformers_generates_on_the_chat_template(tiny_model_dir, prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out.jsonl"
    generate(str(tiny_model_dir), str(prompts), out, sampling=sampled(do_sample=False), system="be brief")
    lines = read_lines(out)
    assert "scores" not in lines[0]
    tok, model = AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the cat 1"}]
    assert lines[1]["prompt"] == chat  # the system message went into the chat prompts
    plain = tok("the dog 2 sat", return_tensors="pt").input_ids  # plain prompts are continued as they are
    templated = tok(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False, return_tensors="pt").input_ids
    for line, ids in ((lines[1], templated), (lines[2], plain)):
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert line["responses"] == [tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)]


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tiny_model_dir, prompts, reward_spec, tmp_path,
                                                                 monkeypatch):
    from alignkit.rollout import HFSampler
    from alignkit.rollout.resumable import SampleLog

    def run(out: Path) -> dict:
        return generate(str(tiny_model_dir), str(prompts), out, sampling=sampled(num_samples=2), batch_size=2,
                        reward=RewardSourcesConfig(functions=[reward_spec]), seed=3)

    run(tmp_path / "full.jsonl")
    full = read_lines(tmp_path / "full.jsonl")

    # crash while writing the third batch: part of its text reaches the file, it is not committed
    real_append = SampleLog.append

    def crashing_append(self, batch, results):
        if batch == 2:
            text = "".join(json.dumps(r) + "\n" for res in results for r in res.records)
            with open(self.path, "a") as f:
                f.write(text[: len(text) // 2])
            raise KeyboardInterrupt
        real_append(self, batch, results)

    monkeypatch.setattr(SampleLog, "append", crashing_append)
    out = tmp_path / "crash.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run(out)
    assert out.read_text().count("\n") >= 4 and not out.read_text().endswith("\n")  # two batches, part of a third
    monkeypatch.setattr(SampleLog, "append", real_append)

    generated: list[int] = []
    real_generate = HFSampler.generate

    def counting_generate(self, model, prompt_ids, *, seed=None):
        generated.append(len(prompt_ids))
        return real_generate(self, model, prompt_ids, seed=seed)

    monkeypatch.setattr(HFSampler, "generate", counting_generate)
    summary = run(out)
    assert sum(generated) == 7 - 4  # only the prompts of uncommitted batches are sampled again
    assert read_lines(out) == full  # none lost, none twice, and the same samples as without the crash
    assert summary["prompts"] == 7
    generated.clear()
    run(out)  # a finished file: nothing left to do
    assert generated == [] and read_lines(out) == full


def test_other_settings_are_refused_and_overwrite_starts_over(tiny_model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    base = [str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "4"]
    assert generate_main(base + ["--num-samples", "2"]) == 0
    before = out.read_text()
    capsys.readouterr()
    assert generate_main(base + ["--num-samples", "3", "--seed", "1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("alignkit generate: error:")
    err = errors[0]
    assert "generation.num_samples, seed changed" in err and "--overwrite" in err
    assert "training." not in err  # the advice names this command's flags
    assert out.read_text() == before
    assert generate_main(base + ["--num-samples", "3", "--seed", "1", "--overwrite"]) == 0
    assert [len(r["responses"]) for r in read_lines(out)] == [3] * 7


def test_an_unrelated_output_file_is_not_overwritten(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text('{"mine": 1}\n')
    with pytest.raises(AlignkitError, match="not written by alignkit generate"):
        generate(str(tiny_model_dir), str(prompts), out)
    with pytest.raises(ConfigError, match="is the prompt file"):
        generate(str(tiny_model_dir), str(prompts), prompts, overwrite=True)
    assert out.read_text() == '{"mine": 1}\n'


def test_alpaca_prompts_and_argument_errors(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "name a colour", "input": "", "output": "red"},
                                {"instruction": "add", "input": "two and three", "output": "five"}]))
    out = tmp_path / "out.jsonl"
    assert generate_main([str(tiny_model_dir), "--prompts", str(path), "--out", str(out), "--greedy",
                          "--max-new-tokens", "4"]) == 0
    lines = read_lines(out)
    assert [r["prompt"][-1]["role"] for r in lines] == ["user", "user"]  # alpaca rows become chat prompts
    assert "name a colour" in lines[0]["prompt"][-1]["content"] and "output" not in lines[0]
    assert "2 prompts x 1 responses" in capsys.readouterr().out
    assert generate_main([str(tiny_model_dir), "--prompts", str(path), "--out", str(tmp_path / "b.jsonl"),
                          "--greedy", "--num-samples", "2"]) == 2
    assert "identical responses" in capsys.readouterr().err
    assert generate_main([str(tiny_model_dir), "--out", str(out)]) == 2  # --prompts is required


def test_a_reward_function_whose_column_the_prompts_lack_is_refused_before_the_model_loads(tmp_path, capsys,
                                                                                           monkeypatch):
    """The docs' `--prompts alpaca-demo --reward-function my_rewards.py:accuracy` stopped at the first rollout
    with a TypeError; now one line names the function, the column and the file, before any model loads."""
    import alignkit.generate as generate_module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the columns were checked")

    monkeypatch.setattr(generate_module, "load_inference_model", no_model)
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def accuracy(prompts, completions, answer, **_):\n"
                       "    return [float(a in c) for a, c in zip(answer, completions)]\n")
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "add", "input": "two and three", "output": "five"}]))
    assert generate_main(["some-model", "--prompts", str(path), "--out", str(tmp_path / "o.jsonl"),
                          "--reward-function", f"{rewards}:accuracy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"alignkit generate: error: reward.functions: {rewards}:accuracy needs the column 'answer' (a "
                   f"parameter of accuracy without a default), which the rows of {path} do not have (their columns "
                   "besides the prompt: none); add the column to the data, or give the parameter a default.")


@pytest.mark.parametrize("content, expected", [
    ('{"question": "hi"}\n', "rename the fields in the prompt file (question -> prompt)."),
    ('{"prompt": "hi"}\n{"prompt": ""}\n', "line 2, field 'prompt': empty. Fill it in or drop the row."),
    ('{"prompt": "hi"}\n{"prompt": \n', "Fix or remove this line (each line must be one complete JSON object)."),
    ('{"prompt": "hi"}\n{"prompt": "\xff"}\n', "if it is Latin-1."),
])
def test_prompt_file_errors_suggest_no_option_generate_lacks(tiny_model_dir, tmp_path, capsys, content, expected):
    """The data layer's advice names data.on_bad_row and `columns:`, settings of training configs; generate
    reads the file as it is."""
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content.encode("latin-1") if "\xff" in content else content.encode())
    assert generate_main([str(tiny_model_dir), "--prompts", str(path), "--out", str(tmp_path / "o.jsonl")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"alignkit generate: error: {path}"), errors
    assert errors[0].endswith(expected) and "on_bad_row" not in errors[0] and "columns:" not in errors[0], errors


# -- load_inference_model --------------------------------------------------------------------------


def test_loads_a_training_output_folder_without_final_model_from_its_latest_checkpoint(tmp_path, caplog,
                                                                                         monkeypatch):
    from alignkit.testing import save_tiny_llama
    from alignkit.training.checkpoint import STATE_FILE

    run = tmp_path / "run"
    for step in (2, 10, 4):  # by step number, not by name
        save_tiny_llama(run / f"checkpoint-{step}", seed=step)
        (run / f"checkpoint-{step}" / STATE_FILE).write_text("{}")
    save_tiny_llama(run / "checkpoint-12", seed=12)  # no state file: an unfinished checkpoint
    monkeypatch.setattr(logging.getLogger("alignkit"), "propagate", True)
    loaded = load_inference_model(str(run))
    assert "using its latest checkpoint, checkpoint-10" in caplog.text
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(run / "checkpoint-10").state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())
    assert not loaded.model.training and loaded.name == str(run)


def test_loads_an_adapter_whose_folder_has_no_tokenizer(tiny_model_dir, tmp_path):
    from alignkit.config import ModelConfig
    from alignkit.models import load_model, load_tokenizer, save_model

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", finetune="lora", lora_r=4)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    save_model(model, None, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "tokenizer_config.json").exists()
    loaded = load_inference_model(str(tmp_path / "adapter"))
    assert loaded.source == str(tiny_model_dir) and "LoRA" in loaded.description
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())  # merged
    ids = torch.tensor([tok("the cat sat").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_reward_model_adapter_or_a_broken_adapter_is_refused(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x",
                                                                     "task_type": "SEQ_CLS"}))
    with pytest.raises(AlignkitError, match="SEQ_CLS adapter"):
        load_inference_model(str(tmp_path / "cls"))
    (tmp_path / "lost").mkdir()
    (tmp_path / "lost" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "./gone/base"}))
    with pytest.raises(AlignkitError, match="its base model './gone/base' cannot be loaded"):
        load_inference_model(str(tmp_path / "lost"))


def test_vllm_server_sampler_sends_the_model_once_and_writes_the_servers_samples(tiny_model_dir, prompts, tmp_path):
    """--sampler vllm_server against a loopback fake of a vLLM server: MODEL's weights go to it once (not per
    batch), every prompt is one seeded request for --num-samples samples, and its tokens are the responses."""
    from rollout.test_vllm_server_http import FakeVLLM, healthy_routes
    from safetensors.torch import load_file

    from alignkit.testing import tiny_tokenizer

    cat = tiny_tokenizer()("the cat sat", add_special_tokens=False)["input_ids"]
    loaded = []
    fake = FakeVLLM({**healthy_routes(tiny_model_dir, loaded=loaded),
                     "/v1/completions": lambda body: {"choices": [{"index": j, "token_ids": cat + [2]}
                                                                  for j in range(body["n"])]}})
    out = tmp_path / "out.jsonl"
    try:
        code = generate_main([str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--num-samples", "2",
                              "--batch-size", "3", "--sampler", "vllm_server", "--vllm-server-url", fake.url])
    finally:
        fake.close()
    assert code == 0
    lines = read_lines(out)
    assert [line["id"] for line in lines] == [f"q{i}" for i in range(7)]
    assert all(line["responses"] == ["the cat sat"] * 2 and line["ended_with_eos"] == [True, True] for line in lines)
    requests = [body for path, body in fake.requests if path == "/v1/completions"]
    assert len(requests) == 7 and all(r["n"] == 2 and "seed" in r for r in requests)
    assert len(loaded) == 1  # three batches, one weight sync: the model does not change
    weights = load_file(tiny_model_dir / "model.safetensors")
    assert set(loaded[0]) == set(weights) and all(torch.equal(loaded[0][k], weights[k]) for k in weights)


def test_vllm_server_flags_without_that_sampler_are_one_line(tiny_model_dir, prompts, tmp_path, capsys):
    code = generate_main([str(tiny_model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                          "--vllm-server-url", "http://127.0.0.1:8000"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "alignkit generate: error: --vllm-server-url is for --sampler vllm_server (this run uses --sampler hf): add "
        "--sampler vllm_server or drop it."]
    # the sampler's advice names the flags, not the generation.* keys of a training config
    from alignkit.launch import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    code = generate_main([str(tiny_model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                          "--sampler", "vllm_server", "--vllm-server-url", url])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("alignkit generate: error:")]
    assert code == 2 and len(err) == 1 and "the host and port in --vllm-server-url." in err[0], err
