"""Multi-turn rollouts on the tiny Llama: token-in/token-out exactness, masks, limits, tool calls, timeouts."""

from __future__ import annotations

import time

import pytest
import torch

from alignkit.config import ConfigError
from alignkit.forward import response_forward
from alignkit.rollout import RolloutBatch, SamplingConfig
from alignkit.rollout.environment import (
    AgentEnvironmentError,
    StepResult,
    ToolEnvironment,
    load_environment,
    parse_assistant_turn,
)
from alignkit.rollout.multiturn import EnvironmentConfig, MultiTurnSampler, environment_tokens


@pytest.fixture(scope="module")
def tok():
    from alignkit.testing import tiny_tokenizer

    return tiny_tokenizer()


def ending_model(tok, alpha: float = 0.9):
    """The tiny Llama with its eos row pointing along the mean final hidden state, so a turn ends after a
    handful of tokens (a random model almost never samples eos)."""
    from alignkit.testing import tiny_llama

    model = tiny_llama(tok).eval()
    ids = tok("<|im_start|>user\nthe cat sat on the mat<|im_end|>\n<|im_start|>assistant\nhello world the dog",
              return_tensors="pt").input_ids
    with torch.no_grad():
        mean = model.model(ids).last_hidden_state[0].mean(0)
        model.lm_head.weight[tok.eos_token_id] = alpha * mean / mean.norm()
    return model


class Echo:
    """Answers every turn with a tool message; done after ``turns`` turns with reward 1."""

    tools = None

    def __init__(self, turns: int = 3, delay: float = 0.0):
        self.turns, self.delay, self.seen = turns, delay, 0

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, message):
        time.sleep(self.delay)
        self.seen += 1
        if self.seen >= self.turns:
            return StepResult(reward=1.0, done=True)
        return StepResult([{"role": "tool", "content": f"result {self.seen} for the cat"}], reward=0.25)


def sampler(tok, factory, *, max_turns=3, max_new_tokens=24, budget=1024, timeout=60.0, **kw) -> MultiTurnSampler:
    return MultiTurnSampler(tok, SamplingConfig(max_new_tokens=max_new_tokens, **kw),
                            EnvironmentConfig(max_turns=max_turns, max_episode_tokens=budget, timeout_s=timeout),
                            factory=factory)


def test_trainer_logps_equal_sampler_logps_on_every_assistant_token_of_3_turn_episodes(tok):
    torch.set_default_dtype(torch.float32)
    model = ending_model(tok)
    rows = [{"prompt": "the cat sat on the mat"}, {"prompt": "what is the capital of france"}]
    rollout = sampler(tok, lambda row: Echo(3), num_samples=2).generate_episodes(model, rows, seed=3, logps=True)
    ep = rollout.episodes
    three = [i for i, s in enumerate(ep.stop) if s == "done" and int(ep.turns[i]) == 3]
    assert three, f"no 3-turn episode: {ep.stop} {ep.turns}"
    batch = RolloutBatch.from_rollout(rollout)
    with torch.no_grad():
        trainer = response_forward(model, batch, 1.0).logps
    action = rollout.action_mask.bool()
    env = rollout.response_mask.bool() & ~action
    for i in three:  # assistant tokens of all 3 turns, environment tokens in between
        assert int(action[i].sum()) >= 3 and int(env[i].sum()) > 0
        torch.testing.assert_close(trainer[i][action[i]], rollout.sampler_logps[i][action[i]], atol=2e-5, rtol=0)
    assert float(rollout.sampler_logps[env].abs().sum()) == 0
    assert float(ep.rewards[three[0]]) == pytest.approx(1.5)  # 0.25 + 0.25 + 1


def test_environment_tokens_are_the_templates_text_and_sampled_tokens_are_kept(tok):
    model = ending_model(tok)
    rollout = sampler(tok, lambda row: Echo(3)).generate_episodes(model, [{"prompt": "the cat sat"}], seed=3)
    ep = rollout.episodes
    assert int(ep.turns[0]) >= 2
    tokens = rollout.response_ids[0][rollout.response_mask[0].bool()].tolist()
    action = rollout.action_mask[0][rollout.response_mask[0].bool()].tolist()
    # the first environment block is exactly the template's text after the assistant's end of turn
    start = action.index(0)
    end = start + action[start:].index(1)
    expected = tok("\n<|im_start|>tool\nresult 1 for the cat<|im_end|>\n<|im_start|>assistant\n",
                   add_special_tokens=False)["input_ids"]
    assert tokens[start:end] == expected
    assert tokens[start - 1] == tok.eos_token_id  # the sampled turn ends with its own eos token


