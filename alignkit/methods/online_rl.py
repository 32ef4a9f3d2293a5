"""Online RL: PPO, RLOO, GRPO (and Dr. GRPO), REINFORCE++ in one policy-optimisation loop.

The method picks its advantage estimator (the pure functions of :mod:`alignkit.losses.rl`); PPO is this loop
with a critic and GAE. One step (what ``training.max_steps``, ``logging_steps``, ``save_steps`` and
checkpoint names count), on each process:

1. **rollout**: the next ``rollout_batch_size`` prompts (a seeded order that resume replays), then
   ``generation.num_samples`` responses each (:mod:`alignkit.rollout`; ZeRO-3 gathers once per rollout). With
   ``environment.factory``, multi-turn episodes instead (:mod:`alignkit.rollout.multiturn`): every mask below
   is then the action mask, so the tokens the environment added are in the context but in no loss. With
   ``async_steps: k`` the rollout was sampled while earlier steps trained, by the policy of up to ``k`` updates
   ago (:mod:`alignkit.rollout.ahead`; the weights go to the sampler after each update);
2. **rewards**: the reward sources, summed and post-processed (:mod:`alignkit.rewards`), + DAPO's overlong
   penalty (``overlong_buffer``). ``dynamic_sampling`` (GRPO, RLOO): groups whose rewards are all equal are
   dropped and the batch refilled from further prompts of the stream (:func:`refill_groups`);
3. without gradients, once per rollout: the "old" log-probs of the sampled tokens (and PPO's critic values)
   when they can differ from the training pass, and the reference's (when ``kl_coef > 0``);
   ``mismatch_seq_threshold`` drops the sequences whose old and sampler log-probs disagree;
4. **advantages**, by method:

   - ``ppo``: token rewards ``r_t = -kl_coef * KL_t`` (+ the score at the last token), then GAE(gamma, lam)
     against the critic's values (Ziegler et al. 2019; Ouyang et al. 2022);
   - ``rloo``: ``A_i = s_i - mean_{j != i} s_j`` over the samples of a prompt (Ahmadian et al. 2024),
     ``s = reward - kl_coef * sum_t KL_t`` when ``kl_penalty: reward``;
   - ``grpo``: ``A_i = (s_i - mean_group) / std_group`` (``scale_rewards: group``; ``batch`` uses the batch
     std; ``none`` no division = Dr. GRPO), KL as a k3 loss term by default (Shao et al. 2024);
   - ``reinforce_pp``: token rewards ``r_t = -kl_coef * KL_t`` (+ score at the end), return-to-go with
     ``gamma``, whitened over the batch (Hu 2025);

   then, when ``whiten_advantages`` (PPO's default), whitened over the rollout's response tokens;
5. **updates**: ``ppo_epochs`` passes over the rollout in shuffled minibatches of ``per_device_batch_size x
   gradient_accumulation_steps`` rows, one optimizer update each: the ``policy_loss`` (PPO's clipped
   surrogate with ``clip_eps``, ``clip_eps_high``; GSPO; CISPO: :mod:`alignkit.losses.policy`) [+ ``kl_coef``
   * KL when ``kl_penalty: loss``, times pi/pi_old when ``kl_ratio_weight``] - ``entropy_coef`` * entropy,
   aggregated by ``loss_agg``, [+ ``vf_coef`` * clipped value loss for PPO]. With one update per rollout the ratio is 1
   and this is REINFORCE with the method's baseline;
6. **log and checkpoint**: the adaptive KL controller (``kl_target``) moves ``kl_coef``; metrics, samples,
   checkpoints (exact resume: policy, critic, optimizer, scheduler, KL controller, reward statistics, RNG).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from alignkit.config import ConfigError, RunConfig, check_choice, opt
from alignkit.critic import (
    CRITIC_INITS,
    PolicyAndCritic,
    PolicyCriticCheckpointer,
    load_critic,
    rollout_values,
)
from alignkit.data import build_datasets
from alignkit.forward import ResponseOutput, choose_layout, response_forward, score_rollout
from alignkit.losses.policy import (
    cispo_policy_loss,
    groups_with_signal,
    gspo_policy_loss,
    mismatch_sequence_mask,
    overlong_penalty,
)
from alignkit.losses.rl import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_loss_tokens,
    loss_items,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    value_loss,
)
from alignkit.models import load_model, load_tokenizer, resolve_dtype, unwrap_model
from alignkit.reference import load_reference, reference_logps
from alignkit.rewards import RewardResult, RewardSourcesConfig, build_reward, episode_rewards, prompt_text
from alignkit.rollout import Rollout, RolloutBatch, SamplingConfig, build_sampler
from alignkit.rollout.ahead import rollouts_ahead
from alignkit.rollout.multiturn import EnvironmentConfig, MultiTurnSampler
from alignkit.training import (
    Checkpointer,
    prepare_frozen,
    prepare_output_dir,
    setup_accelerator,
    start_training,
)
from alignkit.training.accelerator import any_process, global_counts
from alignkit.training.batches import BatchStream, derived_seed, minibatches
from alignkit.training.tracking import MetricSums, cut_jsonl

logger = logging.getLogger("alignkit")

KL_PENALTIES = ("reward", "loss")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
SCALE_REWARDS = ("group", "batch", "none")
POLICY_LOSSES = ("ppo_clip", "gspo", "cispo")
MISMATCH_LEVELS = ("geometric", "sequence")


# --------------------------------------------------------------------------------------------------
# Config: the fields every online method shares, then each method's own defaults and fields
# --------------------------------------------------------------------------------------------------


@dataclass
class OnlineRLConfig:
    """Batch sizes, per process: ``rollout_batch_size`` prompts x ``generation.num_samples`` = sequences per
    rollout; those are cut into minibatches of ``training.per_device_batch_size x
    training.gradient_accumulation_steps`` rows, one optimizer update each, and visited ``ppo_epochs`` times.
    ``training.num_epochs`` counts passes over the PROMPT set; ``training.max_steps`` counts rollouts.
    """

    generation: SamplingConfig = opt(factory=SamplingConfig, doc="How responses are sampled.")
    reward: RewardSourcesConfig = opt(factory=RewardSourcesConfig, doc="Where rewards come from (at least one source).")
    rollout_batch_size: int = opt(8, "Prompts each process samples per step; x generation.num_samples = sequences per "
                                     "rollout. Not training.per_device_batch_size (rows per training micro-batch).")
    ppo_epochs: int = opt(1, "Optimisation passes over EACH rollout batch (GRPO's mu). Not training.num_epochs, "
                             "which counts passes over the prompt set.")
    clip_eps: float = opt(0.2, "PPO clip range: the ratio pi/pi_old is clipped to [1 - clip_eps, 1 + clip_eps_high].")
    clip_eps_high: float | None = opt(None, "Upper clip range (DAPO clip-higher, e.g. 0.28); None = clip_eps.")
    loss_agg: str = opt("token-mean", "How per-token losses become one number: token-mean (every token weighs the "
                                      "same), seq-mean-token-mean (GRPO paper), seq-mean-token-sum-norm (Dr. GRPO: "
                                      "sum over tokens / max_new_tokens, mean over sequences).")
    whiten_advantages: bool = opt(False, "Whiten the advantages over the rollout's response tokens (mean 0, std 1) "
                                         "before the loss.")
    kl_coef: float = opt(0.05, "KL coefficient beta (initial value when kl_target is set); 0 = no KL and no "
                               "reference model.")
    kl_penalty: str = opt("reward", "Where the KL to the reference goes: reward (subtracted from the reward, "
                                    "InstructGPT) or loss (kl_coef * KL added to the loss, GRPO).")
    kl_estimator: str = opt("k1", "KL estimator per token (Schulman 2020): k1 = log pi/pi_ref (unbiased, for "
                                  "kl_penalty reward), k2 = 0.5 (log ratio)^2, k3 = ratio - 1 - log ratio "
                                  "(unbiased, >= 0, for kl_penalty loss).")
    kl_clamp: float | None = opt(None, "Clamp each per-token KL estimate to [-kl_clamp, kl_clamp] (None: no clamp).")
    kl_ratio_weight: bool = opt(False, "kl_penalty loss: multiply each token's KL term by pi/pi_old (1 in value, "
                                       "not in gradient), so that its gradient is the true gradient of KL(pi || "
                                       "ref) (DeepSeek-V3.2; TRL 1.16's use_bias_correction_kl, on by default "
                                       "there). false: the GRPO paper's plain k3 term, whose pull back to the "
                                       "reference is capped.")
    kl_target: float | None = opt(None, "Adaptive KL (Ziegler et al. 2019): the KL per sequence to aim for; None = "
                                        "fixed kl_coef.")
    kl_horizon: float = opt(10000.0, "Adaptive KL: sequences over which kl_coef moves by up to 20% towards the target.")
    entropy_coef: float = opt(0.0, "Entropy bonus: loss -= entropy_coef * entropy (aggregated like loss_agg).")
    reuse_sampler_logps: bool = opt(True, "Take the old log-probs from the HF sampler (which computed them while "
                                          "sampling) when they equal the trainer's up to float error: fp32 weights, "
                                          "no mixed precision, no top-k/top-p. One policy forward less per rollout; "
                                          "false always recomputes them.")
    tis_cap: float | None = opt(None, "Truncated importance sampling for the sampler/trainer mismatch (Yao et al. "
                                      "2025; OpenRLHF, verl): each token's policy loss is weighted by "
                                      "min(pi_old/pi_sampler, tis_cap), pi_sampler being the sampler's own "
                                      "log-prob (vLLM's kernels differ from training's). None = off; e.g. 2.0.")
    mismatch_seq_threshold: float = opt(0.0, "Sequence-level rejection of the sampler/trainer mismatch, beside "
                                             "tis_cap (verl's rollout_rs): a sequence whose ratio rho = pi_old/"
                                             "pi_sampler (mismatch_seq_level) leaves [1/threshold, threshold] is "
                                             "dropped from the loss whole. 0 = off; e.g. 1.01 (geometric) or 5 "
                                             "(sequence). Any method; with the HF sampler in fp32 rho is 1.")
    mismatch_seq_level: str = opt("geometric", "rho of mismatch_seq_threshold: geometric (exp of the mean "
                                               "per-token log ratio) or sequence (the product over the sequence).")
    async_steps: int = opt(0, "Asynchronous rollouts (docs/rollouts_and_rewards.md): the rollouts of the next "
                              "async_steps steps are sampled while the current step trains, by a policy at most "
                              "async_steps updates old (logged as async/staleness); the trainer recomputes the old "
                              "log-probs, tis_cap / mismatch_seq_threshold correct for the sampler's. 0 = sample "
                              "each step's rollout right before it trains. hf or vllm_server.")
    policy_loss: str = opt("ppo_clip", "Policy objective (docs/reasoning.md): ppo_clip (token ratio clipped to "
                                       "clip_eps/clip_eps_high), gspo (sequence ratio, gspo_clip_eps*; meant for "
                                       "GRPO/RLOO's sequence advantages, with PPO/REINFORCE++ each token keeps its "
                                       "advantage but shares its sequence's ratio) or cispo (clipped, detached "
                                       "token weight: every token keeps a gradient; cispo_clip_eps_*). Aggregated "
                                       "by loss_agg.")
    gspo_clip_eps: float = opt(3e-4, "GSPO: the sequence ratio is clipped to [1 - gspo_clip_eps, 1 + "
                                     "gspo_clip_eps_high] (the paper's 3e-4, 4e-4); only with policy_loss gspo.")
    gspo_clip_eps_high: float | None = opt(4e-4, "GSPO upper clip range; None = gspo_clip_eps.")
    cispo_clip_eps_high: float = opt(4.0, "CISPO: the detached token weight is capped at 1 + cispo_clip_eps_high "
                                          "(5, TRL's recommended cap); only with policy_loss cispo.")
    cispo_clip_eps_low: float | None = opt(None, "CISPO: lower bound 1 - cispo_clip_eps_low of the weight; None = "
                                                 "unbounded below (the paper).")
    overlong_buffer: int = opt(0, "DAPO's overlong shaping (L_cache): a response longer than "
                                  "generation.max_new_tokens - overlong_buffer gets a reward penalty growing "
                                  "linearly to -overlong_penalty_factor at max_new_tokens, added to the final reward "
                                  "(after normalisation/clipping). 0 = off. Every method; not with environment "
                                  "(episode lengths are not one generation's).")
    overlong_penalty_factor: float = opt(1.0, "Size of the overlong_buffer penalty at generation.max_new_tokens.")
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling, GRPO/RLOO only (PPO and REINFORCE++ have no "
                                        "groups): groups whose final rewards are all equal carry no advantage and "
                                        "are dropped; the batch is refilled with groups from further prompts of "
                                        "the prompt stream (logged as dynamic_sampling/refilled). Not with "
                                        "environment.")
    max_refill_rounds: int = opt(4, "dynamic_sampling: at most this many extra batches of rollout_batch_size "
                                    "prompts per step; if the batch is still short, groups without signal fill it "
                                    "(logged as dynamic_sampling/short).")
    ref_model: str | None = opt(None, "Reference model for the KL. None: the policy with its adapter off (lora/qlora) "
                                      "or a frozen copy of model.name_or_path (full).")
    padding_free: bool = opt(True, "Pack each micro-batch's sequences (prompt + response, no padding) end to end "
                                   "with restarting position ids for the old, reference and training forwards; "
                                   "same log-probs, no pad token computed. Padded where the attention cannot.")
    disable_dropout: bool = opt(True, "Set dropout to 0 in the policy (and critic), so the old, reference and "
                                      "training log-probs of one token agree.")
    log_samples: int = opt(0, "Write this many (prompt, completion, reward) samples per logged step to "
                              "output_dir/samples.jsonl (0 = none).")
    environment: EnvironmentConfig = opt(factory=EnvironmentConfig, doc="Multi-turn episodes with an environment "
                                         "(docs/agents.md): its episode rewards join the reward sources; only the "
                                         "sampled tokens are trained on.")

    def validate(self, run: RunConfig) -> None:
        m = run.method
        self.generation.check(f"{m}.generation")
        self.reward.check(f"{m}.reward", other_sources=self.environment.enabled)
        self.environment.check(f"{m}.environment")
        if self.environment.enabled and self.generation.sampler == "vllm_server":
            raise ConfigError(f"{m}.environment: multi-turn episodes run on the hf and vllm samplers, not "
                              f"{m}.generation.sampler=vllm_server; set {m}.generation.sampler=vllm (colocated) or hf.")
        sampler = self.generation.sampler
        if run.training.fsdp and sampler in ("vllm", "vllm_server") and (
                m == "ppo" or (sampler == "vllm_server" and self.generation.vllm_server_lora
                               and run.model.finetune in ("lora", "qlora"))):
            # the weights sent to vLLM would be FSDP2 shards: PPO's policy sits inside its policy-and-critic
            # module, and an adapter is read without gathering it
            what = "ppo" if m == "ppo" else f"a {run.model.finetune} adapter sent to the servers"
            fix = ("use training.deepspeed=zero3 or generation.sampler=hf" if m == "ppo"
                   else f"set {m}.generation.vllm_server_lora=false (merged weights are gathered), or use DeepSpeed")
            raise ConfigError(f"training.fsdp={run.training.fsdp} with {m}.generation.sampler={sampler}: {what} under "
                              f"FSDP2 would send weight shards to vLLM; {fix}.")
        check_choice(f"{m}.kl_penalty", self.kl_penalty, KL_PENALTIES)
        check_choice(f"{m}.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_choice(f"{m}.loss_agg", self.loss_agg, LOSS_AGGS)
        checks = [
            ("rollout_batch_size", self.rollout_batch_size >= 1, "at least 1"),
            ("ppo_epochs", self.ppo_epochs >= 1, "at least 1"),
            ("clip_eps", self.clip_eps > 0, "> 0"),
            ("clip_eps_high", self.clip_eps_high is None or self.clip_eps_high > 0, "> 0 (or null)"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("kl_clamp", self.kl_clamp is None or self.kl_clamp > 0, "> 0 (or null)"),
            ("kl_target", self.kl_target is None or self.kl_target > 0, "> 0 (or null for a fixed kl_coef)"),
            ("kl_horizon", self.kl_horizon > 0, "> 0"),
            ("tis_cap", self.tis_cap is None or self.tis_cap >= 1, ">= 1 (or null for no correction)"),
            ("mismatch_seq_threshold", self.mismatch_seq_threshold == 0 or self.mismatch_seq_threshold > 1,
             "> 1 (or 0 for off)"),
            ("gspo_clip_eps", self.gspo_clip_eps > 0, "> 0"),
            ("gspo_clip_eps_high", self.gspo_clip_eps_high is None or self.gspo_clip_eps_high > 0, "> 0 (or null)"),
            ("cispo_clip_eps_high", self.cispo_clip_eps_high > 0, "> 0"),
            ("cispo_clip_eps_low", self.cispo_clip_eps_low is None or 0 < self.cispo_clip_eps_low <= 1,
             "in (0, 1] (or null for no lower bound)"),
            ("overlong_buffer", 0 <= self.overlong_buffer <= self.generation.max_new_tokens,
             f"in [0, generation.max_new_tokens={self.generation.max_new_tokens}]"),
            ("overlong_penalty_factor", self.overlong_penalty_factor >= 0, ">= 0"),
            ("max_refill_rounds", self.max_refill_rounds >= 0, ">= 0"),
            ("entropy_coef", self.entropy_coef >= 0, ">= 0"),
            ("log_samples", self.log_samples >= 0, ">= 0"),
        ]
        for key, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{m}.{key}={getattr(self, key)!r}: must be {rule}.")
        check_choice(f"{m}.policy_loss", self.policy_loss, POLICY_LOSSES)
        check_choice(f"{m}.mismatch_seq_level", self.mismatch_seq_level, MISMATCH_LEVELS)
        self._check_async(run)
        if self.dynamic_sampling and m not in ("grpo", "rloo"):
            raise ConfigError(f"{m}.dynamic_sampling: {m} has no groups of samples per prompt to filter; it is for "
                              "grpo and rloo only, set it to false.")
        for key, on in (("dynamic_sampling", self.dynamic_sampling), ("overlong_buffer", self.overlong_buffer > 0)):
            if on and self.environment.enabled:
                raise ConfigError(f"{m}.{key} is not supported with {m}.environment (multi-turn episodes) yet; "
                                  "turn one of them off.")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ConfigError(f"{m}.kl_target is set but {m}.kl_coef=0: the adaptive coefficient is multiplied, so it "
                              f"would stay 0; give an initial {m}.kl_coef > 0 (e.g. 0.05).")
        t, n = run.training, self.generation.num_samples
        sequences = self.rollout_batch_size * n
        minibatch = t.per_device_batch_size * t.gradient_accumulation_steps
        if sequences % minibatch:
            raise ConfigError(
                f"{m}.rollout_batch_size x {m}.generation.num_samples = {self.rollout_batch_size} x {n} = "
                f"{sequences} sequences per process per rollout, which is not a multiple of "
                f"training.per_device_batch_size x training.gradient_accumulation_steps = {t.per_device_batch_size} "
                f"x {t.gradient_accumulation_steps} = {minibatch} rows per optimizer update. Change one of them so "
                "the rollout splits into whole minibatches."
            )

    def _check_async(self, run: RunConfig) -> None:
        m, sampler, t = run.method, self.generation.sampler, run.training
        if self.async_steps < 0:
            raise ConfigError(f"{m}.async_steps={self.async_steps}: must be >= 0 (0 = synchronous).")
        if not self.async_steps:
            return
        off = f"or set {m}.async_steps: 0"
        why = {"dynamic_sampling": self.dynamic_sampling and "its refills draw prompts at training time",
               "environment": self.environment.enabled and "multi-turn episodes sample between updates"}
        for key, reason in why.items():
            if reason:
                raise ConfigError(f"{m}.async_steps with {m}.{key}: {reason}; turn {key} off {off}.")
        if sampler == "vllm":
            raise ConfigError(f"{m}.async_steps with {m}.generation.sampler=vllm: the colocated engine samples in the "
                              f"training process between updates; use generation.sampler=vllm_server (or hf) {off}.")
        if sampler == "hf" and (t.fsdp or t.deepspeed not in (None, "zero1", "zero2")):
            raise ConfigError(f"{m}.async_steps with generation.sampler=hf samples from a copy of the policy, which "
                              f"training.{'fsdp' if t.fsdp else 'deepspeed'} shards; use generation.sampler="
                              f"vllm_server {off}.")
        if sampler == "hf" and not self.disable_dropout:
            raise ConfigError(f"{m}.async_steps with generation.sampler=hf seeds torch's global generator while "
                              f"training runs, which dropout draws from; set {m}.disable_dropout: true {off}.")

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0


@dataclass
class PPOConfig(OnlineRLConfig):
    ppo_epochs: int = opt(4, "Optimisation passes over EACH rollout batch (not training.num_epochs, which counts "
                             "passes over the prompt set).")
    whiten_advantages: bool = opt(True, "Whiten the advantages over the rollout's response tokens (mean 0, std 1) "
                                        "before the loss.")
    critic_init: str = opt("policy", "Critic weights: policy (the policy checkpoint + a zero value head) or "
                                     "reward_model (reward.model; needs the policy's tokenizer).")
    gamma: float = opt(1.0, "GAE discount over response tokens (1 = undiscounted; the reward comes at the end).")
    lam: float = opt(0.95, "GAE lambda: 1 = Monte-Carlo returns (high variance), 0 = one-step TD (high bias).")
    vf_coef: float = opt(0.1, "Weight of the value loss in the total loss.")
    value_clip: bool = opt(True, "Clip the value loss: V may move at most value_clip_range from its rollout value.")
    value_clip_range: float = opt(0.2, "Clip range of the value loss (absolute, in reward units).")

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        check_choice("ppo.critic_init", self.critic_init, CRITIC_INITS)
        if self.critic_init == "reward_model" and not self.reward.model:
            raise ConfigError("ppo.critic_init=reward_model but ppo.reward.model is not set; set it, or use "
                              "ppo.critic_init=policy.")
        for key, ok, rule in [("gamma", 0 <= self.gamma <= 1, "in [0, 1]"), ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
                              ("vf_coef", self.vf_coef >= 0, ">= 0"),
                              ("value_clip_range", self.value_clip_range > 0, "> 0")]:
            if not ok:
                raise ConfigError(f"ppo.{key}={getattr(self, key)!r}: must be {rule}.")


def _check_group(run: RunConfig, n: int) -> None:
    if n < 2:
        raise ConfigError(f"{run.method}.generation.num_samples={n}: the group baseline needs at least 2 samples per "
                          "prompt (e.g. 4).")


@dataclass
class RLOOConfig(OnlineRLConfig):
    generation: SamplingConfig = opt(factory=lambda: SamplingConfig(num_samples=4),
                                     doc="How responses are sampled; num_samples is k, the group of the "
                                         "leave-one-out baseline (the mean reward of the other k-1).")
    kl_coef: float = opt(0.05, "KL coefficient beta; with kl_penalty reward the score becomes reward - beta * "
                               "sum_t KL_t before the leave-one-out baseline.")

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        _check_group(run, self.generation.num_samples)


@dataclass
class GRPOConfig(OnlineRLConfig):
    generation: SamplingConfig = opt(factory=lambda: SamplingConfig(num_samples=8),
                                     doc="How responses are sampled; num_samples is G, the group whose mean "
                                         "(and std) normalise the rewards.")
    kl_coef: float = opt(0.04, "beta of the KL loss term (0 = no KL and no reference model).")
    kl_penalty: str = opt("loss", "loss (GRPO: beta * KL added to the loss per token) or reward (subtracted from "
                                  "the sequence reward before group normalisation).")
    kl_estimator: str = opt("k3", "k3 (GRPO's unbiased, non-negative estimator), k2 or k1.")
    loss_agg: str = opt("seq-mean-token-mean", "seq-mean-token-mean (GRPO paper), token-mean (DAPO), "
                                               "seq-mean-token-sum-norm (Dr. GRPO, with scale_rewards none).")
    scale_rewards: str = opt("group", "Advantage scale: group ((r - group mean) / group std, GRPO), batch (group "
                                      "mean, batch std) or none (r - group mean only: Dr. GRPO).")

    def validate(self, run: RunConfig) -> None:
        super().validate(run)
        _check_group(run, self.generation.num_samples)
        check_choice("grpo.scale_rewards", self.scale_rewards, SCALE_REWARDS)


@dataclass
class ReinforcePPConfig(OnlineRLConfig):
    kl_coef: float = opt(0.01, "beta of the per-token KL penalty in the reward, r_t = -beta * KL_t (+ score at the end).")
    gamma: float = opt(1.0, "Discount of the return-to-go over response tokens (1 = undiscounted).")


# --------------------------------------------------------------------------------------------------
# The advantage estimator each method picks (the math: alignkit.losses.rl)
# --------------------------------------------------------------------------------------------------


def advantages(method: str, args: OnlineRLConfig, scores: torch.Tensor, kl_tokens: torch.Tensor | None,
               mask: torch.Tensor, kl_coef: float, values: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(advantages [N, R], returns [N, R] or None)`` from final rewards ``scores`` ``[N]``, the per-token KL
    to the reference (None when not measured here) and, for PPO, the critic's ``values``. 0 off-mask."""
    kl_in_reward = args.kl_penalty == "reward" and kl_tokens is not None
    mask_f = mask.to(scores.dtype)
    if method == "ppo":
        token_rewards = per_token_rewards(scores, kl_tokens if kl_in_reward else torch.zeros_like(mask_f), mask,
                                          kl_coef if kl_in_reward else 0.0)
        return gae(token_rewards, values, mask, gamma=args.gamma, lam=args.lam)
    if method == "reinforce_pp":
        kl = kl_tokens if kl_in_reward else torch.zeros_like(mask_f)
        return reinforce_pp_advantages(scores, kl, mask, kl_coef if kl_in_reward else 0.0, gamma=args.gamma), None
    seq_scores = scores - kl_coef * (kl_tokens * mask_f).sum(1) if kl_in_reward else scores
    n = args.generation.num_samples
    if method == "rloo":
        adv = rloo_advantages(seq_scores, n)
    elif method == "grpo":
        adv = grpo_advantages(seq_scores, n, scale=args.scale_rewards)
    else:
        raise ValueError(f"online_rl: unknown method {method!r}; ppo, rloo, grpo or reinforce_pp.")
    return adv[:, None] * mask_f, None


