"""Reward sources, their combination and post-processing."""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.rewards import (
    CombinedReward,
    FunctionReward,
    HTTPReward,
    RewardError,
    RewardInputs,
    RewardModelScorer,
    RewardSourcesConfig,
    RunningMoments,
    batch_normalize,
    build_reward,
    clip_rewards,
    eos_penalty,
    target_token_share,
)
from alignkit.rollout import build_rollout

PROMPTS = ["what is the capital of france", "tell me about the big dog", "one two three"]
ANSWERS = ["paris is the answer", "the dog is happy and very big", "four five"]


@pytest.fixture(scope="module")
def tok():
    from alignkit.testing import tiny_tokenizer

    return tiny_tokenizer()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_rollout(tok, ended=(True, False, True), k: int = 1):
    """A rollout as the engine would return it: chat prompts, responses (+ eos where ended)."""
    prompts = [encode(tok, tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True)) for p in PROMPTS]
    responses = [encode(tok, a) + ([tok.eos_token_id] if e else []) for a, e in zip(ANSWERS, ended)]
    index = torch.arange(len(prompts)).repeat_interleave(k)
    return build_rollout([prompts[i] for i in index], [responses[i] for i in index], index,
                         [tok.eos_token_id], tok.pad_token_id, tok)


def rows(extra: bool = True):
    return [{"prompt": p, "prompt_ids": [0], **({"answer": a} if extra else {})} for p, a in zip(PROMPTS, ANSWERS)]


# --------------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from alignkit.testing import save_tiny_bert_classifier

    return save_tiny_bert_classifier(tmp_path_factory.mktemp("tiny-bert-rm"))


