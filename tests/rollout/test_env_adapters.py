"""Environments of verifiers and OpenEnv through alignkit's adapters (alignkit.rollout.env_verifiers/env_openenv):
episodes on the tiny Llama through MultiTurnSampler, rewards from the library's own scoring, environment tokens
masked, malformed tool calls counted; a short GRPO run; the one-line error when a library is missing."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import pytest
import torch

from alignkit.rollout import HFSampler, build_rollout
from alignkit.rollout.environment import AgentEnvironmentError, load_environment
from tests.methods.test_online_rl_agents import (  # noqa: F401 (fixtures)
    _metrics,
    _one_thread,
    _train,
    ending_model_dir,
    prompts,
)
from tests.rollout.test_multiturn import ending_model, sampler


@pytest.fixture
def tok(tiny_tok):
    return tiny_tok


def scripted_turns(monkeypatch, tok, turns: list[list[str]]) -> None:
    """The hf sampler answers each turn with the given texts (one per running episode), end-of-turn included."""
    it = iter(turns)

    def generate(self, model, contexts, *, seed=None, logps=False):
        responses = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in next(it)]
        assert len(responses) == len(contexts)
        return build_rollout(contexts, responses, torch.arange(len(contexts)), [tok.eos_token_id], tok.eos_token_id,
                             tok, logps=[[-0.5] * len(r) for r in responses] if logps else None)

    monkeypatch.setattr(HFSampler, "generate", generate)


def call(name: str, **arguments) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def tokens_of(out, i: int) -> tuple[list[int], list[int]]:
    """Episode ``i``'s (sampled tokens, environment tokens), in order."""
    keep = out.response_mask[i].bool()
    ids, action = out.response_ids[i][keep].tolist(), out.action_mask[i][keep].tolist()
    return [t for t, a in zip(ids, action) if a], [t for t, a in zip(ids, action) if not a]


# --------------------------------------------------------------------------------------------------
# verifiers
# --------------------------------------------------------------------------------------------------

VERIFIERS_ENVS = '''
import re

import verifiers as vf
from datasets import Dataset

DATA = Dataset.from_list([{"question": "What is 2 + 3?", "answer": "5"}])


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def correct(completion, answer) -> float:
    return float(completion[-1].content.strip() == answer)


def tool_env():
    """verifiers' ToolEnv: a Python function as the tool, a rubric for the final answer."""
    return vf.ToolEnv(tools=[add], dataset=DATA, rubric=vf.Rubric(funcs=[correct]), system_prompt="Use the tools.",
                      max_turns=4)


def the_share(completion) -> float:
    """The share of the word "the" in the assistant's turns."""
    words = [w for m in completion if m.role == "assistant" for w in re.findall(r"[a-z]+", (m.content or "").lower())]
    return sum(w == "the" for w in words) / len(words) if words else 0.0


class Nudge(vf.MultiTurnEnv):
    """A verifiers MultiTurnEnv: env_response answers each turn with a user message; its max_turns ends it."""

    async def env_response(self, messages, state, **kwargs):
        return [vf.UserMessage(content="say more about the cat")]


def nudge_env():
    return Nudge(dataset=DATA, rubric=vf.Rubric(funcs=[the_share]), max_turns=2)


def words_said(completion) -> float:
    """How much the assistant said, up to 12 words: a reward every episode earns some of."""
    return min(1.0, sum(len((m.content or "").split()) for m in completion if m.role == "assistant") / 12)


def talk_env():
    return Nudge(dataset=DATA, rubric=vf.Rubric(funcs=[words_said]), max_turns=2)


class AsksTheModel(vf.MultiTurnEnv):
    """An environment whose env_response samples the model itself (verifiers' get_model_response)."""

    async def env_response(self, messages, state, **kwargs):
        await self.get_model_response(state, messages)
        return []


def asks_the_model_env():
    return AsksTheModel(dataset=DATA, rubric=vf.Rubric(funcs=[the_share]), max_turns=3)


def arithmetic_env():
    """An environment that ships with verifiers: ReasoningGymEnv (a SingleTurnEnv; reasoning-gym's tasks, an
    XMLParser for <answer>, reasoning-gym's scoring in its rubric)."""
    from verifiers.legacy.envs.integrations.reasoninggym_env import ReasoningGymEnv

    return ReasoningGymEnv(gym="basic_arithmetic", num_train_examples=4, num_eval_examples=1, seed=0)
'''