def sampler_logps_are_the_trainers(args: OnlineRLConfig, mixed_precision: str, dtype: str) -> bool:
    """Whether the HF sampler's log-probs of its tokens equal the training forward's up to float error: the
    same weights in fp32 and the same distribution, softmax(logits / temperature) with nothing cut away."""
    g = args.generation
    return (args.reuse_sampler_logps and g.sampler == "hf" and not g.greedy and g.top_p == 1 and g.top_k == 0
            and mixed_precision == "no" and resolve_dtype(dtype) == torch.float32)


def kl_controller_of(args: OnlineRLConfig) -> FixedKLController | AdaptiveKLController:
    if args.kl_target is not None:
        return AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
    return FixedKLController(args.kl_coef)


# --------------------------------------------------------------------------------------------------
# The loss of one micro-batch
# --------------------------------------------------------------------------------------------------


@dataclass
class PolicyTerms:
    loss_sum: torch.Tensor  # (policy loss + kl_coef * KL loss - entropy_coef * entropy) * loss_items
    stats: dict[str, tuple[float, float]]  # name -> (sum, count) for MetricSums


def policy_terms(out: ResponseOutput, old_logps: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                 args: OnlineRLConfig, *, kl_coef: float, ref_logps: torch.Tensor | None) -> PolicyTerms:
    """The policy side of the loss on one micro-batch, as a sum over ``loss_agg`` items.

    ``L = policy_loss (ppo_clip / gspo / cispo) + [kl_penalty == loss] kl_coef * KL_est(pi || ref)
    [* pi/pi_old when kl_ratio_weight] - entropy_coef * H``, each aggregated with ``loss_agg`` (Dr. GRPO's constant is ``max_new_tokens``).
    """
    items = loss_items(mask, args.loss_agg)
    n_tokens = float(mask.sum())
    max_length = args.generation.max_new_tokens
    if args.policy_loss == "gspo":
        pg, st = gspo_policy_loss(out.logps, old_logps, adv, mask, clip_eps=args.gspo_clip_eps,
                                  clip_eps_high=args.gspo_clip_eps_high, loss_agg=args.loss_agg, max_length=max_length)
    elif args.policy_loss == "cispo":
        pg, st = cispo_policy_loss(out.logps, old_logps, adv, mask, clip_eps_high=args.cispo_clip_eps_high,
                                   clip_eps_low=args.cispo_clip_eps_low, loss_agg=args.loss_agg,
                                   max_length=max_length)
    else:
        pg, st = ppo_policy_loss(out.logps, old_logps, adv, mask, clip_eps=args.clip_eps,
                                 clip_eps_high=args.clip_eps_high, loss_agg=args.loss_agg, max_length=max_length)
    loss = pg
    stats = {"loss/policy": (float(pg.detach()) * float(items), float(items)),
             "clipfrac": (float(st["clipfrac"]) * n_tokens, n_tokens),
             "approx_kl": (float(st["approx_kl"]) * n_tokens, n_tokens),
             "ratio": (float(st["ratio_mean"]) * n_tokens, n_tokens)}
    if args.kl_penalty == "loss" and ref_logps is not None:
        kl_tok = kl_loss_tokens(out.logps, ref_logps, old_logps, args.kl_estimator, clamp=args.kl_clamp,
                                ratio_weight=args.kl_ratio_weight)
        kl_loss = aggregate_loss(kl_tok, mask, args.loss_agg, max_length)
        loss = loss + kl_coef * kl_loss
        stats["loss/kl"] = (float(kl_loss.detach()) * float(items), float(items))
    if out.entropy is not None:
        ent = aggregate_loss(out.entropy, mask, args.loss_agg, max_length)
        if args.entropy_coef > 0:
            loss = loss - args.entropy_coef * ent
        stats["entropy"] = (float(out.entropy.detach().sum()), n_tokens)
    return PolicyTerms(loss_sum=loss * items, stats=stats)