def test_environment_tokens_from_the_chat_template(tok):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids = environment_tokens(tok, conv, [{"role": "tool", "content": "42"}], None, "<|im_end|>")
    assert tok.decode(ids) == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


def test_token_budget_and_max_turns_stop_episodes_and_are_counted(tok):
    model = ending_model(tok)
    rows = [{"prompt": "the cat sat"}]
    out = sampler(tok, lambda row: Echo(10), max_turns=2, num_samples=4).generate_episodes(model, rows, seed=1)
    assert set(out.episodes.stop) <= {"max_turns", "no_eos"} and "max_turns" in out.episodes.stop
    assert int(out.episodes.turns.max()) == 2
    small = sampler(tok, lambda row: Echo(10), max_turns=8, budget=20, num_samples=4).generate_episodes(
        model, rows, seed=1)
    assert "token_budget" in small.episodes.stop
    assert int(small.response_mask.sum(1).max()) <= 20
    metrics = small.episodes.metrics()
    assert metrics["env/stop_token_budget"][0] == small.episodes.stop.count("token_budget")


def test_environment_timeout_stops_the_episode(tok):
    model = ending_model(tok)
    out = sampler(tok, lambda row: Echo(3, delay=0.5), timeout=0.2).generate_episodes(
        model, [{"prompt": "the cat"}], seed=3)
    assert out.episodes.stop == ["timeout"] and int(out.episodes.turns[0]) == 1


STUCK = """
import threading, time
from alignkit.rollout import SamplingConfig
from alignkit.rollout.multiturn import EnvironmentConfig, MultiTurnSampler
from alignkit.testing import tiny_llama, tiny_tokenizer


class Stuck:
    tools = None

    def __init__(self, where):
        self.where = where

    def reset(self, row):
        if self.where == "reset":
            threading.Event().wait()  # never returns (a dead connection, a deadlock)

    def step(self, message):
        threading.Event().wait()


tok = tiny_tokenizer()
sampler = MultiTurnSampler(tok, SamplingConfig(max_new_tokens=4), EnvironmentConfig(timeout_s=0.5),
                           factory=lambda row: Stuck(row["stuck"]))
start = time.perf_counter()
out = sampler.generate_episodes(tiny_llama(tok).eval(), [{"prompt": "the cat", "stuck": "reset"},
                                                         {"prompt": "the dog", "stuck": "step"}], seed=0)
print(out.episodes.stop, out.episodes.turns.tolist(), out.response_lengths.tolist()[0],
      out.episodes.metrics()["env/stop_timeout"], time.perf_counter() - start < 30, flush=True)
"""


