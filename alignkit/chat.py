"""``alignkit chat``: talk to any model alignkit loads, or to two at once to compare them.

    alignkit chat MODEL [--compare OTHER_MODEL] [--system TEXT] [--temperature 0.7] [--top-p 0.9]
                        [--max-new-tokens 512] [--greedy] [--seed N] [--dtype auto]

- MODEL: what :func:`alignkit.generate.load_inference_model` loads (HF folder, training output or
  ``checkpoint-N`` folder, LoRA adapter folder, ``.gguf`` file, hub name, model asset).
- Answers stream as they are generated (``TextIteratorStreamer``, ``generate`` in a thread). The
  conversation is kept and rendered with the model's chat template on every turn, the same way
  ``alignkit generate`` and training render chat prompts; when it outgrows the model's context the oldest
  exchanges are left out (with a notice). A model without a chat template continues each message as plain
  text, without memory (a notice says so).
- Commands: ``/system TEXT`` (empty: none; applies from the next message), ``/reset`` (forget the
  conversation), ``/exit`` (or Ctrl-D), ``/help``. Ctrl-C stops the answer being written (the turn is
  forgotten); at the prompt it does nothing.
- ``--compare OTHER``: both models answer each message, one after the other, each labelled with its name and
  keeping its own conversation with its own answers.
- When stdin is not a terminal, messages are read line by line and answers printed without prompt or
  colours (with ``--compare``: ``[name] answer`` per model); commands work the same. Everything that is not an
  answer (loading, notices) goes to stderr.
- Sampling follows only the options given here (as in ``alignkit generate`` and RL), not the checkpoint's
  generation_config.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from alignkit.errors import AlignkitError
from alignkit.generate import InferenceModel, add_sampling_arguments, load_inference_model, sampling_config

HELP = "/system TEXT sets the system prompt, /reset forgets the conversation, /exit or Ctrl-D quits."
_NO_LIMIT = 10**9


class ChatSession:
    """One model's side of a chat: its conversation, its prompt, its streamed answers."""

    def __init__(self, loaded: InferenceModel, sampling, *, system: str | None = None, label: str | None = None):
        from transformers import GenerationConfig

        from alignkit.rollout import eos_token_ids

        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.label = label or loaded.name
        self.sampling = sampling
        self.system = system
        self.history: list[dict[str, str]] = []  # user and assistant messages; the system prompt is apart
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))
        config = self.model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        eos_ids = eos_token_ids(self.tokenizer, self.model)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_ids[0]
        options: dict[str, Any] = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
        self.generation_config = GenerationConfig(max_new_tokens=sampling.max_new_tokens, eos_token_id=eos_ids,
                                                  pad_token_id=pad_id, num_beams=1, **options)
        # transformers fills unset options from the checkpoint's generation_config.json (repetition
        # penalties, ...); a blank one leaves only the options above, as the RL samplers do
        self.model.generation_config = GenerationConfig()

    def messages(self, text: str, *, skip: int = 0) -> list[dict[str, str]]:
        """The conversation the model sees when ``text`` is the next user message (without the oldest ``skip``
        exchanges)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history[2 * skip:] + [{"role": "user", "content": text}]

    def prompt_ids(self, text: str) -> tuple[list[int], int]:
        """(prompt token ids, exchanges left out to fit the context) for the next user message ``text``."""
        from alignkit.data import tokenize_example

        if not self.templated:
            return tokenize_example({"prompt": text}, self.tokenizer, "prompt", max_length=_NO_LIMIT)["prompt_ids"], 0
        reserve = min(self.sampling.max_new_tokens, self.context // 2) if self.context else 0
        skip = 0
        while True:
            record = {"prompt": self.messages(text, skip=skip)}
            ids = tokenize_example(record, self.tokenizer, "prompt", max_length=_NO_LIMIT)["prompt_ids"]
            if not self.context or len(ids) + reserve <= self.context or 2 * skip >= len(self.history):
                return ids, skip
            skip += 1

    def reply(self, text: str, write: Callable[[str], None], notice: Callable[[str], None]) -> str | None:
        """Answer ``text``, passing the answer to ``write`` piece by piece as it is generated, and remember the
        exchange. None when the message does not fit the context (``notice`` says so) or Ctrl-C stopped it."""
        import torch
        from transformers import StoppingCriteria, TextIteratorStreamer

        from alignkit.models import model_device

        ids, dropped = self.prompt_ids(text)
        if dropped:
            notice(f"{self.label}: the conversation outgrew the model's {self.context}-token context; the oldest "
                   f"{dropped} exchange(s) are left out.")
        budget = self.sampling.max_new_tokens if not self.context else min(self.sampling.max_new_tokens,
                                                                           self.context - len(ids))
        if budget < 1:
            notice(f"{self.label}: the message is {len(ids)} tokens with its template; the model's context is "
                   f"{self.context}. Send a shorter one.")
            return None
        stop = threading.Event()

        class StopOnInterrupt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        config = copy.copy(self.generation_config)
        config.max_new_tokens = budget
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        device = model_device(self.model)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["ids"] = self.model.generate(
                    input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                                                                                            dtype=torch.long),
                    generation_config=config, streamer=streamer,
                    stopping_criteria=[StopOnInterrupt()])
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e
                streamer.end()  # the reader would wait forever otherwise

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            for piece in streamer:
                write(piece)
        except KeyboardInterrupt:
            stop.set()
            worker.join()
            return None
        worker.join()
        if "error" in result:
            raise result["error"]
        answer = self.tokenizer.decode(result["ids"][0, len(ids):], skip_special_tokens=True)
        if self.templated:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


class Terminal:
    """Where the chat reads and writes: answers to ``out``, everything else to ``err``; colours only for a
    person at a terminal."""

    def __init__(self, interactive: bool, out: TextIO, err: TextIO):
        self.interactive, self.out, self.err = interactive, out, err
        self.lines_read = 0
        self.color = interactive and out.isatty() and not os.environ.get("NO_COLOR")

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def notice(self, text: str) -> None:
        self.out.flush()
        self.err.write(self.paint(text, "2") + "\n")
        self.err.flush()

    def read(self, stdin: TextIO) -> str | None:
        """The next message or command; None at the end of input (Ctrl-D). A piped line that is not UTF-8 text
        is skipped with a notice (the lines after it are answered)."""
        if not self.interactive:
            while True:
                line = _read_line(stdin)
                self.lines_read += 1
                if line is None:
                    return None
                if isinstance(line, str):
                    return line.rstrip("\r\n")
                self.notice(f"(skipped input line {self.lines_read}: not UTF-8 text, {line.reason} at byte "
                            f"{line.start + 1})")
        while True:
            try:
                return input(">>> ")
            except EOFError:
                self.write("\n")
                return None
            except KeyboardInterrupt:
                self.write("\n")
                self.notice("(/exit or Ctrl-D quits)")


def _read_line(stdin: TextIO) -> str | UnicodeDecodeError | None:
    """The next line of piped input (None at its end), decoded as UTF-8 from the bytes underneath when there
    are bytes: a bad byte fails that line only, not the text layer's decoder for the rest of the input."""
    raw = getattr(stdin, "buffer", None)
    if raw is None:
        return stdin.readline() or None
    data = raw.readline()
    if not data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e


