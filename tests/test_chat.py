"""alignkit chat: streaming, the conversation the model sees, commands, adapters, --compare, terminal and pipes.

Tiny random models answer gibberish, so the tests check structure, and with greedy decoding they check each
answer against plain ``transformers`` generation on the chat template of the conversation it should see.
"""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from alignkit.chat import ChatSession, Terminal, chat_loop, chat_main
from alignkit.generate import load_inference_model
from alignkit.rollout import SamplingConfig
from alignkit.testing import save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("other-llama"), seed=1)


def expected_answer(model_dir: Path, messages: list[dict], max_new_tokens: int = NEW_TOKENS) -> str:
    """Greedy answer of plain transformers to ``messages`` (the chat template with a generation prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def record_prompts(session: ChatSession) -> list[list[int]]:
    """The token ids every later answer of ``session`` is generated from."""
    prompts: list[list[int]] = []
    real = session.model.generate

    def recording(*args, **kwargs):
        prompts.append(kwargs["input_ids"][0].tolist())
        return real(*args, **kwargs)

    session.model.generate = recording
    return prompts


def record_answers(session: ChatSession) -> list[str | None]:
    """Every later answer of ``session`` as ``reply`` returns it."""
    answers: list[str | None] = []
    real = session.reply

    def recording(*args, **kwargs):
        answers.append(real(*args, **kwargs))
        return answers[-1]

    session.reply = recording
    return answers


def template_ids(session: ChatSession, messages: list[dict]) -> list[int]:
    tok = session.tokenizer
    return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False).input_ids


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# -- in process: what the model sees -----------------------------------------------------------------


def test_answers_stream_while_the_model_is_still_generating(tiny_model_dir):
    session = ChatSession(load_inference_model(str(tiny_model_dir)), SamplingConfig(do_sample=False,
                                                                                   max_new_tokens=16))
    real_forward, real_generate = session.model.forward, session.model.generate
    generating = threading.Event()

    def slow_forward(*args, **kwargs):  # 30 ms a token: a streamed piece must arrive before the last token
        time.sleep(0.03)
        return real_forward(*args, **kwargs)

    def flagged_generate(*args, **kwargs):
        generating.set()
        try:
            return real_generate(*args, **kwargs)
        finally:
            generating.clear()

    session.model.forward, session.model.generate = slow_forward, flagged_generate
    pieces: list[tuple[str, bool]] = []
    answer = session.reply("hello there", lambda piece: pieces.append((piece, generating.is_set())), print)
    assert len(pieces) > 2
    assert pieces[0][1], "the first piece arrived only after generate returned: not streamed"
    assert "".join(p for p, _ in pieces) == answer
    assert answer == expected_answer(tiny_model_dir, [user("hello there")], 16)


def test_each_turn_sees_the_whole_conversation_and_the_answers_match_transformers(tiny_model_dir):
    session = ChatSession(load_inference_model(str(tiny_model_dir)), GREEDY, system="be brief")
    prompts = record_prompts(session)
    first = session.reply("what is the cat", lambda _: None, print)
    second = session.reply("and the dog", lambda _: None, print)
    conversation = [{"role": "system", "content": "be brief"}, user("what is the cat"), assistant(first),
                    user("and the dog")]
    assert prompts[0] == template_ids(session, conversation[:2])
    assert prompts[1] == template_ids(session, conversation)  # the first exchange is in the second prompt
    assert prompts[1][:len(prompts[0])] == prompts[0]
    assert first == expected_answer(tiny_model_dir, conversation[:2])
    assert second == expected_answer(tiny_model_dir, conversation)
    # the test can fail: without the first exchange the model answers otherwise
    assert second != expected_answer(tiny_model_dir, [conversation[0], user("and the dog")])


def test_system_and_reset_commands_change_what_the_model_sees(tiny_model_dir, capsys):
    session = ChatSession(load_inference_model(str(tiny_model_dir)), GREEDY)
    prompts, answers = record_prompts(session), record_answers(session)
    script = "hello\n/system you are a cat\nhello again\n/reset\nhello\n/system\nbye\n/exit\nnot read\n"
    assert chat_loop([session], Terminal(False, sys.stdout, sys.stderr), io.StringIO(script)) == 0
    a1, a2, a3, a4 = answers
    system = {"role": "system", "content": "you are a cat"}
    assert prompts == [
        template_ids(session, [user("hello")]),
        template_ids(session, [system, user("hello"), assistant(a1), user("hello again")]),
        template_ids(session, [system, user("hello")]),  # /reset forgot the conversation, not the system prompt
        template_ids(session, [user("hello"), assistant(a3), user("bye")]),  # /system alone removed it
    ]
    assert a3 != a1  # the system prompt changed the answer to the same message
    assert capsys.readouterr().out == "".join(f"{a}\n" for a in answers)  # /exit stopped reading


def test_unknown_command_and_a_model_without_chat_template(tmp_path, monkeypatch, capsys):
    plain = save_tiny_llama(tmp_path / "plain", with_template=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat sat\n/what\nthe cat sat\n"))
    assert chat_main([str(plain), "--greedy", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    out, err = capsys.readouterr()
    assert "has no chat template" in err and "unknown command /what" in err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(plain), AutoModelForCausalLM.from_pretrained(plain)
    ids = tok("the cat sat", return_tensors="pt").input_ids
    out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    continuation = tok.decode(out_ids[0, ids.shape[1]:], skip_special_tokens=True)
    assert out == f"{continuation}\n{continuation}\n"  # the same text continued the same way: no memory


def test_a_long_conversation_drops_its_oldest_exchanges_to_fit_the_context(tiny_model_dir):
    session = ChatSession(load_inference_model(str(tiny_model_dir)), GREEDY)
    session.context = 60  # tokens; each exchange here takes about 20
    notices: list[str] = []
    for i in range(4):
        session.reply(f"the cat {i}", lambda _: None, notices.append)
    assert any("oldest" in n for n in notices)
    ids, skipped = session.prompt_ids("the dog")
    assert skipped > 0 and len(ids) + NEW_TOKENS <= 60
    assert session.history[-2] == user("the cat 3")  # the newest exchange is always kept


def test_compare_keeps_a_conversation_per_model_with_its_own_answers(tiny_model_dir, other_model_dir, capsys):
    sessions = [ChatSession(load_inference_model(str(d)), GREEDY, label=name)
                for d, name in ((tiny_model_dir, "sft"), (other_model_dir, "ppo"))]
    prompts, answers = [record_prompts(s) for s in sessions], [record_answers(s) for s in sessions]
    chat_loop(sessions, Terminal(False, sys.stdout, sys.stderr), io.StringIO("hello\nand then\n"))
    (sft1, sft2), (ppo1, ppo2) = answers
    assert capsys.readouterr().out == f"[sft] {sft1}\n[ppo] {ppo1}\n[sft] {sft2}\n[ppo] {ppo2}\n"
    assert sft1 != ppo1
    for session, model_dir, prompt, (first, second) in zip(sessions, (tiny_model_dir, other_model_dir), prompts,
                                                          answers):
        conversation = [user("hello"), assistant(first), user("and then")]
        assert prompt[1] == template_ids(session, conversation)  # its own first answer, not the other's
        assert second == expected_answer(model_dir, conversation)


def test_chat_with_a_lora_adapter_folder(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import ModelConfig
    from alignkit.models import load_model, load_tokenizer, save_model

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", finetune="lora", lora_r=4)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would change nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    save_model(model, tok, tmp_path / "adapter")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert chat_main([str(tmp_path / "adapter"), "--greedy", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    out, err = capsys.readouterr()
    assert f"LoRA adapter merged into {tiny_model_dir}" in err

    base_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    text = base_tok.apply_chat_template([user("hello")], add_generation_prompt=True, tokenize=False)
    ids = base_tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=base_tok.eos_token_id,
                                 pad_token_id=base_tok.pad_token_id)
    assert out == base_tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    assert out != expected_answer(tiny_model_dir, [user("hello")]) + "\n"  # the adapter changed the answer


@pytest.mark.parametrize("make", ["missing", "empty folder", "classifier"])
def test_a_path_that_is_no_chat_model_is_a_one_line_error(make, tmp_path, monkeypatch, capsys):
    from alignkit.testing import save_tiny_bert_classifier

    path = tmp_path / "model"
    if make == "empty folder":
        path.mkdir()
    elif make == "classifier":
        save_tiny_bert_classifier(path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert chat_main([str(path)]) == 2
    out, err = capsys.readouterr()
    error = [line for line in err.splitlines() if line.startswith("alignkit chat: error:")]
    assert len(error) == 1 and str(path) in error[0] and out == ""


# -- through a pseudo-terminal and a pipe ---------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TERM": "dumb", "NO_COLOR": ""}


class Pty:
    """``python -m alignkit.chat ARGS`` on a pseudo-terminal, as a person at a terminal runs it."""

    def __init__(self, *args: str):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "alignkit.chat", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=REPO, env=_env(), close_fds=True)
        os.close(slave)
        self.fd, self.seen = master, b""

    def read_until(self, marker: bytes, timeout: float = 120) -> str:
        """Everything up to and including the next ``marker``."""
        end = time.monotonic() + timeout
        while marker not in self.seen:
            remaining = end - time.monotonic()
            assert remaining > 0, f"no {marker!r} after {timeout} s; got {self.seen[-2000:]!r}"
            if select.select([self.fd], [], [], remaining)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"the chat ended before {marker!r}; got {self.seen[-2000:]!r}"
                self.seen += chunk
        cut = self.seen.index(marker) + len(marker)
        text, self.seen = self.seen[:cut], self.seen[cut:]
        return text.decode(errors="replace").replace("\r\n", "\n")

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.fd)


PROMPT = b">>> "


def test_a_terminal_session(tiny_model_dir):
    chat = Pty(str(tiny_model_dir), "--greedy", "--max-new-tokens", str(NEW_TOKENS))
    intro = chat.read_until(PROMPT)
    assert "LlamaForCausalLM" in intro and "/reset" in intro
    chat.send("hello")
    first = chat.read_until(PROMPT)
    answer = expected_answer(tiny_model_dir, [user("hello")])
    assert first.startswith("hello\n") and answer + "\n\n" in first  # echo, streamed answer, a blank line
    chat.send("/system you are a cat")
    assert "system prompt set" in chat.read_until(PROMPT)
    chat.send("/reset")
    assert "conversation forgotten" in chat.read_until(PROMPT)
    chat.send("hello")
    system = {"role": "system", "content": "you are a cat"}
    assert expected_answer(tiny_model_dir, [system, user("hello")]) + "\n" in chat.read_until(PROMPT)
    os.write(chat.fd, b"\x04")  # Ctrl-D
    assert chat.close() == 0


def test_a_terminal_session_comparing_two_models(tiny_model_dir, other_model_dir):
    chat = Pty(str(tiny_model_dir), "--compare", str(other_model_dir), "--greedy", "--max-new-tokens",
               str(NEW_TOKENS))
    chat.read_until(PROMPT)
    for message in ("hello", "and then"):
        chat.send(message)
        turn = chat.read_until(PROMPT)
        labels = [f"\x1b[1;36m[{d}]\x1b[0m " for d in (tiny_model_dir, other_model_dir)]
        assert turn.count(labels[0]) == 1 and turn.count(labels[1]) == 1
        assert turn.index(labels[0]) < turn.index(labels[1])
    chat.send("/exit")
    assert chat.close() == 0


def test_piped_input_gives_plain_answers(tiny_model_dir):
    script = "hello\nwhat is the cat\n/reset\nhello\n"
    run = subprocess.run([sys.executable, "-m", "alignkit.chat", str(tiny_model_dir), "--greedy",
                          "--max-new-tokens", str(NEW_TOKENS)], input=script, capture_output=True, text=True,
                         cwd=REPO, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "\x1b" not in run.stdout and ">>>" not in run.stdout
    first = expected_answer(tiny_model_dir, [user("hello")])
    second = expected_answer(tiny_model_dir, [user("hello"), assistant(first), user("what is the cat")])
    assert run.stdout == f"{first}\n{second}\n{first}\n"  # after /reset, "hello" is answered as at the start
    assert "conversation forgotten" in run.stderr


def test_chat_with_a_gguf_file(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    from test_models import write_tiny_gguf

    from alignkit.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(tok).eval()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tok, model)
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # saving may import DeepSpeed, which logs to stdout
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert chat_main([str(path), "--greedy", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected_answer(tmp_path / "hf", [user("hello")]) + "\n"


def test_a_piped_line_that_is_not_utf8_is_skipped_and_the_next_is_answered(tiny_model_dir):
    """A bad byte raised UnicodeDecodeError out of the chat (a traceback; the lines after it unanswered)."""
    script = b"hello\nbad \xff\xfe line\nwhat is the cat\n"
    run = subprocess.run([sys.executable, "-m", "alignkit.chat", str(tiny_model_dir), "--greedy",
                          "--max-new-tokens", str(NEW_TOKENS)], input=script, capture_output=True,
                         cwd=REPO, env=_env(), timeout=300)
    stdout, stderr = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 0 and "Traceback" not in stderr, stderr
    first = expected_answer(tiny_model_dir, [user("hello")])
    second = expected_answer(tiny_model_dir, [user("hello"), assistant(first), user("what is the cat")])
    assert stdout == f"{first}\n{second}\n"
    assert "(skipped input line 2: not UTF-8 text, invalid start byte at byte 5)" in stderr
