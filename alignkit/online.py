"""Pieces shared by the online RL recipes: PPO (:mod:`alignkit.methods.ppo`) and the critic-free family
RLOO / GRPO / REINFORCE++ (:mod:`alignkit.methods.pg`).

One online step (what ``training.max_steps``, ``logging_steps``, ``save_steps`` and checkpoint names count):

1. take the next ``rollout_batch_size`` prompts of this process (a seeded order that resume replays);
2. sample ``num_samples`` responses per prompt with the rollout engine (:mod:`alignkit.rollout`);
3. score them (:mod:`alignkit.rewards`);
4. once per rollout, without gradients: log-probs of the sampled tokens under the policy ("old") and the
   reference, and (PPO) the critic's values;
5. advantages (the method's estimator, :mod:`alignkit.losses.rl`);
6. ``ppo_epochs`` passes over the rollout in shuffled minibatches of ``training.per_device_batch_size x
   training.gradient_accumulation_steps`` rows, one optimizer update per minibatch.

The pure math lives in :mod:`alignkit.losses.rl`; this module has the config fields every online method
shares, the response-only forward pass, minibatching, loss normalisation, metric reduction and the
checkpointable method state. The loops themselves are written out in each method module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignkit.config import ConfigError, RunConfig, opt
from alignkit.engine import (
    CONFIG_FILE,
    BatchStream,
    TrainingError,
    check_output_dir,
    reduce_sum,
)
from alignkit.losses.logprobs import token_logps
from alignkit.losses.rl import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    entropy_from_logits,
    kl_estimate,
    ppo_policy_loss,
)
from alignkit.rewards import RewardConfig
from alignkit.rollout import GenerationConfig, Rollout

logger = logging.getLogger("alignkit")

KL_PENALTIES = ("reward", "loss")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------------------------------
# Config fields every online method shares
# --------------------------------------------------------------------------------------------------


@dataclass
class OnlineRLConfig(RewardConfig, GenerationConfig):
    """Sampling (GenerationConfig), reward (RewardConfig) and the policy-optimisation fields of online RL.

    Batch sizes, per process:  ``rollout_batch_size`` prompts x ``num_samples`` = sequences per rollout;
    those are cut into minibatches of ``training.per_device_batch_size x training.gradient_accumulation_steps``
    rows, one optimizer update each, and visited ``ppo_epochs`` times. ``training.num_epochs`` counts passes
    over the PROMPT set; ``training.max_steps`` counts rollouts.
    """

    rollout_batch_size: int = opt(8, "Prompts each process samples per step; x num_samples = sequences per rollout. "
                                     "Not training.per_device_batch_size (rows per training micro-batch).")
    ppo_epochs: int = opt(1, "Optimisation passes over EACH rollout batch (GRPO's mu). Not training.num_epochs, "
                             "which counts passes over the prompt set.")
    clip_eps: float = opt(0.2, "PPO clip range: the ratio pi/pi_old is clipped to [1 - clip_eps, 1 + clip_eps_high].")
    clip_eps_high: float | None = opt(None, "Upper clip range (DAPO clip-higher, e.g. 0.28); None = clip_eps.")
    loss_agg: str = opt("token-mean", "How per-token losses become one number: token-mean (every token weighs the "
                                      "same), seq-mean-token-mean (GRPO paper), seq-mean-token-sum-norm (Dr. GRPO: "
                                      "sum over tokens / max_new_tokens, mean over sequences).")
    kl_coef: float = opt(0.05, "KL coefficient beta (initial value when kl_target is set); 0 = no KL and no "
                               "reference model.")
    kl_penalty: str = opt("reward", "Where the KL to the reference goes: reward (subtracted from the reward, "
                                    "InstructGPT) or loss (kl_coef * KL added to the loss, GRPO).")
    kl_estimator: str = opt("k1", "KL estimator per token (Schulman 2020): k1 = log pi/pi_ref (unbiased, for "
                                  "kl_penalty reward), k2 = 0.5 (log ratio)^2, k3 = ratio - 1 - log ratio "
                                  "(unbiased, >= 0, for kl_penalty loss).")
    kl_clamp: float | None = opt(None, "Clamp each per-token KL estimate to [-kl_clamp, kl_clamp] (None: no clamp).")
    kl_target: float | None = opt(None, "Adaptive KL (Ziegler et al. 2019): the KL per sequence to aim for; None = "
                                        "fixed kl_coef.")
    kl_horizon: float = opt(10000.0, "Adaptive KL: sequences over which kl_coef moves by up to 20% towards the target.")
    entropy_coef: float = opt(0.0, "Entropy bonus: loss -= entropy_coef * entropy (aggregated like loss_agg).")
    ref_model: str | None = opt(None, "Reference model for the KL. None: the policy with its adapter off (lora/qlora) "
                                      "or a frozen copy of model.name_or_path (full).")
    disable_dropout: bool = opt(True, "Set dropout to 0 in the policy (and critic), so the old, reference and "
                                      "training log-probs of one token agree.")
    log_samples: int = opt(0, "Write this many (prompt, completion, reward) samples per logged step to "
                              "output_dir/samples.jsonl (0 = none).")

    def validate(self, run: RunConfig) -> None:
        m = run.method
        self.validate_generation(m)
        self.validate_reward(m)
        _choice(f"{m}.kl_penalty", self.kl_penalty, KL_PENALTIES)
        _choice(f"{m}.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice(f"{m}.loss_agg", self.loss_agg, LOSS_AGGS)
        checks = [
            ("rollout_batch_size", self.rollout_batch_size >= 1, "at least 1"),
            ("ppo_epochs", self.ppo_epochs >= 1, "at least 1"),
            ("clip_eps", self.clip_eps > 0, "> 0"),
            ("clip_eps_high", self.clip_eps_high is None or self.clip_eps_high > 0, "> 0 (or null)"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("kl_clamp", self.kl_clamp is None or self.kl_clamp > 0, "> 0 (or null)"),
            ("kl_target", self.kl_target is None or self.kl_target > 0, "> 0 (or null for a fixed kl_coef)"),
            ("kl_horizon", self.kl_horizon > 0, "> 0"),
            ("entropy_coef", self.entropy_coef >= 0, ">= 0"),
            ("log_samples", self.log_samples >= 0, ">= 0"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{m}.{key}={getattr(self, key)!r}: must be {rule}.")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ConfigError(f"{m}.kl_target is set but {m}.kl_coef=0: the adaptive coefficient is multiplied, so it "
                              f"would stay 0; give an initial {m}.kl_coef > 0 (e.g. 0.05).")
        t = run.training
        sequences = self.rollout_batch_size * self.num_samples
        minibatch = t.per_device_batch_size * t.gradient_accumulation_steps
        if sequences % minibatch:
            raise ConfigError(
                f"{m}.rollout_batch_size x {m}.num_samples = {self.rollout_batch_size} x {self.num_samples} = "
                f"{sequences} sequences per process per rollout, which is not a multiple of "
                f"training.per_device_batch_size x training.gradient_accumulation_steps = {t.per_device_batch_size} "
                f"x {t.gradient_accumulation_steps} = {minibatch} rows per optimizer update. Change one of them so "
                "the rollout splits into whole minibatches."
            )

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}.")


def sub_config(args: Any, cls: type) -> Any:
    """The ``cls`` part (GenerationConfig, RewardConfig) of a method config that embeds its fields."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def updates_per_rollout(args: OnlineRLConfig, t) -> int:
    """Optimizer updates in one ppo epoch over one rollout (validate() ensures it divides exactly)."""
    return (args.rollout_batch_size * args.num_samples) // (t.per_device_batch_size * t.gradient_accumulation_steps)