def chat_loop(sessions: list[ChatSession], terminal: Terminal, stdin: TextIO) -> int:
    """Read messages and commands until /exit or the end of input; every session answers every message."""
    compare = len(sessions) > 1
    while True:
        line = terminal.read(stdin)
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                for s in sessions:
                    s.history = []
                terminal.notice("(conversation forgotten)")
            elif command == "/system":
                for s in sessions:
                    s.system = argument.strip() or None
                terminal.notice(f"(system prompt {'set' if argument.strip() else 'removed'}; it applies from the "
                                "next message)")
            elif command == "/help":
                terminal.notice(HELP)
            else:
                terminal.notice(f"unknown command {command}; {HELP}")
            continue
        _turn(sessions, text, terminal, compare)


def _turn(sessions: list[ChatSession], text: str, terminal: Terminal, compare: bool) -> None:
    before = [len(s.history) for s in sessions]
    for s in sessions:
        if compare:
            terminal.write(terminal.paint(f"[{s.label}]", "1;36") + " ")
        answer = s.reply(text, terminal.write, terminal.notice)
        terminal.write("\n")
        if answer is None:  # stopped: forget the turn for every model, so their conversations stay aligned
            for session, n in zip(sessions, before):
                del session.history[n:]
            terminal.notice("(no answer: this message is forgotten)")
            break
    if terminal.interactive:
        terminal.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit chat", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with MODEL in the terminal (answers stream; the conversation is kept). Reads messages "
                    "line by line when stdin is not a terminal.",
        epilog=f"commands: {HELP}\nMODEL: an HF folder, a training output or checkpoint-N folder, a LoRA adapter "
               "folder, a .gguf file, a hub name or a model asset.")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--compare", metavar="OTHER_MODEL", help="a second model that answers every message too, "
                        "keeping its own conversation (e.g. the SFT model vs the PPO one)")
    parser.add_argument("--system", metavar="TEXT", help="system prompt to start with")
    add_sampling_arguments(parser, temperature=0.7, top_p=0.9, max_new_tokens=512)
    parser.add_argument("--seed", type=int, help="seed the sampling (reproducible answers)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that support it, else fp32), float32, "
                        "bfloat16, float16")
    return parser


def _labels(names: list[str]) -> list[str]:
    return names if len(set(names)) == len(names) else [f"{n} ({i})" for i, n in enumerate(names, start=1)]


def chat_main(argv: list[str]) -> int:
    """Run ``alignkit chat`` (argv: the words after ``chat``); 0 on success, 2 on an expected error."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: report the status instead of exiting
        return e.code if isinstance(e.code, int) else 2
    import torch  # only once the command runs: --help stays instant
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would clutter the conversation
    interactive = sys.stdin.isatty()
    terminal = Terminal(interactive, sys.stdout, sys.stderr)
    try:
        sampling = sampling_config(args)
        sampling.check("sampling")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        names = [args.model] + ([args.compare] if args.compare else [])
        sessions = []
        for name, label in zip(names, _labels(names)):
            terminal.notice(f"loading {name} ...")
            loaded = load_inference_model(name, dtype=args.dtype, device=device)
            session = ChatSession(loaded, sampling, system=args.system, label=label)
            terminal.notice(f"{label}: {loaded.description}")
            if not session.templated:
                terminal.notice(f"note: {label} has no chat template: each message is continued as plain text, "
                                "without the conversation or the system prompt.")
            sessions.append(session)
    except AlignkitError as e:
        if os.environ.get("ALIGNKIT_DEBUG") == "1":
            raise
        print(f"alignkit chat: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        terminal.notice(HELP)
    return chat_loop(sessions, terminal, sys.stdin)


if __name__ == "__main__":
    sys.exit(chat_main(sys.argv[1:]))