def test_reward_model_with_another_tokenizer_scores_the_decoded_text(tok, bert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rollout = make_rollout(tok)
    scorer = RewardModelScorer.from_pretrained(str(bert_dir), tok, batch_size=2)
    assert not scorer.reuse_ids
    inputs = RewardInputs.from_rollout(rollout, rows())
    assert inputs.completions == ANSWERS  # decoded without the eos token
    scores = scorer(inputs)

    # the BERT called directly on the decoded texts, as a (prompt, completion) pair
    bert = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    bert_tok = AutoTokenizer.from_pretrained(bert_dir)
    for i, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
        encoded = bert_tok(prompt, answer, return_tensors="pt")
        assert scorer.tokenize(inputs)[i] == encoded["input_ids"][0].tolist()  # [CLS] prompt [SEP] answer [SEP]
        assert bert_tok.unk_token_id not in encoded["input_ids"][0].tolist()
        with torch.no_grad():
            expected = bert(**encoded).logits[0, 0]
        assert torch.allclose(scores[i], expected, atol=1e-6), (i, scores[i], expected)
    assert len(set(scores.tolist())) == 3


def test_reward_model_input_is_framed_and_truncated_as_in_rm_training(tok, bert_dir):
    from alignkit.methods.reward_model import RewardMethod
    from alignkit.rewards import RewardModelFraming

    scorer = RewardModelScorer.from_pretrained(str(bert_dir), tok, max_length=6)
    inputs = RewardInputs.from_rollout(make_rollout(tok), rows())
    rm_tok = scorer.tokenizer
    trainer = RewardMethod("pairwise", RewardModelFraming.for_tokenizer(rm_tok, max_length=6))
    for got, prompt, answer in zip(scorer.tokenize(inputs), PROMPTS, ANSWERS):
        assert got == trainer.framing.sequence(encode(rm_tok, prompt), encode(rm_tok, answer))[0]
        assert len(got) <= 6
    cls, sep = rm_tok.cls_token_id, rm_tok.sep_token_id
    three, four_five = encode(rm_tok, "three"), encode(rm_tok, "four five")
    assert scorer.tokenize(inputs)[2] == [cls] + three + [sep] + four_five + [sep]  # the prompt lost its start


def test_reward_model_normalisation_uses_the_stats_in_its_config(tok, bert_dir, tmp_path):
    from transformers import AutoConfig

    with pytest.raises(ConfigError, match="alignkit_reward_mean"):
        RewardModelScorer.from_pretrained(str(bert_dir), tok, normalize=True)
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(bert_dir, rm)
    config = AutoConfig.from_pretrained(rm)
    config.alignkit_reward_mean, config.alignkit_reward_std = 0.25, 2.0
    config.save_pretrained(rm)
    inputs = RewardInputs.from_rollout(make_rollout(tok), rows())
    raw = RewardModelScorer.from_pretrained(str(rm), tok)(inputs)
    normalized = RewardModelScorer.from_pretrained(str(rm), tok, normalize=True)(inputs)
    assert torch.allclose(normalized, (raw - 0.25) / 2.0)


@pytest.fixture(scope="module")
def llama_rm(tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    return LlamaForSequenceClassification(config).eval()


def test_reward_model_with_the_policy_tokenizer_reuses_the_ids(tok, llama_rm, monkeypatch):
    from alignkit.testing import tiny_tokenizer

    rollout = make_rollout(tok)
    scorer = RewardModelScorer(llama_rm, tiny_tokenizer(), tok)  # an equal tokenizer, not the same object
    assert scorer.reuse_ids
    monkeypatch.setattr(tok, "batch_decode", lambda *_, **__: pytest.fail("decoded"))
    monkeypatch.setattr("alignkit.data.tokenize.tokenize_example", lambda *_, **__: pytest.fail("re-tokenized"))
    scores = scorer(RewardInputs.from_rollout(rollout, rows()))
    for i in range(len(rollout)):
        real = torch.cat([rollout.prompt_ids[i][rollout.prompt_mask[i].bool()],
                          rollout.response_ids[i][rollout.response_mask[i].bool()]])
        with torch.no_grad():
            expected = llama_rm(input_ids=real[None]).logits[0, 0]
        assert torch.allclose(scores[i], expected, atol=1e-5)


def test_reward_model_with_its_own_chat_template_renders_messages(tok, llama_rm):
    from alignkit.testing import tiny_tokenizer

    rm_tok = tiny_tokenizer()
    rm_tok.chat_template = rm_tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    scorer = RewardModelScorer(llama_rm, rm_tok, tok)
    assert not scorer.reuse_ids
    inputs = RewardInputs.from_rollout(make_rollout(tok), rows())
    text = rm_tok.decode(scorer.tokenize(inputs)[0])
    assert text == f"<|im_start|> user\n{PROMPTS[0]}<|im_end|>\n<|im_start|> assistant\n{ANSWERS[0]}<|im_end|>"


# --------------------------------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------------------------------

REWARD_MODULE = '''
def length(prompts, completions, **fields):
    return [float(len(c.split())) for c in completions]

def exact(prompts, completions, answer):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

def too_few(prompts, completions, **fields):
    return [1.0]

def not_finite(prompts, completions, **fields):
    return [float("nan")] * len(completions)
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    path = tmp_path / "my_reward_fns.py"
    path.write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield path
    sys.modules.pop("my_reward_fns", None)


def test_function_reward_from_module_and_from_file(tok, reward_module):
    inputs = RewardInputs.from_rollout(make_rollout(tok), rows())
    by_module = FunctionReward("my_reward_fns:length")
    by_file = FunctionReward(f"{reward_module}:length")
    assert by_module(inputs).tolist() == [4.0, 7.0, 2.0] == by_file(inputs).tolist()
    assert by_module.name == "length"


def test_function_reward_gets_the_row_fields_it_names(tok, reward_module):
    inputs = RewardInputs.from_rollout(make_rollout(tok, k=2), [{**r, "answer": a} for r, a in
                                                               zip(rows(), [ANSWERS[0], "no", ANSWERS[2]])])
    assert FunctionReward("my_reward_fns:exact")(inputs).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_function_reward_errors_name_the_function(tok, reward_module):
    inputs = RewardInputs.from_rollout(make_rollout(tok), rows())
    with pytest.raises(RewardError, match=r"my_reward_fns:too_few returned 1 values for 3 completions"):
        FunctionReward("my_reward_fns:too_few")(inputs)
    with pytest.raises(RewardError, match=r"my_reward_fns:not_finite returned non-finite"):
        FunctionReward("my_reward_fns:not_finite")(inputs)
    with pytest.raises(ConfigError, match="no function 'missing'"):
        FunctionReward("my_reward_fns:missing")
    with pytest.raises(ConfigError, match="module:function"):
        FunctionReward("my_reward_fns.length")
    with pytest.raises(ConfigError, match="no such file"):
        FunctionReward("nowhere/rewards.py:length")


def test_the_columns_a_reward_function_needs_are_checked_against_the_data(reward_module):
    """A function whose column the data lacks is refused up front in one line (not a TypeError at the first
    rollout); keyword-only and defaulted parameters, **kwargs and the first two arguments are handled."""
    from alignkit.rewards import RewardSourcesConfig
    from alignkit.rewards.functions import required_columns

    def fn(prompts, completions, *, level, hint=None, **rest):
        return []

    assert required_columns(fn) == ["level"]
    assert required_columns(lambda p, c, answer, weight=1.0, **kw: []) == ["answer"]
    cfg = RewardSourcesConfig(functions=["my_reward_fns:length", "my_reward_fns:exact"])
    cfg.check_columns([{"prompt": "a", "answer": "x"}, {"prompt": "b", "answer": "y"}], "d.jsonl")
    with pytest.raises(ConfigError) as e:
        cfg.check_columns([{"prompt": "a", "question": "x", "prompt_ids": [1]}], "data.train (d.jsonl)",
                          section="grpo.reward")
    assert str(e.value) == (
        "grpo.reward.functions: my_reward_fns:exact needs the column 'answer' (a parameter of exact without a "
        "default), which the rows of data.train (d.jsonl) do not have (their columns besides the prompt: "
        "question); add the column to the data, or give the parameter a default.")
    with pytest.raises(ConfigError, match=r"which 1 of the 2 rows of d.jsonl lack"):
        cfg.check_columns([{"prompt": "a", "answer": "x"}, {"prompt": "b"}], "d.jsonl")


def test_the_answer_column_is_checked_against_the_data():
    """reward.answer's reference column is checked before models load, like a reward function's."""
    from alignkit.rewards import RewardSourcesConfig

    cfg = RewardSourcesConfig(answer="exact", answer_column="solution")
    cfg.check_columns([{"prompt": "a", "solution": "4"}], "d.jsonl")
    with pytest.raises(ConfigError, match=r"^grpo.reward.answer=exact needs the column 'solution', which 1 of the "
                                          r"2 rows of d.jsonl lack \(their columns besides the prompt: answer, "
                                          r"solution\); .* set grpo.reward.answer_column"):
        cfg.check_columns([{"prompt": "a", "solution": "4"}, {"prompt": "b", "answer": "5"}], "d.jsonl",
                          section="grpo.reward")


def test_builtin_example_rewards():
    assert target_token_share([""] * 3, ["good good bad", "Good!", ""]) == [2 / 3, 1.0, 0.0]
    assert target_token_share([""], ["a cat"], target="cat") == [0.5]


# --------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        server = self.server
        server.requests += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.bodies.append(body)
        if server.fail_first > 0:
            server.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        if server.status != 200:
            self.send_response(server.status)
            self.end_headers()
            self.wfile.write(b"bad request: no prompts")
            return
        rewards = [float(len(c)) for c in body["completions"]]
        data = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def no_proxy(monkeypatch):
    """A proxy configured in the environment must not intercept 127.0.0.1."""
    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(key, "127.0.0.1,localhost")


@pytest.fixture
def server(no_proxy):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.bodies, srv.fail_first, srv.status = 0, [], 0, 200
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/score"


def test_http_reward_posts_prompts_completions_and_row_fields(tok, server):
    inputs = RewardInputs.from_rollout(make_rollout(tok), rows())
    scores = HTTPReward(_url(server), timeout=5)(inputs)
    assert scores.tolist() == [float(len(a)) for a in ANSWERS]
    body = server.bodies[0]
    assert body["prompts"] == PROMPTS and body["completions"] == ANSWERS and body["answer"] == ANSWERS


def test_http_reward_retries_server_errors(tok, server):
    server.fail_first = 2
    inputs = RewardInputs.from_rollout(make_rollout(tok), rows())
    scores = HTTPReward(_url(server), timeout=5, retries=3, backoff=0.01)(inputs)
    assert server.requests == 3 and scores.tolist() == [float(len(a)) for a in ANSWERS]


def test_http_reward_does_not_retry_client_errors(tok, server):
    server.status = 400
    inputs = RewardInputs.from_rollout(make_rollout(tok), rows())
    with pytest.raises(RewardError, match="HTTP 400 bad request"):
        HTTPReward(_url(server), timeout=5, retries=3, backoff=0.01)(inputs)
    assert server.requests == 1


def test_http_reward_names_the_url_when_the_server_is_down(tok, no_proxy):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    inputs = RewardInputs.from_rollout(make_rollout(tok), rows())
    with pytest.raises(RewardError, match=rf"reward server {url} is not reachable after 2 attempts"):
        HTTPReward(url, timeout=2, retries=1, backoff=0.01)(inputs)


# --------------------------------------------------------------------------------------------------
# Combination and post-processing
# --------------------------------------------------------------------------------------------------


def _const(value):
    def const(prompts, completions, **_):
        return [value] * len(completions)

    return const


def test_combined_reward_weights_and_keeps_raw_scores(tok):
    rollout = make_rollout(tok)
    share = FunctionReward(lambda p, c, **_: target_token_share(p, c, target="the"), name="share")
    combined = CombinedReward([("const", FunctionReward(_const(1.0)), 2.0), ("share", share, -1.0),
                               ("const", FunctionReward(_const(3.0)), 0.5)])
    result = combined(rollout, rows())
    raw_share = torch.tensor(target_token_share(PROMPTS, ANSWERS, target="the"))
    assert torch.allclose(result.raw["share"], raw_share)
    assert result.raw["const"].tolist() == [1.0] * 3 and result.raw["const_2"].tolist() == [3.0] * 3
    assert torch.allclose(result.rewards, 2.0 + 1.5 - raw_share)
    metrics = result.metrics()
    assert set(metrics) >= {"reward/const", "reward/share", "reward/const_2", "reward/combined", "reward/final"}
    assert math.isclose(metrics["reward/share"], float(raw_share.mean()), rel_tol=1e-6)


def test_missing_eos_penalty_hits_truncated_responses_only(tok):
    rollout = make_rollout(tok, ended=(True, False, True))
    result = CombinedReward([("c", FunctionReward(_const(1.0)), 1.0)], missing_eos_penalty=0.5)(rollout, rows())
    assert result.rewards.tolist() == [1.0, 0.5, 1.0]
    assert result.combined.tolist() == [1.0, 1.0, 1.0]
    assert eos_penalty(torch.zeros(2), torch.tensor([False, True]), 2.0).tolist() == [-2.0, 0.0]


def test_clipping_and_normalisation(tok):
    assert clip_rewards(torch.tensor([-2.0, 0.5, 5.0]), 1.0).tolist() == [-1.0, 0.5, 1.0]
    assert clip_rewards(torch.tensor([-2.0, 5.0]), None).tolist() == [-2.0, 5.0]
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    z = batch_normalize(x)
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std()) - 1) < 1e-6

    rollout = make_rollout(tok)
    length = FunctionReward(lambda p, c, **_: [float(len(s)) for s in c], name="len")
    result = CombinedReward([("len", length, 1.0)], normalize="batch", clip=1.0)(rollout, rows())
    expected = batch_normalize(torch.tensor([float(len(a)) for a in ANSWERS])).clamp(-1, 1)
    assert torch.allclose(result.rewards, expected)


def test_running_normalisation_accumulates_and_resumes():
    moments = RunningMoments()
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])
    moments.update(a)
    moments.update(b)
    both = torch.cat([a, b]).double()
    assert math.isclose(moments.mean, float(both.mean())) and math.isclose(moments.std, float(both.std()))
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert torch.allclose(restored.normalize(b), moments.normalize(b))


def test_reward_config_validation_and_build(tok, bert_dir):
    with pytest.raises(ConfigError, match=r"grpo.reward: no reward source"):
        RewardSourcesConfig().check("grpo.reward")
    with pytest.raises(ConfigError, match=r"reward.function_weights has 1 weights for 2"):
        RewardSourcesConfig(functions=["a:b", "c:d"], function_weights=[1.0]).check()
    with pytest.raises(ConfigError, match=r"missing_eos_penalty=-1.0"):
        RewardSourcesConfig(url="http://x", missing_eos_penalty=-1.0).check()
    with pytest.raises(ConfigError, match=r"reward.normalize='whiten'"):
        RewardSourcesConfig(url="http://x", normalize="whiten").check()

    cfg = RewardSourcesConfig(model=str(bert_dir), model_weight=0.5,
                              functions=["alignkit.rewards:target_token_share"], function_weights=[2.0])
    reward = build_reward(cfg, tok, "cpu")
    assert [name for name, _, _ in reward.sources] == ["reward_model", "target_token_share"]
    result = reward(make_rollout(tok), rows())
    expected = 0.5 * result.raw["reward_model"] + 2.0 * torch.tensor(target_token_share(PROMPTS, ANSWERS))
    assert torch.allclose(result.rewards, expected)


def test_prompts_are_decoded_when_no_rows_are_given(tok):
    inputs = RewardInputs.from_rollout(make_rollout(tok), tokenizer=tok)
    assert inputs.prompts[0] == f"user\n{PROMPTS[0]}\nassistant\n"
    with pytest.raises(ValueError, match="2 rows for a rollout of 3 prompts"):
        RewardInputs.from_rollout(make_rollout(tok), rows()[:2])


@pytest.mark.parametrize("method", ["grpo", "ppo", "rejection_sampling"])
def test_training_refuses_a_reward_function_whose_column_the_data_lacks_before_models_load(
        tmp_path, tiny_model_dir, reward_module, monkeypatch, method):
    import importlib

    import alignkit

    module = importlib.import_module(f"alignkit.methods.{'online_rl' if method in ('grpo', 'ppo') else method}")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the reward columns were checked")

    monkeypatch.setattr(module, "load_model", no_model)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "question": "q"}) + "\n" for i in range(8)))
    with pytest.raises(ConfigError, match=rf"^{method}\.reward\.functions: my_reward_fns:exact needs the column "
                                          r"'answer' .* which the rows of data\.train \(.*prompts\.jsonl\) do not "
                                          r"have \(their columns besides the prompt: question\)"):
        alignkit.train(method, model={"name_or_path": str(tiny_model_dir)}, data={"train": [str(data)]},
                       training={"output_dir": str(tmp_path / "out"), "report_to": []},
                       **{method: {"reward": {"functions": ["my_reward_fns:exact"]}}})