def build_kl_controller(args: OnlineRLConfig) -> FixedKLController | AdaptiveKLController:
    if args.kl_target is not None:
        return AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
    return FixedKLController(args.kl_coef)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout probability 0 everywhere: ``nn.Dropout`` modules (LoRA's too) and the functional attention
    dropout that Llama-style attention modules read from ``self.attention_dropout``."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


# --------------------------------------------------------------------------------------------------
# Prompts, steps, seeds
# --------------------------------------------------------------------------------------------------


def keep_rows(rows: list[dict]) -> list[dict]:
    """Collate for prompt batches: the dataset rows themselves."""
    return rows


def prompt_stream(rows: list[dict], args: OnlineRLConfig, accelerator, seed: int, method: str) -> BatchStream:
    """Batches of ``rollout_batch_size`` prompt rows per process, in a seeded order per epoch (resumable)."""
    world = accelerator.num_processes
    if len(rows) < args.rollout_batch_size * world:
        raise TrainingError(f"{len(rows)} prompts is less than one rollout ({method}.rollout_batch_size="
                            f"{args.rollout_batch_size} x {world} processes); lower {method}.rollout_batch_size "
                            "or add prompts.")
    return BatchStream(rows, keep_rows, batch_size=args.rollout_batch_size, world=world,
                       rank=accelerator.process_index, seed=seed)


def total_steps(t, batches_per_epoch: int) -> int:
    """Rollout steps to run: ``training.max_steps``, else ``training.num_epochs`` passes over the prompts."""
    if t.max_steps > 0:
        return t.max_steps
    return max(1, math.ceil(t.num_epochs * batches_per_epoch))


def step_seed(seed: int, step: int, rank: int, salt: int = 0) -> int:
    """A seed for step ``step`` on process ``rank``: sampling and minibatch order do not depend on the global
    RNG, so a resumed run draws exactly what the uninterrupted one drew."""
    return (((seed * 1_000_003 + step) * 101 + salt) * 4099 + rank) % (2**62)


def minibatches(n: int, size: int, seed: int) -> list[torch.Tensor]:
    """A seeded permutation of ``range(n)`` cut into index tensors of ``size`` rows (the last may be short)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return list(order.split(size))


# --------------------------------------------------------------------------------------------------
# Rollout tensors and the response-only forward pass
# --------------------------------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """``[prompt | response]`` rows ready for a forward pass; responses start at column ``prompt_width``."""

    input_ids: torch.Tensor  # [N, P+R]
    attention_mask: torch.Tensor  # [N, P+R]
    position_ids: torch.Tensor  # [N, P+R], counted over real tokens (what generate used)
    response_ids: torch.Tensor  # [N, R]
    response_mask: torch.Tensor  # [N, R]

    @classmethod
    def from_rollout(cls, rollout: Rollout) -> RolloutBatch:
        input_ids, attention_mask = rollout.sequences()
        return cls(input_ids, attention_mask, rollout.position_ids(), rollout.response_ids, rollout.response_mask)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_width

    def select(self, index: torch.Tensor) -> RolloutBatch:
        """Rows ``index``, without the columns that are padding in all of them (left of the longest prompt,
        right of the longest response): less compute, same log-probs (positions follow the mask)."""
        index = index.to(self.input_ids.device)
        P = self.prompt_width
        prompt_used = self.attention_mask[index, :P].any(0)
        left = int(prompt_used.float().argmax()) if bool(prompt_used.any()) else P - 1
        width = max(int(self.response_mask[index].sum(1).max()), 1)
        cols = slice(left, P + width)
        return RolloutBatch(self.input_ids[index, cols], self.attention_mask[index, cols],
                            self.position_ids[index, cols], self.response_ids[index, :width],
                            self.response_mask[index, :width])


@dataclass
class ResponseOutput:
    logps: torch.Tensor  # [B, R] log-probs of the response tokens (float32), 0 off-mask
    entropy: torch.Tensor | None = None  # [B, R] entropy of the sampling distribution per position
    values: torch.Tensor | None = None  # [B, R] critic values V(s_t) (PPO)


def response_forward(model, batch: RolloutBatch, temperature: float, *, entropy: bool = False,
                     entropy_grad: bool = False, **model_kwargs: Any) -> ResponseOutput:
    """Log-probs (and optionally entropies / values) of the response tokens of ``batch``.

    The LM head runs only on the ``R + 1`` last positions (``logits_to_keep``): positions ``P-1 .. P+R-2``
    predict the ``R`` response tokens, prompt positions never reach the vocabulary projection. Logits are
    divided by the sampling ``temperature`` (the distribution the tokens were drawn from), and the sampled
    tokens' log-probs are gathered with :func:`selective_log_softmax` (no ``[B, R, V]`` log-softmax copy).
    A model output with ``token_values`` (PPO's policy+critic wrapper) gets them sliced to the same positions.
    """
    keep = batch.response_width + 1
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False, **model_kwargs)
    try:
        out = model(**kwargs, logits_to_keep=keep)
    except TypeError:  # a model class without logits_to_keep: full logits, sliced below
        out = model(**kwargs)
    logits = out.logits[:, -keep:-1]
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logps = token_logps(logits, batch.response_ids, mask=batch.response_mask)
    ent = None
    if entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(logits if entropy_grad else logits.detach()).float()
            ent = ent * batch.response_mask
    values = getattr(out, "token_values", None)  # not "values": HF outputs are dicts with a values() method
    if values is not None:
        values = values[:, -keep:-1].float()
    return ResponseOutput(logps=logps, entropy=ent, values=values)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


@torch.no_grad()
def score_rollout(model, batch: RolloutBatch, temperature: float, micro_batch_size: int, *, autocast=None,
                  entropy: bool = False, **model_kwargs: Any) -> ResponseOutput:
    """:func:`response_forward` over the whole rollout in micro-batches, without gradients, in eval mode
    (the model's mode comes back after). Every process runs the same number of forwards (ZeRO-3 safe)."""
    import contextlib

    was_training = model.training
    model.eval()
    parts: list[ResponseOutput] = []
    try:
        for index in torch.arange(len(batch)).split(micro_batch_size):
            with autocast() if autocast is not None else contextlib.nullcontext():
                parts.append(response_forward(model, batch.select(index), temperature, entropy=entropy,
                                              **model_kwargs))
    finally:
        model.train(was_training)
    R = batch.response_width

    def cat(name: str) -> torch.Tensor | None:
        xs = [getattr(p, name) for p in parts]
        return None if xs[0] is None else torch.cat([_pad_to(x, R) for x in xs])

    return ResponseOutput(logps=cat("logps"), entropy=cat("entropy"), values=cat("values"))


def reference_logps(model, batch: RolloutBatch, temperature: float, micro_batch_size: int, *, ref_model=None,
                    adapter_model=None, autocast=None, **model_kwargs: Any) -> torch.Tensor:
    """Log-probs of the response tokens under the reference: the frozen ``ref_model`` when given, else
    ``model`` with the LoRA adapter of ``adapter_model`` (the policy inside it) switched off."""
    from alignkit.models import adapters_disabled

    if ref_model is not None:
        return score_rollout(ref_model, batch, temperature, micro_batch_size, autocast=autocast).logps
    with adapters_disabled(adapter_model if adapter_model is not None else model):
        return score_rollout(model, batch, temperature, micro_batch_size, autocast=autocast, **model_kwargs).logps


# --------------------------------------------------------------------------------------------------
# Losses: exact normalisation over a minibatch spread across micro-batches and processes
# --------------------------------------------------------------------------------------------------


def loss_items(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """What ``loss_agg`` averages over, counted in ``mask`` ``[B, T]``: tokens (token-mean), sequences with at
    least one token (seq-mean-token-mean) or rows (seq-mean-token-sum-norm). A float scalar tensor.

    ``aggregate_loss(x, mask, loss_agg) * loss_items(mask, loss_agg)`` is then a *sum* over items, which can
    be added over micro-batches and processes and divided by the global count: the minibatch loss is the
    same however it is split.
    """
    mask_b = mask != 0
    if loss_agg == "token-mean":
        n = mask_b.sum()
    elif loss_agg == "seq-mean-token-mean":
        n = mask_b.any(1).sum()
    elif loss_agg == "seq-mean-token-sum-norm":
        n = torch.tensor(mask.shape[0], device=mask.device)
    else:
        raise ValueError(f"loss_items: unknown loss_agg={loss_agg!r}; use one of {', '.join(LOSS_AGGS)}.")
    return n.to(torch.float32)


@dataclass
class PolicyTerms:
    loss_sum: torch.Tensor  # (policy loss + kl_coef * KL loss - entropy_coef * entropy) * loss_items
    stats: dict[str, tuple[float, float]]  # name -> (sum, count) for MetricSums


def policy_terms(out: ResponseOutput, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 args: OnlineRLConfig, *, kl_coef: float, ref_logps: torch.Tensor | None) -> PolicyTerms:
    """The policy side of the loss on one micro-batch, as a sum over ``loss_agg`` items.

    ``L = ppo_policy_loss(clip_eps, clip_eps_high) + [kl_penalty == loss] kl_coef * KL_est(pi || ref)
    - entropy_coef * H``, each aggregated with ``loss_agg`` (Dr. GRPO's constant is ``max_new_tokens``).
    """
    items = loss_items(mask, args.loss_agg)
    n_tokens = float(mask.sum())
    pg, st = ppo_policy_loss(out.logps, old_logps, advantages, mask, clip_eps=args.clip_eps,
                             clip_eps_high=args.clip_eps_high, loss_agg=args.loss_agg,
                             max_length=args.max_new_tokens)
    loss = pg
    stats = {"loss/policy": (float(pg.detach()) * float(items), float(items)),
             "clipfrac": (float(st["clipfrac"]) * n_tokens, n_tokens),
             "approx_kl": (float(st["approx_kl"]) * n_tokens, n_tokens),
             "ratio": (float(st["ratio_mean"]) * n_tokens, n_tokens)}
    if args.kl_penalty == "loss" and ref_logps is not None:
        kl_tok = kl_estimate(out.logps, ref_logps, args.kl_estimator, clamp=args.kl_clamp)
        kl_loss = aggregate_loss(kl_tok, mask, args.loss_agg, args.max_new_tokens)
        loss = loss + kl_coef * kl_loss
        stats["loss/kl"] = (float(kl_loss.detach()) * float(items), float(items))
    if out.entropy is not None:
        ent = aggregate_loss(out.entropy, mask, args.loss_agg, args.max_new_tokens)
        if args.entropy_coef > 0:
            loss = loss - args.entropy_coef * ent
        stats["entropy"] = (float(out.entropy.detach().sum()), n_tokens)
    return PolicyTerms(loss_sum=loss * items, stats=stats)


def global_counts(accelerator, *local: float | torch.Tensor) -> list[float]:
    """Counts summed over processes (one all-reduce), each at least 1 (they are denominators)."""
    return [max(x, 1.0) for x in reduce_sum(accelerator, [float(x) for x in local])]


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


class MetricSums:
    """Metrics of one step on this process, reduced over processes by :meth:`means` in one all-reduce.

    ``add(name, total, count)`` accumulates a mean (sum and count are summed over processes, then divided);
    ``add_total(name, value)`` a quantity summed over processes (tokens/s). Every process must add the same
    names (they become one vector).
    """

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}
        self.totals: dict[str, float] = {}

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(count)

    def add_total(self, name: str, value: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(value)

    def add_values(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Mean and (population) standard deviation of ``values`` (where ``mask``) as ``name``, ``name_std``."""
        v = values.detach().double()
        if mask is not None:
            m = (mask != 0).to(v.dtype)
            v, n = v * m, float(m.sum())
        else:
            n = float(v.numel())
        self.add(name, float(v.sum()), n)
        self.add(f"{name}_std", float((v * v).sum()), n)  # E[x^2] until means() turns it into a std

    def means(self, accelerator=None) -> dict[str, float]:
        names, total_names = sorted(self.sums), sorted(self.totals)
        flat = ([self.sums[k][0] for k in names] + [self.sums[k][1] for k in names]
                + [self.totals[k] for k in total_names])
        if accelerator is not None:
            flat = reduce_sum(accelerator, flat)
        n = len(names)
        out = {k: s / c if c else 0.0 for k, s, c in zip(names, flat[:n], flat[n:2 * n])}
        for k in names:
            if k.endswith("_std") and k[:-4] in out:
                out[k] = math.sqrt(max(out[k] - out[k[:-4]] ** 2, 0.0))
        out.update(zip(total_names, flat[2 * n:]))
        return out


def reward_metrics(metrics: MetricSums, result, rollout: Rollout) -> None:
    """Reward (combined = weighted sum of the sources, and final = after EOS penalty / normalisation /
    clipping), each source's raw score, response length and the share that ended with EOS."""
    metrics.add_values("reward", result.combined)
    metrics.add_values("reward/final", result.rewards)
    for name, scores in result.raw.items():
        metrics.add(f"reward/{name}", float(scores.double().sum()), scores.numel())
    lengths = rollout.response_lengths.double()
    metrics.add("response_length", float(lengths.sum()), lengths.numel())
    metrics.add("ended_with_eos", float(rollout.ended_with_eos.double().sum()), lengths.numel())


def write_samples(path: Path, step: int, rollout: Rollout, rows: list[dict], result, limit: int) -> None:
    """Append up to ``limit`` (prompt, completion, rewards) records of this process's rollout to ``path``."""
    from alignkit.rewards import prompt_text

    with open(path, "a") as f:
        for i in range(min(limit, len(rollout))):
            prompt = rows[int(rollout.prompt_index[i])]["prompt"]
            record = {"step": step, "prompt": prompt_text(prompt), "completion": rollout.response_texts[i],
                      "reward": float(result.combined[i]), "reward/final": float(result.rewards[i]),
                      "ended_with_eos": bool(rollout.ended_with_eos[i])}
            record.update({f"reward/{k}": float(v[i]) for k, v in result.raw.items()})
            f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------------
# Run bookkeeping: output dir, method state, optimizer updates, step timing
# --------------------------------------------------------------------------------------------------


def start_run(accelerator, cfg: RunConfig) -> Path | None:
    """Decide where to resume from (refusing to overwrite a run) and write the run config."""
    resume_from = check_output_dir(cfg.training)  # before anything is written
    accelerator.wait_for_everyone()  # every process has checked before the main one writes the config
    out = Path(cfg.training.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)
    return resume_from


class OnlineState:
    """The method state a checkpoint carries: the KL coefficient (adaptive controllers move it) and the
    running reward statistics (``reward_normalize: running``). Identical on every process."""

    def __init__(self, kl_controller, reward) -> None:
        self.kl_controller, self.reward = kl_controller, reward

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_controller.state_dict(), "reward": self.reward.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
        if "reward" in state:
            self.reward.load_state_dict(state["reward"])


class StepTimer:
    """Wall time of a step and of its generation phase (``gen_share`` = generation / step)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.generation = 0.0
        self._mark = self.start

    def mark(self) -> None:
        self._mark = time.perf_counter()

    def generation_done(self) -> None:
        self.generation += time.perf_counter() - self._mark

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)


def step_metrics(metrics: MetricSums, timer: StepTimer, rollout: Rollout) -> None:
    """Generation share of the step time and tokens (prompt + response) per second, per process (tok/s is
    summed over processes, gen_share averaged)."""
    elapsed = timer.elapsed()
    tokens = float(rollout.prompt_mask.sum() + rollout.response_mask.sum())
    metrics.add("gen_share", timer.generation / elapsed, 1.0)
    metrics.add("step_time", elapsed, 1.0)
    metrics.add_total("tok/s", tokens / elapsed)
