"""``alignkit generate``: responses of any model alignkit loads for a prompt file, optionally scored, as JSONL.

    alignkit generate MODEL --prompts prompts.jsonl --out responses.jsonl [--num-samples 4]
        [--temperature 0.7 --top-p 0.9 --max-new-tokens 256 | --greedy]
        [--sampler hf|vllm|vllm_server [--vllm-server-url URL ...] [--vllm-server-sync-dir DIR]]
        [--reward-model PATH] [--reward-function file.py:fn ...] [--reward-url URL] [--seed 0]

- MODEL: anything :func:`load_inference_model` loads (HF folder, training output or ``checkpoint-N`` folder,
  LoRA adapter folder, ``.gguf`` file, hub name, model asset).
- Prompts are read by the data layer (kind "prompt"), so every prompt format alignkit trains on works:
  strings, chat messages, Alpaca, ShareGPT, preference or prompt/completion rows (their prompt part).
  Chat prompts go through the model's chat template; plain strings are continued as they are.
- The output has one line per prompt, in the order of the prompt file::

    {"prompt_id": 0, "prompt": ..., "responses": ["...", ...], "ended_with_eos": [true, ...],
     "scores": [0.5, ...], ...the prompt row's other columns}

  ``scores`` (the weighted sum of the reward sources) is there only when a reward source is given;
  ``ended_with_eos`` is false for a response cut at ``--max-new-tokens``.
- Sampling uses the samplers of RL (:func:`alignkit.rollout.build_sampler`) and is resumable like best-of-N
  (:mod:`alignkit.rollout.resumable`): prompts go in batches of ``--batch-size``, each committed to
  ``<out stem>.progress.jsonl`` after its lines are written. Running the same command again after a crash
  continues where it stopped (no prompt lost or done twice; batch ``g`` samples with a seed derived from
  ``--seed`` and ``g``, so the result is the one an uninterrupted run gives); running it with other
  settings is refused; ``--overwrite`` starts over.
- ``--sampler vllm_server``: vLLM servers generate (``--vllm-server-url``, repeatable: running servers, e.g.
  ``alignkit serve``; none: one is started here). MODEL's weights are sent to them once, before the first
  batch, so they sample from MODEL whatever they loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.config import ConfigError, DataConfig, DataSource, ModelConfig
from alignkit.errors import AlignkitError

logger = logging.getLogger("alignkit")

# how the sampled responses come out, not which: a resumed run may change them
_SPEED_ONLY = {"batch_size", "zero3_gather", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size",
               "vllm_kv_cache_gb", "vllm_sleep_mode", "model_batch_size", "url_timeout", "url_retries",
               "vllm_server_urls", "vllm_server_count", "vllm_server_timeout", "vllm_server_start_timeout",
               "vllm_server_weight_sync", "vllm_server_sync_dir", "vllm_server_lora"}
# the vllm_server sampler's advice names generation.* settings; here they are flags
_SERVER_FLAGS = {"generation.vllm_server_urls": "--vllm-server-url", "generation.vllm_server_sync_dir":
                 "--vllm-server-sync-dir"}


# --------------------------------------------------------------------------------------------------
# Loading any model for inference (shared with alignkit chat)
# --------------------------------------------------------------------------------------------------


@dataclass
class InferenceModel:
    """A frozen causal LM in eval mode and its tokenizer, loaded from whatever the user named."""

    name: str  # as the user gave it
    model: Any
    tokenizer: Any
    source: str  # a full model the weights start from (an adapter's base): what vLLM builds its model from
    description: str  # one line for the user: class, size, dtype, device, adapter


def load_inference_model(name_or_path: str, *, dtype: str = "auto", device: Any = None) -> InferenceModel:
    """Load a causal LM for generation from an HF folder, a training output folder (its final model, else its
    latest ``checkpoint-N``), a ``checkpoint-N`` folder, a LoRA adapter folder (merged into the base that its
    adapter_config.json names), a ``.gguf`` file, a hub name or a model asset."""
    from alignkit.models import count_parameters, load_model, load_tokenizer, model_device

    path = Path(name_or_path).expanduser()
    folder = _model_folder(path) if path.is_dir() else None
    if folder is not None and (folder / "adapter_config.json").is_file():
        model, tokenizer, source, note = _load_adapter(folder, dtype)
    else:
        cfg = ModelConfig(name_or_path=str(folder or name_or_path), dtype=dtype)
        if folder is not None:
            _check_causal_lm(folder)
        tokenizer = load_tokenizer(cfg)
        model = load_model(cfg, tokenizer, trainable=False)
        source, note = cfg.name_or_path, ""
    if device is not None:
        model.to(device)
    total = count_parameters(model)[1]
    where = f"{str(model.dtype).removeprefix('torch.')}, {model_device(model)}"
    description = f"{type(model).__name__}, {total / 1e6:.1f}M parameters, {where}{note}"
    return InferenceModel(name_or_path, model, tokenizer, source, description)


def _model_folder(path: Path) -> Path:
    """The folder holding the model: ``path`` itself, or the newest complete checkpoint of an output folder
    without a final model."""
    from alignkit.models import ModelLoadError
    from alignkit.training.checkpoint import list_checkpoints

    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    checkpoints = list_checkpoints(path)
    if checkpoints:
        logger.warning("%s holds no final model (an unfinished run?): using its latest checkpoint, %s.", path,
                       checkpoints[-1].name)
        return checkpoints[-1]
    raise ModelLoadError(f"{path}: not a model folder (no config.json, no adapter_config.json, no checkpoint-N "
                         "inside). Give an HF model folder, a training output or checkpoint-N folder, a LoRA "
                         "adapter folder, a .gguf file, a hub name or a model asset (alignkit assets list).")


def _check_causal_lm(folder: Path) -> None:
    from alignkit.models import ModelLoadError

    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return  # transformers reports unreadable configs itself
    if architectures and all(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures):
        raise ModelLoadError(f"{folder} is a classifier ({', '.join(architectures)}; a reward model?), not a "
                             "language model that generates text; give a causal LM.")


def _load_adapter(folder: Path, dtype: str) -> tuple[Any, Any, str, str]:
    """(merged model, tokenizer, base model name, description note) of a LoRA adapter folder."""
    from peft import PeftModel

    from alignkit.models import ModelLoadError, adapter_base, load_model, load_tokenizer

    config_file = folder / "adapter_config.json"
    try:
        adapter_config = json.loads(config_file.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e}).") from e
    base = adapter_base(folder)  # a relative base of an older adapter is looked for above the adapter
    if (adapter_config.get("task_type") or "CAUSAL_LM") != "CAUSAL_LM":
        raise ModelLoadError(f"{config_file}: a {adapter_config['task_type']} adapter (a reward model?), not a "
                             "language model that generates text.")
    base_cfg = ModelConfig(name_or_path=base, revision=adapter_config.get("revision"), dtype=dtype)
    own_tokenizer = (folder / "tokenizer_config.json").is_file()
    try:
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)) if own_tokenizer else base_cfg)
        model = load_model(base_cfg, tokenizer, trainable=False)
    except ConfigError as e:
        raise ModelLoadError(f"{config_file}: its base model {base!r} cannot be loaded: {e}") from e
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5: nothing a user can act on
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(folder))
    merged = peft_model.merge_and_unload()  # merged once: generation then runs at the speed of a plain model
    merged.eval()
    return merged, tokenizer, base, f" (LoRA adapter merged into {base})"


# --------------------------------------------------------------------------------------------------
# Prompts, records, the run
# --------------------------------------------------------------------------------------------------


def read_prompts(path: str, tokenizer, *, system: str | None = None, max_prompt_length: int = 1024) -> list[dict]:
    """The prompt rows of ``path`` ({prompt, prompt_ids, ...other columns}) in the order of the file."""
    from alignkit.data import build_datasets, mix

    data = DataConfig(train=[DataSource(path=path)], max_length=max_prompt_length, system_prompt=system)
    with _prompt_file_advice():
        splits = build_datasets(data, tokenizer, "prompt")
    # build_datasets shuffles its mix with data.shuffle_seed; the same draw over row numbers undoes it
    order = mix([(data.train[0], list(range(len(splits.train))))], random.Random(data.shuffle_seed))
    rows: list[dict] = [{}] * len(order)
    for row, index in zip(splits.train, order):
        rows[index] = row
    return rows


def prompt_records(path: str, *, system: str | None = None) -> list[dict]:
    """The prompt records of ``path`` as reward sources see their columns, without a tokenizer (so before any
    model loads): {prompt, ...other columns}, in the order of the file."""
    from alignkit.data import normalize_rows, read_source

    with _prompt_file_advice():
        groups = normalize_rows(read_source(DataSource(path=path)), "prompt", system_prompt=system)
    return [row.data for group in groups for row in group]


# the data layer's advice names settings of a training config's data section, which generate does not have
_NO_SUCH_OPTION = [
    (re.compile(r",? or set data\.on_bad_row=skip( to [^.;]*)?"), ""),
    (re.compile(r";? data\.on_bad_row=skip drops such rows"), ""),
    (re.compile(r" ?\([^()]*on_bad_row[^()]*\)"), ""),
    (re.compile(r"set `columns: \{([^}]*)\}`(?: and `format: \w+`)? on this data source"),
     lambda m: f"rename the fields in the prompt file ({m.group(1).replace(': ', ' -> ')})"),
    (re.compile(r" and its `format:`/`columns:` settings"), ""),
    (re.compile(r" with `columns:`(?: of the data source)?"), " in the prompt file"),
]


@contextlib.contextmanager
def _prompt_file_advice() -> Iterator[None]:
    """Data errors of the prompt file with advice that fits alignkit generate (no data.on_bad_row, no
    ``columns:``: the file is read as it is)."""
    from alignkit.data import DataError

    try:
        yield
    except DataError as e:
        text, fix = str(e), e.fix
        if not fix or not text.endswith(fix):
            raise
        for pattern, replacement in _NO_SUCH_OPTION:
            fix = pattern.sub(replacement, fix)
        if any(option in fix for option in ("on_bad_row", "`columns", "`format")):
            fix = "Fix or remove that row of the prompt file."
        raise DataError(text[: len(text) - len(e.fix)].rstrip(". "), fix=fix) from None


def _settings(sampling, reward) -> dict[str, Any]:
    """What decides the responses and their scores, as dotted keys (a resumed run must match them)."""
    from alignkit.rewards import RewardSourcesConfig

    sections = {"generation": sampling, "reward": reward or RewardSourcesConfig()}  # no reward: no sources
    return {f"{name}.{k}": v for name, section in sections.items() for k, v in dataclasses.asdict(section).items()
            if k not in _SPEED_ONLY}


def _chooser(num_samples: int, reward):
    """Turn a batch's rollout into one record per prompt (scored when ``reward`` is given)."""
    from alignkit.rollout.resumable import PromptResult

    def choose(rows: list[dict], prompt_ids: list[int], rollout) -> list:
        texts, ended = rollout.response_texts, rollout.ended_with_eos.tolist()
        scores = None
        if reward is not None:
            scores = reward(rollout, rows).rewards.float().cpu().view(len(rows), num_samples).tolist()
        results = []
        for j, (row, pid) in enumerate(zip(rows, prompt_ids)):
            extra = {k: v for k, v in row.items() if k not in ("prompt", "prompt_ids")}
            part = slice(j * num_samples, (j + 1) * num_samples)
            record = {**extra, "prompt_id": pid, "prompt": row["prompt"], "responses": texts[part],
                      "ended_with_eos": ended[part]}
            if scores is not None:
                record["scores"] = scores[j]
            results.append(PromptResult(pid, [record], None if scores is None else scores[j]))
        return results

    return choose


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One run per output file: a second one would interleave its lines with ours."""
    import fcntl

    lock = out.with_name(f".{out.name}.lock")
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlignkitError(f"{out} is being written by another alignkit generate run; wait for it to end or "
                                "choose another --out.") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def _open_log(out: Path, meta: dict, overwrite: bool):
    from alignkit.rollout.resumable import SampleLog

    progress = out.with_name(f"{out.stem}.progress.jsonl")
    if not overwrite and out.is_file() and out.stat().st_size and not progress.exists():
        raise AlignkitError(f"--out {out} exists and was not written by alignkit generate (no {progress.name} "
                            "next to it); choose another --out, or pass --overwrite to replace it.")
    try:
        return SampleLog(out, meta, restart=overwrite)
    except AlignkitError as e:  # its advice names the training settings; here they are flags
        message = str(e).replace("use another training.output_dir", "use another --out").replace(
            "set training.overwrite_output_dir=true", "pass --overwrite")
        raise type(e)(message) from None


def generate(model: str, prompts: str, out: str | Path, *, sampling=None, reward=None, batch_size: int = 16,
             seed: int = 0, system: str | None = None, max_prompt_length: int = 1024, dtype: str = "auto",
             overwrite: bool = False) -> dict[str, Any]:
    """Write ``num_samples`` responses of ``model`` per prompt of the file ``prompts`` to the JSONL ``out``.

    ``sampling``: an :class:`alignkit.rollout.SamplingConfig` (default: one sample, temperature 1);
    ``reward``: an :class:`alignkit.rewards.RewardSourcesConfig` to score the responses, or None;
    ``batch_size``: prompts per batch, the unit of progress, resume and seeding; ``system``: a system
    message for chat prompts that have none. Returns a summary: out, prompts, responses, mean_score.
    """
    from accelerate import PartialState

    from alignkit.rewards import build_reward
    from alignkit.rollout import SamplingConfig, build_sampler
    from alignkit.rollout.resumable import prompts_fingerprint, sample_prompts

    sampling = sampling or SamplingConfig()
    sampling.check("generation")
    if sampling.greedy and sampling.num_samples > 1:
        raise ConfigError(f"greedy decoding gives {sampling.num_samples} identical responses per prompt; sample "
                          "(temperature > 0, no --greedy) or ask for one sample.")
    if reward is not None:
        reward.check("reward")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1 (prompts per batch).")
    out = Path(out)
    if Path(prompts).exists() and out.resolve() == Path(prompts).resolve():
        raise ConfigError(f"--out {out} is the prompt file; write the responses to another file.")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = PartialState()
    if state.num_processes > 1:
        raise ConfigError("alignkit generate runs in one process; start it without torchrun/accelerate launch.")
    if reward is not None and reward.functions:  # a column a function needs: say so before the model loads
        reward.check_columns(prompt_records(prompts, system=system), prompts)
    loaded = load_inference_model(model, dtype=dtype, device=state.device)
    logger.info("%s: %s", model, loaded.description)
    rows = read_prompts(prompts, loaded.tokenizer, system=system, max_prompt_length=max_prompt_length)
    scorer = build_reward(reward, loaded.tokenizer, state.device, dtype=dtype) if reward is not None else None
    sampler = build_sampler(sampling, loaded.tokenizer, model_name_or_path=loaded.source, device=state.device,
                            dtype=dtype, seed=seed)
    local = Path(model).expanduser()
    meta = {"tool": "alignkit generate", "model": str(local.resolve()) if local.exists() else model,
            "prompts": len(rows), "prompts_sha256": prompts_fingerprint(rows), "seed": seed, "batch_size": batch_size,
            "max_prompt_length": max_prompt_length, **_settings(sampling, reward)}
    with _exclusive(out):
        log = _open_log(out, meta, overwrite)
        try:
            sample_prompts(state, loaded.model, sampler, rows, log, batch_size=batch_size, seed=seed,
                           choose=_chooser(sampling.num_samples, scorer), desc="generate")
        finally:
            sampler.close()  # vLLM shuts its engine down
        scores = [s for entry in log.entries for per_prompt in entry.get("all_scores", []) for s in per_prompt]
        done = sum(len(entry["prompt_ids"]) for entry in log.entries)
    return {"out": str(out), "prompts": done, "responses": done * sampling.num_samples,
            "mean_score": sum(scores) / len(scores) if scores else None}


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_sampling_arguments(parser: argparse.ArgumentParser, *, temperature: float, top_p: float,
                           max_new_tokens: int) -> None:
    """--temperature, --top-p, --top-k, --max-new-tokens, --greedy (shared with alignkit chat)."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help=f"default {temperature}")
    g.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling (default {top_p}; 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (deterministic; ignores the above)")


def sampling_config(args: argparse.Namespace, **extra: Any):
    from alignkit.rollout import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, do_sample=not args.greedy, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample responses of MODEL for every prompt of a file, optionally score them with reward "
                    "sources, and write one JSON line per prompt: "
                    '{"prompt_id", "prompt", "responses", "ended_with_eos", "scores"}. Resumable: the same '
                    "command continues an interrupted run.",
        epilog="MODEL: an HF folder, a training output or checkpoint-N folder, a LoRA adapter folder, a .gguf file, "
               "a hub name or a model asset.\nPrompts: any format alignkit reads (strings, chat messages, Alpaca, "
               "ShareGPT, ...).")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--prompts", required=True, metavar="FILE", help="prompt file (.jsonl, .json, .parquet, "
                        ".csv), dataset folder, hub dataset or data asset")
    parser.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file (one line per prompt)")
    parser.add_argument("--num-samples", type=int, default=1, help="responses per prompt (default 1)")
    add_sampling_arguments(parser, temperature=1.0, top_p=1.0, max_new_tokens=256)
    parser.add_argument("--sampler", choices=["hf", "vllm", "vllm_server"], default="hf", help="hf (model.generate, "
                        "default), vllm (pip install alignkit[vllm]) or vllm_server (vLLM servers over HTTP)")
    parser.add_argument("--vllm-server-url", action="append", default=[], metavar="URL", help="vllm_server: a "
                        "running server (alignkit serve), http://HOST:PORT (repeatable; none: one is started here)")
    parser.add_argument("--vllm-server-sync-dir", metavar="DIR", help="vllm_server: a folder this machine writes "
                        "MODEL's weights to and every server reads (servers on other machines: a shared one)")
    g = parser.add_argument_group("scoring (any mix; the scores are the weighted sum)")
    g.add_argument("--reward-model", metavar="PATH", help="a reward model folder, hub name or asset")
    g.add_argument("--reward-function", action="append", default=[], metavar="MODULE:FN",
                   help="fn(prompts, completions, **row_fields) -> list[float]; module:fn or file.py:fn (repeatable)")
    g.add_argument("--reward-url", metavar="URL", help="HTTP endpoint: POST {prompts, completions} -> {rewards}")
    parser.add_argument("--system", metavar="TEXT", help="system message for chat prompts that have none")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch: the unit of progress, "
                        "resume and seeding (default 16)")
    parser.add_argument("--max-prompt-length", type=int, default=1024, help="prompt tokens kept (cut from the "
                        "left; default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that support it, else fp32), float32, "
                        "bfloat16, float16")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming --out")
    return parser