def test_environment_calls_that_never_return_time_out_and_the_process_still_exits(tmp_path):
    """A stuck reset or step ends its episode at timeout_s (stop=timeout, counted); the thread left waiting
    does not keep the process from exiting (a thread pool's workers are joined at exit: it hung there)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['timeout', 'timeout'] [0, 1] 0 (2.0, 2.0) True"


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def test_tool_calls_are_parsed_and_malformed_ones_answered_and_counted(tok):
    tools = ToolEnvironment([add], reward=lambda row, msgs: 1.0).tools
    ok = parse_assistant_turn(tok, 'sure <tool_call>{"name": "add", "arguments": {"a": "2", "b": 3}}</tool_call>',
                              tools)
    assert ok["tool_calls"] == [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
    assert ok["content"] == "sure"
    bad = parse_assistant_turn(tok, '<tool_call>{"name": add}</tool_call>', tools)
    assert "tool_calls" not in bad and bad["tool_call_error"].startswith("malformed tool call")
    assert parse_assistant_turn(tok, "just text", tools) == {"role": "assistant", "content": "just text"}
    # a JSON list of calls in one tag (smol-tools' prompt for SmolLM2) is several calls
    two = parse_assistant_turn(tok, '<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                                    '{"name": "add", "arguments": {"a": 3, "b": 4}}]</tool_call>', tools)
    assert [c["function"]["arguments"] for c in two["tool_calls"]] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]

    env = ToolEnvironment([add], reward=lambda row, msgs: float(msgs[-1]["content"] == "5"))
    env.reset({"prompt": "2+3?"})
    assert env.step(ok).messages == [{"role": "tool", "name": "add", "content": "5"}]
    err = env.step(bad)
    assert err.info["tool_errors"] == 1 and err.messages[0]["content"].startswith("error: malformed tool call")
    unknown = env.step({"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "mul", "arguments": {}}}]})
    assert unknown.info["tool_errors"] == 1 and "no tool named 'mul'" in unknown.messages[0]["content"]
    raised = env.step({"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]})
    assert raised.info["tool_errors"] == 1 and raised.messages[0]["content"].startswith("error: TypeError")
    final = env.step({"role": "assistant", "content": "5"})
    assert final.done and final.reward == 1.0


def test_environment_factory_from_a_file(tok, tmp_path):
    path = tmp_path / "my_env.py"
    path.write_text(
        "from alignkit.rollout.environment import ToolEnvironment\n"
        "def add(a: int, b: int) -> int:\n"
        "    \"\"\"Add.\n\n    Args:\n        a: first\n        b: second\n    \"\"\"\n"
        "    return a + b\n"
        "def make_env(row):\n"
        "    return ToolEnvironment([add], reward=lambda row, msgs: 1.0)\n"
        "def not_an_env(row):\n"
        "    return 3\n")
    factory = load_environment(f"{path}:make_env")
    assert factory({}).tools[0]["function"]["name"] == "add"
    with pytest.raises(AgentEnvironmentError, match="no function 'missing'"):
        load_environment(f"{path}:missing")
    model = ending_model(tok)
    bad = MultiTurnSampler(tok, SamplingConfig(max_new_tokens=4), EnvironmentConfig(factory=f"{path}:not_an_env"))
    with pytest.raises(AgentEnvironmentError, match="has no reset"):
        bad.generate_episodes(model, [{"prompt": "hi"}])
    with pytest.raises(ConfigError, match="environment.max_turns"):
        EnvironmentConfig(max_turns=0).check()


def test_a_tool_call_episode_through_the_sampler(tok, monkeypatch):
    """Scripted turns (a tool call, then the answer): the call is parsed, the tool runs, its result is appended as
    template tokens, the answer ends the episode with the reward function's score; a malformed call is answered
    and counted."""
    from alignkit.rollout import HFSampler, build_rollout

    turns = iter([
        ['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>', '<tool_call>{"name": add}</tool_call>'],
        ["5", "5"],
    ])

    def scripted(self, model, prompts, *, seed=None, logps=False):
        texts = next(turns)
        responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        return build_rollout(prompts, responses, torch.arange(len(prompts)), [tok.eos_token_id], tok.eos_token_id,
                             tok, logps=[[-0.5] * len(r) for r in responses] if logps else None)

    monkeypatch.setattr(HFSampler, "generate", scripted)
    make = lambda row: ToolEnvironment([add], reward=lambda row, msgs: float(msgs[-1]["content"] == "5"))  # noqa: E731
    model = ending_model(tok)
    out = sampler(tok, make, num_samples=2, max_new_tokens=64).generate_episodes(
        model, [{"prompt": "what is 2 + 3?"}], logps=True)
    ep = out.episodes
    assert ep.stop == ["done", "done"] and ep.turns.tolist() == [2, 2]
    assert ep.rewards.tolist() == [1.0, 1.0]
    assert ep.tool_calls.tolist() == [1, 0] and ep.tool_errors.tolist() == [0, 1]
    assert ep.messages[0][2] == {"role": "tool", "name": "add", "content": "5"}
    assert ep.messages[1][2]["content"].startswith("error: malformed tool call")
    tokens = out.response_ids[0][out.response_mask[0].bool()].tolist()
    action = out.action_mask[0][out.response_mask[0].bool()].tolist()
    env_ids = [t for t, a in zip(tokens, action) if not a]
    assert env_ids == tok("\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    sampled = [t for t, a in zip(tokens, action) if a]
    first = tok('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>', add_special_tokens=False)
    assert sampled == first["input_ids"] + [tok.eos_token_id] + tok("5", add_special_tokens=False)["input_ids"] + \
        [tok.eos_token_id]  # the sampled tokens are kept as they were, not re-tokenized
    assert (out.sampler_logps[0][out.action_mask[0].bool()] == -0.5).all()