def environments_file(tmp_path, library: str, source: str):
    """``source`` as a file of environments; the test is skipped when ``library``'s extra is not installed."""
    pytest.importorskip(library, reason=f"the {library} extra is not installed (pip install 'alignkit[{library}]')")
    path = tmp_path / f"{library}_envs.py"
    path.write_text(source)
    return path


@pytest.fixture
def vf_file(tmp_path):
    return environments_file(tmp_path, "verifiers", VERIFIERS_ENVS)


def test_verifiers_tool_env_episodes_scored_by_its_rubric(tok, vf_file, monkeypatch):
    """A verifiers ToolEnv through the sampler: the call runs verifiers' tool, its result comes back as template
    tokens (masked), the answer ends the episode and the rubric scores it; a malformed call reaches verifiers as
    text (its ToolEnv ends the episode there) and is counted."""
    scripted_turns(monkeypatch, tok, [[call("add", a=2, b=3), '<tool_call>{"name": add}</tool_call>'], ["5"]])
    factory = load_environment(f"verifiers:{vf_file}:tool_env")
    out = sampler(tok, factory, num_samples=2, max_new_tokens=64).generate_episodes(
        ending_model(tok), [{"prompt": "What is 2 + 3?", "answer": "5"}], logps=True)
    ep = out.episodes
    assert ep.stop == ["done", "done"] and ep.turns.tolist() == [2, 1]
    assert ep.rewards.tolist() == [1.0, 0.0]  # verifiers' rubric: correct() on the final answer
    assert ep.tool_calls.tolist() == [1, 0] and ep.tool_errors.tolist() == [0, 1]
    assert [m["role"] for m in ep.messages[0]] == ["system", "user", "assistant", "tool", "assistant"]
    assert ep.messages[0][0]["content"] == "Use the tools." and ep.messages[0][3]["content"] == "5"
    sampled, env_ids = tokens_of(out, 0)
    assert env_ids == tok("\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert sampled == tok(call("add", a=2, b=3), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + \
        tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # the sampled tokens, as sampled
    assert (out.sampler_logps[0][~out.action_mask[0].bool()] == 0).all()
    episode = factory({})  # verifiers' tool schema is what the chat template gets as `tools`
    episode.reset({"prompt": "What is 2 + 3?", "answer": "5"})
    assert episode.tools[0]["function"]["name"] == "add"
    assert episode.tools[0]["function"]["parameters"]["required"] == ["a", "b"]


def test_verifiers_dataset_written_as_prompt_rows_starts_the_same_episode(tmp_path, vf_file):
    from alignkit.rollout.env_verifiers import write_dataset

    path = tmp_path / "rows.jsonl"
    assert write_dataset(f"verifiers:{vf_file}:tool_env", path) == 1
    row = json.loads(path.read_text())
    assert row["prompt"] == [{"role": "system", "content": "Use the tools."},
                             {"role": "user", "content": "What is 2 + 3?"}]
    assert row["answer"] == "5" and row["example_id"] == 0
    episode = load_environment(f"verifiers:{vf_file}:tool_env")(row)
    assert episode.reset(row) == row["prompt"]  # the system prompt is not added twice


def test_verifiers_env_id_loads_the_module_named_after_it(tmp_path, vf_file, monkeypatch):
    """``verifiers:<env id>`` as prime-rl loads environments: the module named after the id (vf-tiny-env ->
    vf_tiny_env, as a pip-installed environment package is), its load_environment()."""
    (tmp_path / "vf_tiny_env.py").write_text(
        "from verifiers_envs import tool_env\n\n\ndef load_environment():\n    return tool_env()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    episode = load_environment("verifiers:vf-tiny-env")({})
    assert episode.reset({"prompt": "What is 2 + 3?"})[0] == {"role": "system", "content": "Use the tools."}
    assert [t["function"]["name"] for t in episode.tools] == ["add"]


def test_verifiers_reasoning_gym_env_shipped_with_verifiers(tmp_path, tok, vf_file, monkeypatch):
    """verifiers' own ReasoningGymEnv on its own dataset: one turn, scored by its parser and reasoning-gym."""
    pytest.importorskip("reasoning_gym")
    from alignkit.rewards.functions import load_function
    from alignkit.rollout.env_verifiers import write_dataset

    spec = f"verifiers:{vf_file}:arithmetic_env"
    write_dataset(spec, tmp_path / "rows.jsonl", n=1)
    row = json.loads((tmp_path / "rows.jsonl").read_text())
    right = load_function(f"{vf_file}:arithmetic_env")().rg_dataset[int(row["answer"])]["answer"]
    scripted_turns(monkeypatch, tok, [[f"<answer>{right}</answer>", "<answer>-12345</answer>"]])
    out = sampler(tok, load_environment(spec), num_samples=2, max_new_tokens=64).generate_episodes(
        ending_model(tok), [row])
    ep = out.episodes
    assert ep.stop == ["done", "done"] and ep.turns.tolist() == [1, 1]  # a SingleTurnEnv
    assert ep.rewards.tolist() == [1.0, 0.0]
    assert ep.messages[0][0]["role"] == "system" and ep.messages[0][1]["content"] == row["prompt"][-1]["content"]


def test_verifiers_multiturn_env_response_and_stop_conditions_with_real_sampling(tok, vf_file):
    """A verifiers MultiTurnEnv sampled for real: env_response's messages are appended (masked), verifiers' own
    max_turns ends every episode, and each reward is the rubric's score of that episode's conversation."""
    factory = load_environment(f"verifiers:{vf_file}:nudge_env")
    out = sampler(tok, factory, num_samples=3, max_new_tokens=16, max_turns=5).generate_episodes(
        ending_model(tok), [{"prompt": "the cat sat on the mat"}], seed=0)
    ep = out.episodes
    done = [i for i, s in enumerate(ep.stop) if s == "done"]
    assert done and all(int(ep.turns[i]) == 2 for i in done)  # verifiers' max_turns=2, not alignkit's 5
    import re

    for i in done:
        assert [m["role"] for m in ep.messages[i]] == ["user", "assistant", "user", "assistant"]
        assert ep.messages[i][2]["content"] == "say more about the cat"
        words = [w for m in ep.messages[i] if m["role"] == "assistant" for w in re.findall(r"[a-z]+", m["content"].lower())]
        expected = sum(w == "the" for w in words) / len(words) if words else 0.0
        assert float(ep.rewards[i]) == pytest.approx(expected, abs=1e-6)
        _, env_ids = tokens_of(out, i)
        assert tok.decode(env_ids) == "\n<|im_start|>user\nsay more about the cat<|im_end|>\n<|im_start|>assistant\n"


def test_grpo_trains_through_the_verifiers_adapter(tmp_path, vf_file, ending_model_dir, prompts):  # noqa: F811
    """Three GRPO steps on a verifiers MultiTurnEnv: the run completes, its metrics carry verifiers' rewards (the
    rubric's words_said, on the episodes verifiers ended) and the policy was updated with them."""
    out, spec = tmp_path / "grpo", f"verifiers:{vf_file}:talk_env"
    result = _train("grpo", ending_model_dir, prompts, out, spec, training={"max_steps": 3},
                    generation={"max_new_tokens": 16, "num_samples": 4},
                    environment={"factory": spec, "max_turns": 3, "max_episode_tokens": 96})
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["reward/environment"] == pytest.approx(r["reward"]) and 0.0 <= r["reward"] <= 1.0
        assert 1.0 <= r["env/turns"] <= 2.0 and r["env/stop_max_turns"] == 0.0  # verifiers ends them at 2 turns
    assert max(r["reward"] for r in rows) > 0 and max(r["env/stop_done"] for r in rows) > 0  # rubric scores arrive
    assert any(abs(r["loss/policy"]) > 0 for r in rows) and rows[-1]["kl"] > 0  # the rewards moved the policy
    assert result["model"] is not None


# --------------------------------------------------------------------------------------------------
# OpenEnv
# --------------------------------------------------------------------------------------------------

OPENENV_ENVS = '''
import os

from fastmcp import FastMCP
from openenv.core.env_server import Action, Environment, MCPEnvironment, Observation, State
from openenv.core.generic_client import GenericEnvClient


class AddEnvironment(MCPEnvironment):
    """An OpenEnv MCP environment: tools ``add`` and ``submit``; submitting ends the episode, reward 1 if 5."""

    SUPPORTS_CONCURRENT_SESSIONS = True  # one instance per session: the server may run several episodes at once

    def __init__(self):
        mcp = FastMCP("add")
        self._state, self.answer = State(step_count=0), None

        @mcp.tool
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        @mcp.tool
        def submit(answer: int) -> str:
            """Submit the final answer."""
            self.answer = answer
            return "submitted"

        super().__init__(mcp)

    def reset(self, seed=None, episode_id=None, **kwargs):
        self._state, self.answer = State(step_count=0), None
        return Observation()

    def _step_impl(self, action, timeout_s=None, **kwargs):
        return Observation(metadata={"error": f"unexpected action {type(action).__name__}"})

    async def _async_handle_call_tool(self, action, timeout_s=None, **kwargs):
        observation = await super()._async_handle_call_tool(action, timeout_s=timeout_s, **kwargs)
        if action.tool_name == "submit" and observation.error is None:
            observation.done, observation.reward = True, float(self.answer == 5)
        return observation

    @property
    def state(self):
        return self._state


def add_client():
    """An OpenEnv client of the served AddEnvironment (a fresh one, so a fresh session, per episode)."""
    return GenericEnvClient(base_url=os.environ["ALIGNKIT_TEST_OPENENV_URL"])


class EchoAction(Action):
    """Say something; the environment echoes it back."""

    message: str


class EchoObservation(Observation):
    echoed_message: str = ""


class EchoEnvironment(Environment[EchoAction, EchoObservation, State]):
    """A plain OpenEnv environment (no MCP): reward 1 per echo that mentions a cat, over after two echoes."""

    def __init__(self):
        super().__init__()
        self._state = State(step_count=0)

    def reset(self, seed=None, episode_id=None, **kwargs):
        self._state = State(step_count=0)
        return EchoObservation(echoed_message="Echo environment ready.")

    def step(self, action, timeout_s=None, **kwargs):
        self._state.step_count += 1
        return EchoObservation(echoed_message=action.message, reward=float("cat" in action.message),
                               done=self._state.step_count >= 2)

    @property
    def state(self):
        return self._state
'''


@pytest.fixture
def openenv_file(tmp_path):
    return environments_file(tmp_path, "openenv", OPENENV_ENVS)


@pytest.fixture
def served_add_environment(openenv_file):
    """AddEnvironment behind OpenEnv's own server (create_app, uvicorn) on a free local port."""
    import uvicorn
    from openenv.core.env_server import CallToolAction, CallToolObservation, create_app

    from alignkit.rewards.functions import load_function

    app = create_app(load_function(f"{openenv_file}:AddEnvironment"), CallToolAction, CallToolObservation,
                     env_name="add", max_concurrent_envs=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("where", ["in_process", "served", "client"])
def test_openenv_mcp_environment_episodes(tok, openenv_file, request, monkeypatch, where):
    """An OpenEnv MCP environment, in this process, behind its server (by URL) and through a client a function
    returns: its tools reach the chat template, tool calls become CallToolActions whose results come back as
    masked template tokens, the environment's reward and done end the episode; a malformed call and a bad call
    are answered and counted, the episode goes on."""
    spec = f"openenv:{openenv_file}:AddEnvironment"
    if where == "served":
        spec = f"openenv:{request.getfixturevalue('served_add_environment')}"
    elif where == "client":
        monkeypatch.setenv("ALIGNKIT_TEST_OPENENV_URL", request.getfixturevalue("served_add_environment"))
        spec = f"openenv:{openenv_file}:add_client"
    scripted_turns(monkeypatch, tok, [[call("add", a=2, b=3), '<tool_call>{"name": add}</tool_call>'],
                                      [call("submit", answer=5), call("add", a=2)],
                                      [call("submit", answer=4)]])
    out = sampler(tok, load_environment(spec), num_samples=2, max_new_tokens=64).generate_episodes(
        ending_model(tok), [{"prompt": "What is 2 + 3?"}], logps=True)
    ep = out.episodes
    assert ep.stop == ["done", "done"] and ep.turns.tolist() == [2, 3]
    assert ep.rewards.tolist() == [1.0, 0.0]  # the environment's: submit(5) -> 1, submit(4) -> 0
    assert ep.tool_calls.tolist() == [2, 2] and ep.tool_errors.tolist() == [0, 2]
    assert ep.messages[0][2] == {"role": "tool", "name": "add", "content": "5"}
    assert ep.messages[1][2]["content"].startswith("error: malformed tool call")
    assert ep.messages[1][4]["content"].startswith("error:") and "b" in ep.messages[1][4]["content"]
    _, env_ids = tokens_of(out, 0)
    assert env_ids == tok("\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    episode = load_environment(spec)({})  # the MCP tools are what the chat template gets as `tools`
    episode.reset({"prompt": "What is 2 + 3?"})
    assert [(t["function"]["name"], t["function"]["description"]) for t in episode.tools] == [
        ("add", "Add two integers."), ("submit", "Submit the final answer.")]
    episode.close()


def test_openenv_plain_environment_its_action_as_one_tool(tok, openenv_file, monkeypatch):
    """A non-MCP OpenEnv environment: its action type is the tool ``echo``; observations are the tool messages,
    per-step rewards add up, its done ends the episode; arguments that are not a valid action are counted."""
    scripted_turns(monkeypatch, tok, [[call("echo", message="the cat"), call("echo", text="x")],
                                      [call("echo", message="a dog"), call("shout", message="cat")],
                                      ["I am done"]])
    factory = load_environment(f"openenv:{openenv_file}:EchoEnvironment")
    assert factory({}).reset({"prompt": "echo a cat"})[0]["content"] == "echo a cat\n\nEcho environment ready."
    out = sampler(tok, factory, num_samples=2, max_new_tokens=64).generate_episodes(
        ending_model(tok), [{"prompt": "echo a cat"}])
    ep = out.episodes
    assert ep.turns.tolist() == [2, 3] and ep.stop == ["done", "done"]
    assert ep.rewards.tolist() == [1.0, 0.0]  # 1 (cat) + 0 (dog); the invalid calls earn nothing
    assert ep.tool_errors.tolist() == [0, 2]
    assert ep.messages[0][2] == {"role": "tool", "name": "echo", "content": "the cat"}
    assert "ValidationError" in ep.messages[1][2]["content"] and "no tool named 'shout'" in ep.messages[1][4]["content"]


@pytest.fixture
def echo_env_package(tmp_path, openenv_file, monkeypatch):
    """OpenEnv's echo environment as ``openenv init echo_env`` writes it (the template TRL's echo example runs),
    importable as the package ``echo_env``."""
    import subprocess
    from pathlib import Path

    cli = Path(sys.executable).parent / "openenv"
    proc = subprocess.run([str(cli), "init", "echo_env", "--output-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "echo_env" or n.startswith("echo_env.")]:
        monkeypatch.delitem(sys.modules, name)
    (tmp_path / "echo_client.py").write_text(
        "import os\nfrom echo_env.client import EchoEnv\n\n\n"
        "def echo_client():\n    return EchoEnv(base_url=os.environ['ALIGNKIT_TEST_OPENENV_URL'])\n")
    return tmp_path


def test_openenv_echo_env_from_openenv_init(tok, echo_env_package, monkeypatch):
    """OpenEnv's own echo environment, in this process and behind its own server app through its typed client:
    its EchoAction is the tool, its reward (0.1 per character, at most 1) is the episode's; its server takes one
    session, so two episodes at once stop with the capacity error."""
    import importlib

    import uvicorn

    factory = load_environment("openenv:echo_env.server.echo_env_environment:EchoEnvironment")
    episode = factory({})
    ready = json.dumps({"echoed_message": "Echo Env environment ready!", "message_length": 0})  # its fields
    assert episode.reset({"prompt": "Echo hello."}) == [{"role": "user", "content": f"Echo hello.\n\n{ready}"}]
    assert episode.tools[0]["function"]["name"] == "echo"
    assert episode.tools[0]["function"]["parameters"]["required"] == ["message"]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = importlib.import_module("echo_env.server.app").app  # its own server app: one session at a time
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    monkeypatch.setenv("ALIGNKIT_TEST_OPENENV_URL", f"http://127.0.0.1:{port}")
    try:
        for spec in ["openenv:echo_env.server.echo_env_environment:EchoEnvironment",
                     f"openenv:{echo_env_package / 'echo_client.py'}:echo_client"]:
            scripted_turns(monkeypatch, tok, [[call("echo", message="hello")], ["That is all."]])
            out = sampler(tok, load_environment(spec), num_samples=1, max_new_tokens=64).generate_episodes(
                ending_model(tok), [{"prompt": "Echo hello."}])
            ep = out.episodes
            assert ep.stop == ["done"] and ep.turns.tolist() == [2] and ep.rewards.tolist() == [0.5], spec
            assert ep.messages[0][2] == {"role": "tool", "name": "echo", "content": json.dumps(
                {"echoed_message": "hello", "message_length": 5})}
        scripted_turns(monkeypatch, tok, [["hi", "hi"]])
        with pytest.raises(AgentEnvironmentError, match="at capacity.*max_concurrent_envs"):
            sampler(tok, load_environment(f"openenv:http://127.0.0.1:{port}"), num_samples=2).generate_episodes(
                ending_model(tok), [{"prompt": "Echo hello."}])
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --------------------------------------------------------------------------------------------------
# Specs and a missing library
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["verifiers", "openenv"])
def test_a_missing_library_is_a_one_line_error_naming_the_extra(monkeypatch, library):
    for name in [n for n in sys.modules if n == library or n.startswith(f"{library}.")] + [library]:
        monkeypatch.setitem(sys.modules, name, None)  # `import <library>` (and its modules) raises ImportError
    with pytest.raises(AgentEnvironmentError) as e:
        load_environment(f"{library}:anything:make")
    message = str(e.value)
    assert "\n" not in message and f"pip install 'alignkit[{library}]'" in message


def test_spec_errors_name_the_environment(tmp_path, vf_file, openenv_file):
    with pytest.raises(AgentEnvironmentError, match="name the verifiers environment"):
        load_environment("verifiers:")
    with pytest.raises(AgentEnvironmentError, match="verifiers:no-such-env"):
        load_environment("verifiers:no-such-env")
    with pytest.raises(AgentEnvironmentError, match="no function 'nope'"):
        load_environment(f"verifiers:{vf_file}:nope")
    episode = load_environment(f"verifiers:{vf_file}:asks_the_model_env")({})
    episode.reset({"prompt": "hi"})
    with pytest.raises(AgentEnvironmentError, match="asked for a model response itself"):
        episode.step({"role": "assistant", "content": "hello"})
    (tmp_path / "not_env.py").write_text("def make():\n    return 3\n")
    with pytest.raises(AgentEnvironmentError, match="not a verifiers MultiTurnEnv"):
        load_environment(f"verifiers:{tmp_path / 'not_env.py'}:make")
    with pytest.raises(AgentEnvironmentError, match="not an OpenEnv Environment"):
        load_environment(f"openenv:{tmp_path / 'not_env.py'}:make")({})
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AgentEnvironmentError, match="no OpenEnv server answers"):
        load_environment(f"openenv:http://127.0.0.1:{port}")({})