def generate_main(argv: list[str]) -> int:
    """Run ``alignkit generate`` (argv: the words after ``generate``); 0 on success, 2 on an expected error."""
    from alignkit.api import setup_logging

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: report the status instead of exiting
        return e.code if isinstance(e.code, int) else 2
    from alignkit.rewards import RewardSourcesConfig  # torch: only once the command runs, not for --help

    setup_logging()
    reward = None
    if args.reward_model or args.reward_function or args.reward_url:
        reward = RewardSourcesConfig(model=args.reward_model, functions=args.reward_function, url=args.reward_url)
    try:
        if args.sampler != "vllm_server" and (args.vllm_server_url or args.vllm_server_sync_dir):
            flag = "--vllm-server-url" if args.vllm_server_url else "--vllm-server-sync-dir"
            raise ConfigError(f"{flag} is for --sampler vllm_server (this run uses --sampler {args.sampler}): add "
                              "--sampler vllm_server or drop it.")
        server = {"vllm_server_urls": args.vllm_server_url, "vllm_server_sync_dir": args.vllm_server_sync_dir}
        summary = generate(args.model, args.prompts, args.out, reward=reward, batch_size=args.batch_size,
                           sampling=sampling_config(args, num_samples=args.num_samples, sampler=args.sampler, **server),
                           seed=args.seed, system=args.system, max_prompt_length=args.max_prompt_length,
                           dtype=args.dtype, overwrite=args.overwrite)
    except AlignkitError as e:
        if os.environ.get("ALIGNKIT_DEBUG") == "1":
            raise
        message = " ".join(str(e).split())
        for key, flag in _SERVER_FLAGS.items():
            message = message.replace(key, flag)
        print(f"alignkit generate: error: {message}", file=sys.stderr)
        return 2
    score = "" if summary["mean_score"] is None else f", mean score {summary['mean_score']:.4g}"
    print(f"{summary['prompts']} prompts x {args.num_samples} responses written to {summary['out']}{score}")
    return 0


if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