# --------------------------------------------------------------------------------------------------
# Small pieces of the loop: dropout, method state, metrics, samples
# --------------------------------------------------------------------------------------------------


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout probability 0 everywhere: ``nn.Dropout`` modules (LoRA's too) and the functional attention
    dropout that Llama-style attention modules read from ``self.attention_dropout``."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class OnlineState:
    """The method state a checkpoint carries: the KL coefficient (adaptive controllers move it) and the
    running reward statistics (``reward.normalize: running``). Identical on every process."""

    def __init__(self, kl_controller, reward) -> None:
        self.kl_controller, self.reward = kl_controller, reward

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_controller.state_dict(), "reward": self.reward.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
        if "reward" in state:
            self.reward.load_state_dict(state["reward"])


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
    with open(path, "a") as f:
        for i in range(min(limit, len(rollout))):
            prompt = rows[int(rollout.prompt_index[i])]["prompt"]
            record = {"step": step, "prompt": prompt_text(prompt), "completion": rollout.response_texts[i],
                      "reward": float(result.combined[i]), "reward/final": float(result.rewards[i]),
                      "ended_with_eos": bool(rollout.ended_with_eos[i])}
            record.update({f"reward/{k}": float(v[i]) for k, v in result.raw.items()})
            if rollout.episodes is not None:  # multi-turn: the whole conversation, tool calls included
                record.update(episode=rollout.episodes.messages[i], turns=int(rollout.episodes.turns[i]),
                              stop=rollout.episodes.stop[i])
            f.write(json.dumps(record) + "\n")


def with_overlong(result: RewardResult, rollout: Rollout, args: OnlineRLConfig) -> RewardResult:
    """``result`` with DAPO's overlong penalty (``overlong_buffer`` > 0) added to its final rewards and logged
    as ``reward/overlong``; unchanged when it is off."""
    if args.overlong_buffer == 0:
        return result
    penalty = overlong_penalty(rollout.response_lengths, args.generation.max_new_tokens, args.overlong_buffer,
                               args.overlong_penalty_factor).to(result.rewards)
    return replace(result, rewards=result.rewards + penalty, raw={**result.raw, "overlong": penalty})


def refill_groups(rollout: Rollout, result: RewardResult, rows: list[dict], n: int,
                  draw: Callable[[int], tuple[Rollout, RewardResult, list[dict]]], *, max_rounds: int,
                  any_short: Callable[[bool], bool], metrics: MetricSums, pad_id: int
                  ) -> tuple[Rollout, RewardResult, list[dict]]:
    """DAPO's dynamic sampling (Yu et al. 2025): keep the groups of ``n`` samples whose final rewards are not
    all equal (:func:`~alignkit.losses.policy.groups_with_signal`) and, while a process has fewer than
    ``len(rows)`` of them, ``draw(round)`` one more batch of prompts (sampled and scored), at most ``max_rounds``
    times (every process draws as long as any is short: generation and reward gathers stay in step). The batch
    is the first ``len(rows)`` groups with signal in drawing order; if still short, the earliest groups without
    signal fill it. Metrics: ``dynamic_sampling/refilled`` (groups of the batch from refill rounds),
    ``dynamic_sampling/rounds``, ``dynamic_sampling/short`` (groups without signal kept)."""
    want = len(rows)
    parts = [(rollout, result, rows)]
    keeps = [groups_with_signal(result.rewards, n)]
    while len(parts) <= max_rounds and any_short(int(sum(int(k.sum()) for k in keeps)) < want):
        parts.append(draw(len(parts)))
        keeps.append(groups_with_signal(parts[-1][1].rewards, n))
    with_signal = [(p, int(g)) for p, k in enumerate(keeps) for g in k.nonzero().flatten()][:want]
    without = [(p, int(g)) for p, k in enumerate(keeps) for g in (~k).nonzero().flatten()]
    picks = with_signal + without[:want - len(with_signal)]
    metrics.add("dynamic_sampling/refilled", sum(p > 0 for p, _ in with_signal))
    metrics.add("dynamic_sampling/rounds", len(parts) - 1)
    metrics.add("dynamic_sampling/short", want - len(with_signal))
    if len(parts) == 1 and len(with_signal) == want:
        return rollout, result, rows  # every group had signal
    return concat_groups(parts, picks, n, pad_id)


def concat_groups(parts: list[tuple[Rollout, RewardResult, list[dict]]], picks: list[tuple[int, int]], n: int,
                  pad_id: int) -> tuple[Rollout, RewardResult, list[dict]]:
    """One single-turn rollout (with its rewards and prompt rows) of the groups ``picks`` (``(part, group)``,
    in that order) of several: prompts re-padded on the left, responses on the right."""
    P = max(r.prompt_ids.shape[1] for r, _, _ in parts)
    R = max(r.response_ids.shape[1] for r, _, _ in parts)
    left = lambda x, v: torch.nn.functional.pad(x, (P - x.shape[1], 0), value=v)  # noqa: E731
    right = lambda x, v: torch.nn.functional.pad(x, (0, R - x.shape[1]), value=v)  # noqa: E731
    starts = [0]
    for r, _, _ in parts:
        starts.append(starts[-1] + len(r))
    idx = torch.tensor([starts[p] + g * n + j for p, g in picks for j in range(n)],
                       device=parts[0][0].prompt_ids.device)
    cat = lambda xs: torch.cat(xs)[idx]  # noqa: E731
    rs = [r for r, _, _ in parts]
    texts = [t for r in rs for t in r.response_texts]
    logps = cat([right(r.sampler_logps, 0.0) for r in rs]) if rs[0].sampler_logps is not None else None
    rollout = Rollout(prompt_ids=cat([left(r.prompt_ids, pad_id) for r in rs]),
                      prompt_mask=cat([left(r.prompt_mask, 0) for r in rs]),
                      response_ids=cat([right(r.response_ids, pad_id) for r in rs]),
                      response_mask=cat([right(r.response_mask, 0) for r in rs]),
                      ended_with_eos=cat([r.ended_with_eos for r in rs]),
                      prompt_index=torch.arange(len(picks), device=idx.device).repeat_interleave(n),
                      response_texts=[texts[i] for i in idx.tolist()], sampler_logps=logps)
    results = [res for _, res, _ in parts]
    result = RewardResult(rewards=cat([x.rewards for x in results]), combined=cat([x.combined for x in results]),
                          raw={k: cat([x.raw[k] for x in results]) for k in results[0].raw})
    rows = [parts[p][2][int(parts[p][0].prompt_index[g * n])] for p, g in picks]
    return rollout, result, rows


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def run(cfg: RunConfig) -> dict:
    args, t, method = cfg.method_args, cfg.training, cfg.method
    accelerator = setup_accelerator(t)
    world, rank = accelerator.num_processes, accelerator.process_index
    autocast = accelerator.autocast
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():
        splits = build_datasets(cfg.data, tokenizer, "prompt")
    args.reward.check_columns(splits.train, cfg.data.describe_train(), section=f"{method}.reward")
    resume_from = prepare_output_dir(accelerator, cfg)

    # models: the policy (full / LoRA / QLoRA), PPO's critic, the reference, the reward sources
    policy = load_model(cfg.model, tokenizer)  # first: its LoRA init draws from the seeded RNG
    critic = None
    if method == "ppo":
        critic = load_critic(cfg.model, tokenizer, policy, init=args.critic_init, reward_model=args.reward.model)
    if args.disable_dropout:
        for m in (policy, critic):
            if m is not None:
                disable_dropout(m)
    reference = load_reference(cfg, tokenizer, accelerator, policy) if args.uses_reference else None
    multi_turn = args.environment.enabled  # episodes with an environment; its rewards are one more source
    reward = build_reward(args.reward, tokenizer, accelerator.device, dtype=cfg.model.dtype, section=f"{method}.reward",
                          prepare_model=lambda m: prepare_frozen(accelerator, m),
                          extra_sources=[("environment", episode_rewards, 1.0)] if multi_turn else ())
    kl_controller = kl_controller_of(args)

    # prompts, step counts, one optimizer over every update of every rollout (policy and critic together)
    n = args.generation.num_samples
    prompts = BatchStream(splits.train, lambda rows: rows, batch_size=args.rollout_batch_size, world=world, rank=rank,
                          seed=t.seed, what="prompts", batch_size_key=f"{method}.rollout_batch_size")
    max_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_epochs * prompts.batches_per_epoch))
    minibatch_rows = t.per_device_batch_size * t.gradient_accumulation_steps
    n_updates = args.rollout_batch_size * n // minibatch_rows
    trained = PolicyAndCritic(policy, critic) if critic is not None else policy
    layout = choose_layout(trained, padding_free=args.padding_free, accelerator=accelerator,
                           what=f"{method} rollout batches")
    run_ = start_training(accelerator, cfg, trained, tokenizer, resume_from=resume_from, total_steps=max_steps,
                          total_updates=max_steps * args.ppo_epochs * n_updates,
                          method_state=OnlineState(kl_controller, reward), bar_keys=("reward", "kl", "loss/policy"),
                          checkpointer_cls=PolicyCriticCheckpointer if critic is not None else Checkpointer)
    model, state = run_.model, run_.state
    if accelerator.is_main_process:  # a resumed run (or one from scratch) samples the steps after state.step again
        cut_jsonl(run_.output_dir / "samples.jsonl", state.step)
    if multi_turn:
        sampler = MultiTurnSampler(tokenizer, args.generation, args.environment, device=accelerator.device,
                                   where=f"{method}.environment", model_name_or_path=cfg.model.name_or_path,
                                   dtype=cfg.model.dtype, seed=t.seed, policy=model)
    else:
        sampler = build_sampler(args.generation, tokenizer, model_name_or_path=cfg.model.name_or_path,
                                device=accelerator.device, dtype=cfg.model.dtype, seed=t.seed, policy=model)
    # the module the sampler samples from; vLLM syncs weights by parameter name, so give it the bare policy
    inner_policy = unwrap_model(model).policy if critic is not None else None
    sample_from = inner_policy if critic is not None and args.generation.sampler in ("vllm", "vllm_server") else model
    logger.info(f"{method}: {max_steps} steps of {args.rollout_batch_size} prompts x {n} samples x {world} "
                f"processes; {args.ppo_epochs} epoch(s) x {n_updates} update(s) per rollout")
    temperature = 0.0 if args.generation.greedy else args.generation.temperature
    micro = t.per_device_batch_size
    # one update per rollout: the training forward IS the rollout policy, no separate "old" pass needed
    on_policy = args.ppo_epochs == 1 and n_updates == 1
    need_old = (critic is not None or not on_policy or args.tis_cap is not None or args.mismatch_seq_threshold > 0
                or (args.uses_reference and args.kl_penalty == "reward"))
    # a rollout sampled ahead comes from an older policy: the old log-probs are the trainer's, recomputed
    old_from_sampler = (need_old and not args.async_steps
                        and sampler_logps_are_the_trainers(args, accelerator.mixed_precision, cfg.model.dtype))
    if old_from_sampler:
        logger.info(f"{method}: the old log-probs come from the sampler (fp32, full softmax): one forward less")
    batches = prompts.iterate(state.micro_step)
    want_logps = args.tis_cap is not None or args.mismatch_seq_threshold > 0 or old_from_sampler
    ahead = None
    if args.async_steps:  # the next steps' rollouts are sampled while this one trains (alignkit.rollout.ahead)
        ahead = rollouts_ahead(sampler, inner_policy if critic is not None else sample_from, batches,
                               depth=args.async_steps, end=max_steps, logps=want_logps,
                               seed=lambda step: derived_seed(t.seed, step, rank))
        ahead.push(sample_from, state.step)
    last: dict[str, float] = {}

    while state.step < max_steps:
        step_start, metrics = time.perf_counter(), MetricSums()
        if ahead is not None:  # sampled while earlier steps trained, by a policy <= async_steps updates old
            rows, rollout, staleness, took = ahead.take(state.step)
            metrics.add("async/staleness", staleness)
        else:
            rows = next(batches)
        state.micro_step += 1  # the prompt batches trained on: a resume samples the ones after them (again)

        # 1. rollout: num_samples responses per prompt
        if multi_turn:
            rollout = sampler.generate_episodes(sample_from, rows, seed=derived_seed(t.seed, state.step, rank),
                                                logps=want_logps, any_running=lambda x: any_process(accelerator, x))
            for k, (s, c) in rollout.episodes.metrics().items():
                metrics.add(k, s, c)
        elif ahead is None:
            rollout = sampler.generate(sample_from, [r["prompt_ids"] for r in rows],
                                       seed=derived_seed(t.seed, state.step, rank), logps=want_logps)
            if getattr(sampler, "last_sync_seconds", None) is not None:  # vllm_server: the weights sent before it
                metrics.add("weight_sync", sampler.last_sync_seconds)
        sampler.sleep()  # vLLM on a GPU frees its memory for the update; the next generate wakes and re-syncs it
        generation_time = time.perf_counter() - step_start

        # 2. rewards (+ DAPO's overlong penalty); dynamic sampling: groups without signal refilled from new prompts
        result = with_overlong(reward(rollout, rows, gather=accelerator.gather if world > 1 else None), rollout, args)
        reward_metrics(metrics, result, rollout)
        if args.dynamic_sampling:
            def draw(round_: int, want_logps=want_logps, metrics=metrics
                     ) -> tuple[Rollout, RewardResult, list[dict]]:
                more = next(batches)
                state.micro_step += 1  # every prompt batch drawn counts: resume continues after the last
                r = sampler.generate(sample_from, [x["prompt_ids"] for x in more], logps=want_logps,
                                     seed=derived_seed(t.seed, state.step, rank, 0, round_))
                sampler.sleep()
                res = with_overlong(reward(r, more, gather=accelerator.gather if world > 1 else None), r, args)
                reward_metrics(metrics, res, r)
                return r, res, more

            refill_start = time.perf_counter()
            rollout, result, rows = refill_groups(rollout, result, rows, n, draw, max_rounds=args.max_refill_rounds,
                                                  any_short=lambda x: any_process(accelerator, x), metrics=metrics,
                                                  pad_id=tokenizer.pad_token_id or 0)  # masked out anyway
            generation_time += time.perf_counter() - refill_start
        batch = RolloutBatch.from_rollout(rollout)
        mask = batch.loss_mask  # the sampled tokens (multi-turn: environment tokens are 0)

        # 3. old log-probs (and values), reference log-probs: once per rollout, no gradients
        old = None
        if old_from_sampler:  # the critic's values still need their forward
            values = rollout_values(model, batch, micro, autocast=autocast) if critic is not None else None
            old = ResponseOutput(logps=rollout.sampler_logps, values=values)
        elif need_old:
            old = score_rollout(model, batch, temperature, micro, autocast=autocast, layout=layout,
                                **({"values": True} if critic is not None else {}))
        if args.mismatch_seq_threshold > 0:  # drop whole sequences the sampler and the trainer disagree on
            keep = mismatch_sequence_mask(old.logps, rollout.sampler_logps, mask, args.mismatch_seq_threshold,
                                          level=args.mismatch_seq_level)
            metrics.add("mismatch_rejected", float((~keep).sum()), keep.numel())
            mask = batch.action_mask = mask * keep[:, None].to(mask.dtype)
        ref_logps = None
        if reference is not None:
            ref_logps = reference_logps(reference, model, batch, temperature, micro, adapter_owner=inner_policy,
                                        autocast=autocast, layout=layout,
                                        **({"values": False} if critic is not None else {}))
        kl_tokens = None
        if old is not None and ref_logps is not None:
            kl_tokens = kl_estimate(old.logps, ref_logps, args.kl_estimator, clamp=args.kl_clamp) * mask
            metrics.add("kl", float(kl_tokens.sum()), len(batch))

        # 4. advantages
        kl_coef = kl_controller.value
        values = old.values if old is not None else None
        adv, returns = advantages(method, args, result.rewards.float(), kl_tokens, mask, kl_coef, values)
        metrics.add_values("advantages", adv, mask)
        if returns is not None:
            metrics.add_values("values", values, mask)
            metrics.add_values("returns", returns, mask)
        if args.whiten_advantages:
            adv = masked_whiten(adv, mask)
        if args.tis_cap is not None:
            # truncated importance weights of the trainer's over the sampler's log-probs; a positive per-token
            # factor on the advantage is a factor on that token's clipped-surrogate loss
            log_w = (old.logps - rollout.sampler_logps) * mask
            weights = log_w.exp().clamp(max=args.tis_cap) * mask
            metrics.add_values("tis_weight", weights, mask)
            metrics.add("tis_capped", float(((log_w.exp() > args.tis_cap) & (mask != 0)).sum()), float(mask.sum()))
            metrics.add("sampler_logp_diff", float(log_w.abs().sum()), float(mask.sum()))
            adv = adv * weights

        # 5. ppo_epochs passes of minibatch updates
        for epoch in range(args.ppo_epochs):
            for mb in minibatches(len(batch), minibatch_rows, derived_seed(t.seed, state.step, rank, 1 + epoch)):
                mb = mb.to(mask.device)
                # exact normalisation over the minibatch on every process: policy items and value tokens
                items, tokens = global_counts(accelerator, loss_items(mask[mb], args.loss_agg), mask[mb].sum())
                scale = t.gradient_accumulation_steps * world
                bad = False
                for idx in mb.split(micro):
                    with accelerator.accumulate(model):
                        part = batch.select(idx)
                        w, m = part.response_width, part.loss_mask
                        with autocast():
                            fwd = response_forward(model, part, temperature, entropy=True,
                                                   entropy_grad=args.entropy_coef > 0, layout=layout,
                                                   **({"values": True} if critic is not None else {}))
                        old_part = old.logps[idx, :w] if old is not None else fwd.logps.detach()
                        ref = ref_logps[idx, :w] if ref_logps is not None else None
                        if kl_tokens is None and ref is not None:  # on-policy: measure the KL here
                            kl = kl_estimate(fwd.logps.detach(), ref, args.kl_estimator, clamp=args.kl_clamp) * m
                            metrics.add("kl", float(kl.sum()), len(idx))
                        terms = policy_terms(fwd, old_part, adv[idx, :w], m, args, kl_coef=kl_coef, ref_logps=ref)
                        loss = terms.loss_sum * scale / items
                        if critic is not None:
                            v_loss, v_clipfrac = value_loss(fwd.values, old.values[idx, :w], returns[idx, :w], m,
                                                            args.value_clip_range if args.value_clip else None)
                            n_tok = float(m.sum())
                            loss = loss + args.vf_coef * v_loss * n_tok * scale / tokens
                        if not run_.backward(loss):
                            bad = True
                            continue
                        for k, (s, c) in terms.stats.items():
                            metrics.add(k, s, c)
                        if critic is not None:
                            metrics.add("loss/value", float(v_loss.detach()) * n_tok, n_tok)
                            metrics.add("value_clipfrac", float(v_clipfrac) * n_tok, n_tok)
                run_.update(bad)
        if ahead is not None:  # the new weights to the sampler (after the rollouts in flight), the next rollout starts
            waited, synced = ahead.push(sample_from, state.step + 1)
            metrics.add("async/gen_wait", took + waited)  # the trainer's waits for rollouts in this step
            if synced is not None:  # (the last async_steps + 1 steps send none: every rollout is sampled)
                metrics.add("weight_sync", synced)

        # 6. KL controller, metrics, samples, checkpoints
        state.step += 1
        state.tokens_seen += int(rollout.prompt_mask.sum() + mask.sum())
        elapsed = max(time.perf_counter() - step_start, 1e-9)
        metrics.add("gen_share", generation_time / elapsed)
        metrics.add("step_time", elapsed)
        metrics.add_total("tok/s", float(rollout.prompt_mask.sum() + mask.sum()) / elapsed)
        means = metrics.means(accelerator)
        if "kl" in means:
            kl_controller.update(means["kl"], len(batch) * world)
        run_.tracker.advance()
        if run_.log_due():
            last = {**means, "kl_coef": kl_coef, "lr": run_.lr, "episodes": state.step * len(batch) * world,
                    "epoch": state.micro_step / prompts.batches_per_epoch}
            if run_.grad_norm is not None:
                last["grad_norm"] = run_.grad_norm
            run_.log(last)
            if args.log_samples and accelerator.is_main_process:
                write_samples(run_.output_dir / "samples.jsonl", state.step, rollout, rows, result, args.log_samples)
        run_.save_if_due()

    (ahead if ahead is not None else sampler).close()
    run_.finish()
    out = run_.summary(train=last, data_stats=splits.stats)
    if critic is not None:
        return {**out, "model": inner_policy, "critic": unwrap_model(model).critic}
    return {**out, "model": model}
