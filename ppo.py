"""Stage 3 of RLHF: PPO against the learned reward, with a per-token KL penalty to the frozen SFT model.

Four models: the policy (trainable, from SFT), the critic (trainable: a separate trunk initialized
from the reward model by default, or a value head on the policy trunk), the reference (frozen SFT)
and the reward model (frozen). Each update:

    1. rollout     sample responses to a batch of prompts (KV cache, temperature T), stop at EOS
    2. score       reward model on prompt+response; no-EOS penalty ("EOS trick")
    3. KL/rewards  per-token log-probs of policy and reference; reward = -beta * KL, + score at the end
    4. advantages  values from the critic, GAE(gamma, lambda), returns, whitening
    5. update      PPO epochs x minibatches: clipped surrogate + clipped value loss (+ PPO-ptx)
    6. log/eval    TRL's metric names; gold reward on held-out prompts on the default task

The math lives in small pure functions (`compute_gae`, `masked_whiten`, `kl_penalty`, `policy_loss`,
`value_loss`, `AdaptiveKLController`, ...), each citing the convention it follows; tests import them.
Every convention on which frameworks differ is a config field, and `--preset=trl|openrlhf|verl|...`
sets them all at once (PRESETS below; README has the table). The defaults follow the N+
implementation details (Huang et al. 2024) and TRL, except where a comment says otherwise.

    python ppo.py --sft=runs/sft/final --reward_model=runs/rm/final
    torchrun --nproc_per_node=8 ppo.py --preset=trl ...
"""

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import data
from evaluate import reward_scores, sample_responses, score_samples
from model import GPT, generate, token_logprobs
from runtime import (Dist, Metrics, all_reduce_mean, all_reduce_sum, autocast, check_nonfinite_streak,
                     check_writable, clip_grad_norm, init_distributed, latest_checkpoint,
                     load_full_optimizer_state, load_full_state_dict, load_model, load_train_state, lr_at,
                     parse_config, publish_final, publish_missing_final, save_checkpoint, seed_all, shard_model,
                     shutdown_distributed, step_if_finite, unsharded)
from runtime import check_context, progress_bar


@dataclass
class Config:
    # --- models and data
    sft: str = "runs/sft/final"
    """the SFT checkpoint: the initial policy and the frozen reference"""
    reward_model: str = "runs/rm/final"
    """the reward model checkpoint (its normalization gain/bias is applied)"""
    critic: str = "reward"
    """"reward": separate trunk from the RM (N+, TRL, OpenRLHF, DS-Chat); "sft": separate, from SFT (verl); "shared": value head on the policy trunk, zero-init (OpenAI 2019)"""
    run_dir: str = "runs/ppo"
    """checkpoints, metrics.jsonl, final/"""
    dataset: str = "default"
    """prompts: "default", a local file or a hub name (prompts of any record shape are used)"""
    profile: str = "auto"
    """"toy": the defaults below, tuned for the built-in task; "real": REAL_DATA (limits and learning rates for
    real text and pretrained models); "auto": real unless dataset is "default". Explicit flags always win"""
    eval_dataset: str = ""
    """held-out prompts; empty = the test split of `dataset` (data.heldout_sources: the split of every stage)"""
    max_prompt_tokens: int = 12
    """prompts are cut from the left to this many tokens"""
    response_length: int = 16
    """maximum new tokens per response"""
    temperature: float = 1.0
    """sampling temperature; log-probs of policy and reference use logits / T too"""
    divide_logits_by_temperature: bool = True
    """False reproduces DeepSpeed-Chat, which samples at T but scores with raw logits"""
    stop_token_id: int = -1
    """an extra stop token besides EOS (-1 = none)"""
    # --- the RL problem
    kl_coef: float = 0.1
    """beta, the KL penalty coefficient (initial value when adaptive); TRL and N+ use 0.05 (--preset=trl)"""
    kl_estimator: str = "k1"
    """"k1": logp - ref (unbiased, default of OAI/TRL/OpenRLHF); "k3": exp(ref - logp) - 1 - (ref - logp)"""
    kl_location: str = "reward"
    """"reward": -beta*KL per token in the reward (PPO); "loss": beta*KL added to the loss (GRPO, verl use_kl_loss); "none" """
    kl_clamp: float = 0.0
    """clamp the per-token KL estimate to +-this (OpenRLHF and verl: 10); 0 = off"""
    adaptive_kl: bool = False
    """Ziegler et al. 2019 controller: beta follows target_kl"""
    target_kl: float = 6.0
    """controller target (in the units of kl_signal)"""
    kl_horizon: int = 10000
    """controller horizon in episodes"""
    kl_signal: str = "sequence_sum"
    """what the controller sees: "sequence_sum" of per-token KL (OpenAI 2019) or "token_mean" (OpenRLHF, verl)"""
    score_position: str = "eos"
    """"eos": score on the last response token (OpenRLHF, verl, DS-Chat); "after_eos": first slot after EOS, which the critic also predicts (N+, TRL, torchtune)"""
    missing_eos_penalty: float = -1.0
    """the score of a response that never emitted EOS (see missing_eos_mode)"""
    missing_eos_mode: str = "replace"
    """"replace": score := penalty (OpenAI 2019, N+); "subtract": score -= |penalty| (TRL missing_eos_penalty); "none" """
    reward_clip: float = 0.0
    """clip the score to +-this (DS-Chat 5, OpenRLHF 10); 0 = off"""
    whiten_rewards: bool = False
    """whiten per-token rewards over the rollout, keeping their mean (OpenAI 2019 shift_mean=False; N+ found it harmful)"""
    advantage_whitening: str = "rollout"
    """"rollout": per rank over the rollout (TRL, N+); "global": over all ranks (OpenRLHF, verl); "minibatch" (OpenAI 2019); "mean_preserving" (torchtune's whiten re-adds the mean); "none" (DS-Chat)"""
    unbiased_variance: bool = False
    """Bessel-corrected variance in whitening (TRL, verl, torchtune) vs population variance (OpenAI 2019, N+)"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda (OpenRLHF and verl: 1.0)"""
    # --- the PPO update
    cliprange: float = 0.2
    """policy ratio clip epsilon"""
    cliprange_value: float = 0.2
    """value clip around the old values (OpenRLHF and verl: 0.5); 0 = no value clipping"""
    dual_clip: float = 0.0
    """dual-clip constant c for negative advantages (verl: 3.0 always on); 0 = off"""
    vf_coef: float = 0.1
    """loss = policy_loss + vf_coef * value_loss"""
    entropy_coef: float = 0.0
    """entropy bonus coefficient"""
    loss_aggregation: str = "token_mean"
    """"token_mean": mean over valid tokens of the micro-batch (TRL, N+); "seq_mean_token_mean": mean per sequence, then over sequences"""
    old_logprobs: str = "sampling"
    """"sampling": log-probs recorded while generating (N+, TRL, torchtune); "recompute": a fresh forward pass (OpenRLHF, verl, DS-Chat)"""
    rollout_batch_size: int = 64
    """prompts per update, over all processes"""
    num_ppo_epochs: int = 4
    """passes over each rollout"""
    num_minibatches: int = 1
    """optimizer steps per epoch"""
    micro_batch_size: int = 64
    """sequences per forward/backward per process (gradient accumulation makes up the minibatch)"""
    num_updates: int = 150
    """PPO updates (each = one rollout)"""
    lr: float = 3e-4
    """policy learning rate (N+ and TRL use 3e-6 for 1B models; small models on the default task need more)"""
    critic_lr: float = 0.0
    """critic learning rate; 0 = same as lr (TRL, N+: one optimizer)"""
    lr_schedule: str = "linear"
    """linear decay to 0 (OpenAI 2019, N+), cosine or constant"""
    warmup_steps: int = 0
    """updates of linear warmup"""
    adam_eps: float = 1e-5
    """AdamW epsilon (N+: 1e-5)"""
    grad_clip: float = 1.0
    """max gradient norm over policy and critic together (0 = off)"""
    max_nonfinite_steps: int = 3
    """an optimizer step whose loss or gradient is inf/NaN is skipped; this many updates in a row with every step skipped stop the run (0 = never)"""
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT): add ptx_coef x SFT loss on demonstrations, against the alignment tax"""
    ptx_dataset: str = "default"
    """demonstrations for PPO-ptx"""
    # --- systems
    offload_frozen: bool = False
    """keep the reference and reward models on CPU between the phases that use them"""
    gradient_checkpointing: bool = False
    """recompute block activations in backward"""
    preset: str = ""
    """set every framework-specific knob at once: openai2019, trl, openrlhf, verl, deepspeed_chat, torchtune (explicit flags win)"""
    # --- logging, evaluation, checkpoints
    eval_every: int = 25
    """updates between evaluations on held-out prompts"""
    eval_prompts: int = 256
    """held-out prompts for evaluation"""
    num_samples_shown: int = 3
    """samples printed at each evaluation"""
    log_every: int = 5
    """updates between metric lines"""
    report_to: str = ""
    """also log metrics to "tensorboard" (run_dir/tensorboard) and/or "wandb", comma-separated (TRL's report_to)"""
    save_every: int = 50
    """updates between checkpoints (and one at the end)"""
    resume: bool = False
    """continue from run_dir's latest checkpoint"""
    stop_after: int = 0
    """stop with a checkpoint after this many updates of this invocation (tests of resume); 0 = off"""
    seed: int = 0
    """seeds data order and sampling"""
    device: str = "auto"
    """auto, cpu or cuda"""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""


# --profile=real: limits as sft.py's; lr 3e-6 and beta 0.05 are TRL's PPOConfig defaults
# (trl/experimental/ppo/ppo_config.py L124; the N+ TL;DR runs use beta 0.05 too).
REAL_DATA = dict(max_prompt_tokens=384, response_length=128, lr=3e-6, kl_coef=0.05, micro_batch_size=8)


# Each framework's conventions, read from its source (REFERENCES.md section 2; README has the table
# with file paths). Only knobs that differ from the defaults above need listing, but every preset
# lists every convention knob so it can be read on its own.
PRESETS = {
    "openai2019": dict(  # lm-human-preferences train_policy.py; sampling T 0.7, beta 0.15 adaptive
        kl_estimator="k1", kl_location="reward", kl_clamp=0.0, adaptive_kl=True, kl_coef=0.15, target_kl=6.0,
        kl_horizon=10000, kl_signal="sequence_sum", score_position="eos", missing_eos_mode="replace",
        missing_eos_penalty=-1.0, reward_clip=0.0, whiten_rewards=True, advantage_whitening="minibatch",
        unbiased_variance=False, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, dual_clip=0.0,
        vf_coef=0.1, loss_aggregation="token_mean", critic="shared", old_logprobs="sampling", temperature=0.7,
        divide_logits_by_temperature=True, num_ppo_epochs=4, num_minibatches=1, lr=1e-5, lr_schedule="linear"),
    "trl": dict(  # trl/experimental/ppo/ppo_trainer.py + ppo_config.py (trl 1.12.0), the N+ recipe
        kl_estimator="k1", kl_location="reward", kl_clamp=0.0, adaptive_kl=False, kl_coef=0.05,
        score_position="after_eos", missing_eos_mode="subtract", missing_eos_penalty=-1.0, reward_clip=0.0,
        whiten_rewards=False, advantage_whitening="rollout", unbiased_variance=True, gamma=1.0, lam=0.95,
        cliprange=0.2, cliprange_value=0.2, dual_clip=0.0, vf_coef=0.1, loss_aggregation="token_mean",
        critic="reward", old_logprobs="sampling", temperature=0.7, divide_logits_by_temperature=True,
        num_ppo_epochs=4, num_minibatches=1, lr=3e-6, lr_schedule="linear",
        grad_clip=0.0, adam_eps=1e-8),  # train() never clips (max_grad_norm unused); HF's AdamW epsilon
    "openrlhf": dict(  # openrlhf/models/loss.py, models/utils.py, cli/train_ppo_ray.py
        kl_estimator="k1", kl_location="reward", kl_clamp=10.0, adaptive_kl=False, kl_coef=0.01,
        kl_signal="token_mean", score_position="eos", missing_eos_mode="none", reward_clip=10.0,
        whiten_rewards=False, advantage_whitening="global", unbiased_variance=False, gamma=1.0, lam=1.0,
        cliprange=0.2, cliprange_value=0.5, dual_clip=0.0, vf_coef=1.0, loss_aggregation="token_mean",
        critic="reward", old_logprobs="recompute", temperature=1.0, divide_logits_by_temperature=True,
        num_ppo_epochs=1, num_minibatches=8, lr=1e-6, critic_lr=9e-6, lr_schedule="cosine"),
    "verl": dict(  # verl/trainer/ppo/core_algos.py, ray_trainer.py, _generated_ppo_trainer.yaml
        kl_estimator="k1", kl_location="none", kl_clamp=10.0, adaptive_kl=False, kl_coef=0.001,
        kl_signal="token_mean", score_position="eos", missing_eos_mode="none", reward_clip=0.0,
        whiten_rewards=False, advantage_whitening="global", unbiased_variance=True, gamma=1.0, lam=1.0,
        cliprange=0.2, cliprange_value=0.5, dual_clip=3.0, vf_coef=1.0, loss_aggregation="token_mean",
        critic="sft", old_logprobs="recompute", temperature=1.0, divide_logits_by_temperature=True,
        num_ppo_epochs=1, num_minibatches=1, lr=1e-6, critic_lr=1e-5, lr_schedule="constant"),
    "deepspeed_chat": dict(  # dschat/rlhf/ppo_trainer.py (hard-coded kl 0.1, clip_reward 5)
        kl_estimator="k1", kl_location="reward", kl_clamp=0.0, adaptive_kl=False, kl_coef=0.1,
        score_position="eos", missing_eos_mode="none", reward_clip=5.0, whiten_rewards=False,
        advantage_whitening="none", unbiased_variance=False, gamma=1.0, lam=0.95, cliprange=0.2,
        cliprange_value=0.2, dual_clip=0.0, vf_coef=1.0, loss_aggregation="token_mean", critic="reward",
        old_logprobs="recompute", temperature=1.0, divide_logits_by_temperature=False, num_ppo_epochs=1,
        num_minibatches=1, lr=9.65e-6, critic_lr=5e-6, lr_schedule="cosine"),
    "torchtune": dict(  # torchtune/rlhf/rewards.py, loss/ppo.py, recipes/ppo_full_finetune_single_device.py
        kl_estimator="k1", kl_location="reward", kl_clamp=0.0, adaptive_kl=False, kl_coef=0.01,
        score_position="after_eos", missing_eos_mode="replace", missing_eos_penalty=-3.0, reward_clip=0.0,
        whiten_rewards=False, advantage_whitening="mean_preserving", unbiased_variance=True, gamma=1.0,
        lam=0.95, cliprange=0.2, cliprange_value=0.2, dual_clip=0.0, vf_coef=0.1,
        loss_aggregation="token_mean", critic="reward", old_logprobs="sampling", temperature=0.7,
        divide_logits_by_temperature=True, num_ppo_epochs=1, num_minibatches=1, lr=3e-6, lr_schedule="cosine"),
}


# -----------------------------------------------------------------------------
# The math: pure functions on tensors. Shapes: B sequences, N response tokens.


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over the positions where mask is true (TRL `masked_mean`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance over the mask. unbiased=True multiplies by n / (n - 1) (TRL `masked_var`);
    False is the population variance of OpenAI 2019 (`tf.nn.moments`) and N+ (`unbiased=False`)."""
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("unbiased variance needs at least 2 valid tokens (ROLL #475)")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = False) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the mask. shift_mean=False adds the mean back: unit variance,
    mean kept (OpenAI 2019 `whiten(rewards, shift_mean=False)`, TRL `masked_whiten`). Positions outside
    the mask are transformed too; callers zero them."""
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row, or the row length if none (TRL `first_true_indices`)."""
    N = bools.size(-1)
    idx = torch.arange(N, device=bools.device).expand_as(bools)
    return torch.where(bools, idx, torch.full_like(idx, N)).min(-1).values


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1", clamp: float = 0.0) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probs (Schulman, "Approximating
    KL divergence", 2020).

    k1 = logp - ref: unbiased, can be negative per token (OpenAI 2019, TRL/OpenRLHF default).
    k3 = exp(ref - logp) - 1 - (ref - logp): unbiased, always >= 0, lower variance (TRL `kl_estimator=k3`,
    verl `low_var_kl`). clamp > 0 clips the estimate to [-clamp, clamp] (OpenRLHF `compute_approx_kl`)."""
    log_ratio = logp.float() - ref_logp.float()
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":
        kl = torch.exp(-log_ratio) - 1 + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}: k1 or k3")
    return kl.clamp(-clamp, clamp) if clamp > 0 else kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016) over each response, padding masked.

    rewards, values, mask: (B, N). delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1},
    with V and A zero past the last valid position. Returns (advantages, returns = advantages + values),
    both zero outside the mask. Matches TRL's loop (ppo_trainer.py L786-796) on its masked inputs."""
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    B, N = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def aggregate(losses: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce per-token losses: "token_mean" over all valid tokens (TRL, N+, OpenRLHF, verl default), or
    "seq_mean_token_mean": per-sequence mean, then mean over sequences (verl `agg_loss`)."""
    if mode == "token_mean":
        return masked_mean(losses, mask)
    if mode == "seq_mean_token_mean":
        per_seq = masked_mean(losses, mask, dim=1)
        return per_seq[mask.any(1)].mean()
    raise ValueError(f"unknown loss aggregation {mode!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2, dual_clip: float = 0.0, aggregation: str = "token_mean"):
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimize:
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) per token, aggregated over the mask.

    dual_clip = c > 1 additionally caps the loss at -A * c where A < 0 (Ye et al. 2020; verl
    `compute_policy_loss_vanilla`, always on with c = 3). Returns (loss, stats) with clipfrac (fraction
    of tokens where the clipped term is the max, TRL's definition) and approxkl = 0.5 * mean(diff^2)
    (OpenAI 2019, TRL)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    losses = torch.max(losses1, losses2)
    if dual_clip > 0:
        losses = torch.where(advantages < 0, torch.min(losses, -advantages * dual_clip), losses)
    loss = aggregate(losses, mask, aggregation)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((losses2 > losses1).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2, aggregation: str = "token_mean"):
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2) over the mask (OpenAI 2019,
    TRL, OpenRLHF `ValueLoss`). cliprange_value = 0 turns clipping off. Returns (loss, clipfrac)."""
    losses1 = (values - returns) ** 2
    if cliprange_value > 0:
        clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        losses2 = (clipped - returns) ** 2
    else:
        losses2 = losses1
    loss = 0.5 * aggregate(torch.max(losses1, losses2), mask, aggregation)
    return loss, masked_mean((losses2 > losses1).float(), mask).detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, float32: logsumexp(z) - sum(p * z)."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


class AdaptiveKLController:
    """Ziegler et al. 2019's proportional controller (lm-human-preferences train_policy.py L115-124):
    err = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + err * n_steps / horizon.

    What KL it is fed matters: OpenAI fed the batch mean of the per-sequence SUM (target 6 nats per
    sequence); OpenRLHF and verl feed the per-token MEAN, so the same target means something else.
    Config.kl_signal picks which."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


def score_indices(eos_index: torch.Tensor, n: int, position: str) -> torch.Tensor:
    """Where the scalar score lands in the (B, n) per-token reward.

    eos_index: index of each response's last valid token (its EOS, or n - 1 if it never stopped).
    "eos": on that token (OpenRLHF `compute_reward`, verl naive reward manager, DS-Chat).
    "after_eos": one slot later, clipped to n - 1 (N+ and TRL `actual_end`, torchtune `value_seq_idxs`);
    that slot is outside the policy mask but inside the value mask, so the score reaches the EOS
    advantage discounted by lambda (TRL issue #3750 calls this a bug; it is their convention)."""
    if position == "eos":
        return eos_index
    if position == "after_eos":
        return torch.clamp(eos_index + 1, max=n - 1)
    raise ValueError(f"unknown score position {position!r}: eos or after_eos")


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float, mode: str) -> torch.Tensor:
    """The "EOS trick": responses that never stopped get a bad score, so the policy learns to finish.
    "replace": score := penalty (OpenAI 2019 `penalty_reward_value`, N+, torchtune with -3);
    "subtract": score -= |penalty| (TRL `missing_eos_penalty`; TRL #2012 notes the inconsistency)."""
    if mode == "replace":
        return torch.where(ended, scores, torch.full_like(scores, penalty))
    if mode == "subtract":
        return torch.where(ended, scores, scores - abs(penalty))
    if mode == "none":
        return scores
    raise ValueError(f"unknown missing_eos_mode {mode!r}")


def compute_rewards(kl: torch.Tensor, scores: torch.Tensor, score_idx: torch.Tensor, kl_coef: float):
    """Per-token rewards: -beta * KL on every response token, plus the score at score_idx
    (OpenAI 2019 `compute_rewards`, TRL L775-779). Returns (rewards, non_score_reward)."""
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rewards[torch.arange(rewards.size(0), device=rewards.device), score_idx] += scores
    return rewards, non_score_reward


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor, mode: str, unbiased: bool, d: Dist) -> torch.Tensor:
    """Advantage normalization per convention; positions outside the mask are zeroed.
    "rollout": this rank's rollout (TRL, N+). "global": statistics over all ranks (OpenRLHF, verl).
    "mean_preserving": unit variance but the mean re-added (torchtune `whiten`, shift_mean=True there).
    "minibatch": done later, per minibatch (OpenAI 2019). "none": DS-Chat."""
    if mode not in ("rollout", "global", "minibatch", "mean_preserving", "none"):
        raise ValueError(f"unknown advantage_whitening {mode!r}")
    if mode in ("none", "minibatch"):
        return advantages * mask
    if mode == "global" and d.distributed:
        m = mask.float()
        n = all_reduce_sum(m.sum(), d)
        mean = all_reduce_sum((advantages * m).sum(), d) / n
        var = all_reduce_sum((((advantages - mean) ** 2) * m).sum(), d) / n
        if unbiased:
            var = var * n / (n - 1)
        return ((advantages - mean) * torch.rsqrt(var + 1e-8)) * m
    whitened = masked_whiten(advantages, mask, shift_mean=(mode != "mean_preserving"), unbiased=unbiased)
    return whitened * mask


# -----------------------------------------------------------------------------
# Forward passes over prompt + response


def response_logprobs(model, query_response, attention_mask, context_length, temperature, head="lm"):
    """Log-probs (float32) of the response tokens, and values when head="both": position
    context_length - 1 + t predicts response token t, and holds the value of the state before it."""
    out = model(query_response, attention_mask=attention_mask, head=head)
    logits = out[0] if head == "both" else out
    logits = logits[:, context_length - 1:-1]
    logp = token_logprobs(logits, query_response[:, context_length:], temperature)
    values = out[1][:, context_length - 1:-1].float() if head == "both" else None
    return logp, values, logits


def critic_values(critic, query_response, attention_mask, context_length):
    return critic(query_response, attention_mask=attention_mask, head="score")[:, context_length - 1:-1].float()


# -----------------------------------------------------------------------------
# Steps 2-4 and step 5 of the loop, as functions the parity tests can call on fixed rollouts


@torch.no_grad()
def make_experience(policy, critic, ref, reward_model, query_response, query_mask, sample_logp, kl_coef, tok,
                    cfg: Config, d: Dist) -> dict:
    """Steps 2-4 on one rollout: score, KL and per-token rewards, values, GAE advantages and returns.

    query_response (B, P + N): left-padded prompts then responses, padded after the stop token;
    sample_logp (B, N): the sampling log-probs from `generate`. Returns a dict of (B, N) float32
    tensors and masks, everything the PPO update needs."""
    P = query_mask.size(1)
    response = query_response[:, P:]
    N = response.size(1)
    T_lp = cfg.temperature if cfg.divide_logits_by_temperature else 1.0
    # Masks. eos_index: the last valid token (the stop token, or N - 1 if the response never stopped).
    is_stop = response == tok.eos_id
    if cfg.stop_token_id >= 0:
        is_stop |= response == cfg.stop_token_id
    ended = is_stop.any(1)
    eos_index = torch.where(ended, first_true_indices(is_stop), torch.full_like(ended, N - 1, dtype=torch.long))
    positions = torch.arange(N, device=response.device)[None, :]
    action_mask = positions <= eos_index[:, None]  # the tokens the policy chose, EOS included
    score_idx = score_indices(eos_index, N, cfg.score_position)
    value_mask = positions <= score_idx[:, None]  # "after_eos": the critic also predicts the slot after EOS
    attention_mask = torch.cat([query_mask.long(), action_mask.long()], 1)

    # 2. Score with the frozen reward model; responses without EOS get the penalty.
    with offloaded(reward_model, cfg, d), autocast(d, cfg.bf16):
        scores = reward_scores(reward_model, query_response, attention_mask, P + eos_index)
    # A non-finite score (a diverged reward model, a bf16 overflow) would reach every advantage of the rollout
    # through whitening, then every weight of the policy: those responses take no part in the update (counted).
    nonfinite = ~torch.isfinite(scores)
    scores = scores.masked_fill(nonfinite, 0.0)
    action_mask, value_mask = action_mask & ~nonfinite[:, None], value_mask & ~nonfinite[:, None]
    scores = apply_missing_eos_penalty(scores, ended, cfg.missing_eos_penalty, cfg.missing_eos_mode)
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)

    # 3. Log-probs of policy and reference (logits / T, float32), values, KL, per-token rewards.
    with offloaded(ref, cfg, d), autocast(d, cfg.bf16):
        ref_logp, _, _ = response_logprobs(ref, query_response, attention_mask, P, T_lp)
    with autocast(d, cfg.bf16):
        recomputed_logp, values, _ = response_logprobs(policy, query_response, attention_mask, P, T_lp,
                                                       head="both" if critic is None else "lm")
        if critic is not None:
            values = critic_values(critic, query_response, attention_mask, P)
    # Old log-probs: the sampling ones (N+, TRL) or a fresh forward (OpenRLHF, verl). They should agree
    # (logged as val/logprob_recompute_maxdiff); bf16 or a KV-cache bug would make them differ.
    logp = sample_logp.float() * action_mask if cfg.old_logprobs == "sampling" else recomputed_logp * action_mask
    ref_logp = ref_logp * action_mask
    kl = kl_penalty(logp, ref_logp, cfg.kl_estimator, cfg.kl_clamp) * action_mask
    rewards, non_score_reward = compute_rewards(kl, scores, score_idx, kl_coef if cfg.kl_location == "reward" else 0.0)
    values = values * value_mask
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, value_mask, shift_mean=False, unbiased=cfg.unbiased_variance) * value_mask

    # 4. Advantages (GAE) and returns; whitening per the chosen convention.
    advantages, returns = compute_gae(rewards, values, value_mask, cfg.gamma, cfg.lam)
    advantages = whiten_advantages(advantages, action_mask, cfg.advantage_whitening, cfg.unbiased_variance, d)
    return dict(query_response=query_response, attention_mask=attention_mask, context_length=P,
                action_mask=action_mask, value_mask=value_mask, ended=ended, scores=scores, logp=logp,
                recomputed_logp=recomputed_logp * action_mask, ref_logp=ref_logp, values=values, rewards=rewards,
                non_score_reward=non_score_reward, advantages=advantages, returns=returns,
                nonfinite_scores=nonfinite.sum())


def ppo_update(policy, critic, trainable, optimizer, base_lrs, exp: dict, update: int, num_updates: int,
               cfg: Config, d: Dist, ptx_batch=None) -> dict:
    """Step 5: num_ppo_epochs passes over the rollout in num_minibatches optimizer steps, each
    accumulated over micro-batches. Returns the mean of each statistic and all token ratios."""
    local_batch = exp["query_response"].size(0)
    local_minibatch = local_batch // cfg.num_minibatches
    micro = min(cfg.micro_batch_size, local_minibatch)
    P, T_lp = exp["context_length"], cfg.temperature if cfg.divide_logits_by_temperature else 1.0
    stats = {k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "ratio", "entropy")}
    ratios, skipped_steps = [], 0
    # The learning rate is annealed once per update, constant through its epochs and minibatches
    # (OpenAI 2019, N+, TRL's scheduler step per update).
    lr_scale = lr_at(update, num_updates, 1.0, cfg.warmup_steps, cfg.lr_schedule)
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * lr_scale
    for ppo_epoch in range(cfg.num_ppo_epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + update * 131 + ppo_epoch)
        order = torch.randperm(local_batch, generator=g).tolist()
        for mb in range(cfg.num_minibatches):
            mb_idx = order[mb * local_minibatch:(mb + 1) * local_minibatch]
            mb_adv = exp["advantages"][mb_idx]
            if cfg.advantage_whitening == "minibatch":  # OpenAI 2019 whitens inside each minibatch
                mb_mask = exp["action_mask"][mb_idx]
                mb_adv = masked_whiten(mb_adv, mb_mask, unbiased=cfg.unbiased_variance) * mb_mask
            n_micro = len(mb_idx) // micro
            for i in range(n_micro):
                idx = mb_idx[i * micro:(i + 1) * micro]
                a_mask, v_mask = exp["action_mask"][idx], exp["value_mask"][idx]
                qr, attn = exp["query_response"][idx], exp["attention_mask"][idx]
                with autocast(d, cfg.bf16):
                    if critic is None:
                        new_logp, new_values, logits = response_logprobs(policy, qr, attn, P, T_lp, "both")
                    else:
                        new_logp, _, logits = response_logprobs(policy, qr, attn, P, T_lp)
                        new_values = critic_values(critic, qr, attn, P)
                pg_loss, pg_stats = policy_loss(new_logp, exp["logp"][idx], mb_adv[i * micro:(i + 1) * micro], a_mask,
                                                cfg.cliprange, cfg.dual_clip, cfg.loss_aggregation)
                vf_loss, vf_clipfrac = value_loss(new_values * v_mask, exp["values"][idx], exp["returns"][idx], v_mask,
                                                  cfg.cliprange_value, cfg.loss_aggregation)
                loss = pg_loss + cfg.vf_coef * vf_loss
                entropy = masked_mean(entropy_from_logits(logits), a_mask)  # logits are already / T
                if cfg.entropy_coef > 0:
                    loss = loss - cfg.entropy_coef * entropy
                if cfg.kl_location == "loss":  # GRPO-style: the KL is a loss term, not a reward
                    kl = kl_penalty(new_logp, exp["ref_logp"][idx], cfg.kl_estimator, cfg.kl_clamp)
                    loss = loss + cfg.kl_coef * masked_mean(kl, a_mask)
                if ptx_batch is not None:  # PPO-ptx (InstructGPT eq. 2): the SFT loss on demonstrations
                    loss = loss + cfg.ptx_coef * ptx_batch(micro, (update, ppo_epoch, mb, i))
                (loss / n_micro).backward()
                for key, value in (("approxkl", pg_stats["approxkl"]), ("clipfrac", pg_stats["clipfrac"]),
                                   ("pg_loss", pg_loss), ("vf_loss", vf_loss), ("vf_clipfrac", vf_clipfrac),
                                   ("ratio", pg_stats["ratio"]), ("entropy", entropy)):
                    stats[key].append(value.detach().float())
                ratios.append(torch.exp(new_logp - exp["logp"][idx]).detach()[a_mask])
            grad_norm = clip_grad_norm(trainable, cfg.grad_clip)  # grad_clip 0: the norm only
            skipped_steps += not step_if_finite(optimizer, loss, grad_norm, d)
    out = {k: torch.stack(v).mean() for k, v in stats.items()}
    out["skipped_steps"], out["optimizer_steps"] = skipped_steps, cfg.num_ppo_epochs * cfg.num_minibatches
    out["ratios"] = torch.cat(ratios)
    out["first_ratio"] = stats["ratio"][0]
    return out


def ptx_batch(policy, pairs, n, key, tok, cfg: Config, d: Dist):
    """PPO-ptx: the mean SFT loss on n demonstrations, drawn by a generator seeded from key = (update,
    epoch, minibatch, micro-batch), so a resumed run draws the same ones."""
    from sft import sft_loss
    update, epoch, mb, i = key
    g = torch.Generator().manual_seed(cfg.seed + ((update * 64 + epoch) * 1024 + mb) * 1024 + i)
    pick = torch.randint(len(pairs), (n,), generator=g).tolist()
    batch = {k: v.to(d.device) for k, v in data.collate_sft([pairs[j] for j in pick], tok.eos_id).items()}
    with autocast(d, cfg.bf16):
        logits = policy(batch["input_ids"], attention_mask=batch["attention_mask"])
    total, count = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    return total / count


@contextlib.contextmanager
def offloaded(model, cfg: Config, d: Dist):
    """With offload_frozen, a frozen model lives on CPU and visits the device only while it is used."""
    if cfg.offload_frozen:
        model.to(d.device)
    try:
        yield model
    finally:
        if cfg.offload_frozen:
            model.to("cpu")


# -----------------------------------------------------------------------------


CHOICES = {"critic": ("reward", "sft", "shared"), "kl_estimator": ("k1", "k3"), "kl_location": ("reward", "loss", "none"),
           "kl_signal": ("sequence_sum", "token_mean"), "score_position": ("eos", "after_eos"),
           "missing_eos_mode": ("replace", "subtract", "none"), "loss_aggregation": ("token_mean", "seq_mean_token_mean"),
           "advantage_whitening": ("rollout", "global", "minibatch", "mean_preserving", "none"),
           "old_logprobs": ("sampling", "recompute"), "lr_schedule": ("linear", "cosine", "constant")}


def validate(cfg: Config):
    """Refuse a typo'd convention before any work: `--kl_location=rewards` must not silently drop the KL."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name}={getattr(cfg, name)!r}: choose one of {allowed}")
    if cfg.old_logprobs == "sampling" and not cfg.divide_logits_by_temperature and cfg.temperature != 1.0:
        raise SystemExit("old_logprobs=sampling needs divide_logits_by_temperature: the sampling log-probs are of logits / T")


def apply_preset(argv):
    """--preset=NAME fills the config from PRESETS; explicit flags still win (parse_config order)."""
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), "")
    if name and name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dict(PRESETS.get(name, {}), preset=name) if name else {}


def build_models(cfg: Config, d: Dist):
    """Policy and reference from SFT, reward model, critic; frozen ones in eval mode, no grads."""
    policy = load_model(cfg.sft, "policy", d, trainable=True, scalar_head=(cfg.critic == "shared"))
    if cfg.critic == "shared":  # OpenAI 2019: value head on the policy trunk, zero-init
        nn.init.zeros_(policy.score.weight)
        nn.init.zeros_(policy.score.bias)
    ref = load_model(cfg.sft, "policy", d, trainable=False)
    reward_model = load_model(cfg.reward_model, "reward", d, trainable=False)
    if not reward_model.config.scalar_head:
        raise SystemExit(f"{cfg.reward_model} has no scalar head: is it a reward model checkpoint?")
    critic = None
    if cfg.critic in ("reward", "sft"):
        source, name = (cfg.reward_model, "reward") if cfg.critic == "reward" else (cfg.sft, "policy")
        critic = load_model(source, name, d, trainable=True, scalar_head=True)
        critic.config.reward_gain, critic.config.reward_bias = 1.0, 0.0  # a critic, not a reward model
    elif cfg.critic != "shared":
        raise SystemExit(f"unknown critic {cfg.critic!r}: reward, sft or shared")
    for m in [policy, critic] if critic is not None else [policy]:
        m.gradient_checkpointing = cfg.gradient_checkpointing
    return policy, ref, reward_model, critic


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(Config, [a for a in argv if not a.startswith("--preset=")], {"real": REAL_DATA}, **apply_preset(argv))
    validate(cfg)
    d = init_distributed(cfg.device)
    seed_all(cfg.seed)
    check_writable(cfg.run_dir)
    if cfg.rollout_batch_size % (d.world_size * cfg.num_minibatches):
        raise SystemExit("rollout_batch_size must divide into world_size x num_minibatches")
    local_batch = cfg.rollout_batch_size // d.world_size
    local_minibatch = local_batch // cfg.num_minibatches
    if local_minibatch % min(cfg.micro_batch_size, local_minibatch):
        raise SystemExit(f"per-process minibatch {local_minibatch} must be a multiple of micro_batch_size")

    # Models. The trainable ones go into one optimizer, so vf_coef and gradient clipping act on
    # policy and critic together (TRL's PolicyAndValueWrapper; N+).
    policy, ref, reward_model, critic = build_models(cfg, d)
    tok = data.get_tokenizer(policy.config.tokenizer)
    for m, name in ((policy, "policy"), (reward_model, "reward model")):
        check_context(m, cfg.max_prompt_tokens, cfg.response_length, f"ppo ({name})", "--max_prompt_tokens + --response_length")
    trainable = nn.ModuleDict({"policy": policy} | ({"critic": critic} if critic is not None else {}))
    for m in list(trainable.values()) + [ref, reward_model]:
        shard_model(m, d)
    groups = [{"params": list(policy.parameters()), "lr": cfg.lr}]
    if critic is not None:
        groups.append({"params": list(critic.parameters()), "lr": cfg.critic_lr or cfg.lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=cfg.adam_eps, weight_decay=0.0)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    if cfg.offload_frozen:
        ref.to("cpu"), reward_model.to("cpu")

    try:
        train_split, eval_source, eval_split = data.heldout_sources(cfg.dataset, cfg.eval_dataset)
        records = data.load_records(cfg.dataset, "prompt", train_split, seed=cfg.seed)
        eval_records = data.load_records(eval_source, "prompt", eval_split, max_records=cfg.eval_prompts, seed=cfg.seed)
        data.warn_if_leaked(records, eval_records, "ppo")
        if d.is_main:
            data.save_prompt_manifest(os.path.join(cfg.run_dir, "prompts.json"), records, eval_records)
        prompts, eval_prompts = [r["prompt"] for r in records], [r["prompt"] for r in eval_records]
    except data.DataError as e:
        raise SystemExit(f"ppo: {e}")
    encoded = [tok.encode(p) for p in prompts]
    prompt_ids = [ids[-cfg.max_prompt_tokens:] for ids in encoded]
    ptx_pairs = []
    if cfg.ptx_coef > 0:
        stats = data.TruncationStats()
        ptx_pairs = [data.encode_pair(tok, r["prompt"], r["response"], cfg.max_prompt_tokens, cfg.response_length, stats)
                     for r in data.load_records(cfg.ptx_dataset, "sft", split="train", seed=cfg.seed)]
    updates_per_epoch = len(prompt_ids) // cfg.rollout_batch_size
    if d.is_main:
        cut = sum(len(ids) > cfg.max_prompt_tokens for ids in encoded)
        print(f"ppo: {len(prompts)} train / {len(eval_prompts)} held-out prompts from {cfg.dataset}; truncated "
              f"{cut}/{len(prompts)} prompts (from the left) to {cfg.max_prompt_tokens} tokens; "
              f"{updates_per_epoch} updates per epoch")
    if updates_per_epoch == 0:
        raise SystemExit(f"{len(prompt_ids)} prompts, fewer than one rollout batch of {cfg.rollout_batch_size}")

    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    update = 0
    ckpt = latest_checkpoint(cfg.run_dir) if cfg.resume else None
    if ckpt:
        state = load_train_state(ckpt)
        for name, m in trainable.items():
            load_full_state_dict(m, GPT.from_pretrained(os.path.join(ckpt, name), scalar_head=m.config.scalar_head).state_dict())
        load_full_optimizer_state(trainable, optimizer, state["optimizers"]["ppo"])
        kl_ctl.value, update = state["state"]["kl_coef"], state["step"]
        if d.is_main:
            print(f"ppo: resumed from {ckpt} at update {update}")
    metrics_log = Metrics(cfg.run_dir, d, resume_step=update if ckpt else None, report_to=cfg.report_to, config=cfg)
    start_update, bad_streak = update, 0
    bar = progress_bar(cfg.num_updates, update, "ppo", d)

    while update < cfg.num_updates:
        t_start = time.time()
        epoch, index = divmod(update, updates_per_epoch)
        batch_prompts = list(data.batches(prompt_ids, local_batch, seed=cfg.seed, epoch=epoch, rank=d.rank,
                                          world_size=d.world_size))[index]
        query, query_mask = data.pad_left(batch_prompts, tok.eos_id)
        query, query_mask = query.to(d.device), query_mask.to(d.device)

        # 1. Rollout. Seeded by (seed, update, rank): a resumed run samples the same responses.
        policy.eval()  # dropout is off anyway; eval() also documents that sampling takes no gradients
        gen = torch.Generator(device=d.device).manual_seed(cfg.seed * 1_000_003 + update * 7919 + d.rank)
        with torch.no_grad(), unsharded(policy), autocast(d, cfg.bf16):
            query_response, sample_logp = generate(
                policy, query, query_mask, cfg.response_length, temperature=cfg.temperature, eos_id=tok.eos_id,
                stop_id=cfg.stop_token_id if cfg.stop_token_id >= 0 else None, pad_id=tok.eos_id, generator=gen)
        policy.train()
        t_rollout = time.time()

        # 2-4. Score, KL and rewards, advantages.
        exp = make_experience(policy, critic, ref, reward_model, query_response, query_mask, sample_logp,
                              kl_ctl.value, tok, cfg, d)
        t_score = time.time()

        # 5. PPO update: epochs x minibatches x micro-batches (gradient accumulation).
        stats = ppo_update(policy, critic, trainable, optimizer, base_lrs, exp, update, cfg.num_updates, cfg, d,
                           ptx_batch=(lambda n, key: ptx_batch(policy, ptx_pairs, n, key, tok, cfg, d)) if ptx_pairs else None)
        t_update = time.time()

        # 6. Log (TRL's metric names, so runs overlay), adapt beta, evaluate, checkpoint.
        with torch.no_grad():
            logp, ref_logp, action_mask, scores = exp["logp"], exp["ref_logp"], exp["action_mask"], exp["scores"]
            seq_kl = (kl_penalty(logp, ref_logp, "k1") * action_mask).sum(1)  # logged KL is always k1, summed (TRL)
            mean_kl = all_reduce_mean(seq_kl.mean(), d)
            token_kl = all_reduce_mean(masked_mean(kl_penalty(logp, ref_logp, "k1"), action_mask), d)
            all_ratios = stats["ratios"]
            row = {
                "objective/kl": mean_kl, "objective/entropy": all_reduce_mean((-logp * action_mask).sum(1).mean(), d),
                "objective/non_score_reward": all_reduce_mean(exp["non_score_reward"].sum(1).mean(), d),
                "objective/rlhf_reward": all_reduce_mean(exp["non_score_reward"].sum(1).mean() + scores.mean(), d),
                "objective/scores": all_reduce_mean(scores.mean(), d),
                "policy/approxkl_avg": all_reduce_mean(stats["approxkl"], d),
                "policy/clipfrac_avg": all_reduce_mean(stats["clipfrac"], d),
                "loss/policy_avg": all_reduce_mean(stats["pg_loss"], d),
                "loss/value_avg": all_reduce_mean(stats["vf_loss"], d),
                "val/clipfrac_avg": all_reduce_mean(stats["vf_clipfrac"], d),
                "policy/entropy_avg": all_reduce_mean(stats["entropy"], d),
                "val/ratio": all_reduce_mean(all_ratios.mean(), d), "val/ratio_var": all_reduce_mean(all_ratios.var(), d),
                "val/num_eos_tokens": all_reduce_sum(exp["ended"].sum().float(), d),
                "val/response_length": all_reduce_mean(action_mask.sum(1).float().mean(), d),
                "val/logprob_recompute_maxdiff": ((exp["recomputed_logp"] - logp) * action_mask).abs().max(),
                "beta": kl_ctl.value, "lr": optimizer.param_groups[0]["lr"],
                "episode": (update + 1) * cfg.rollout_batch_size,
                "time/rollout": t_rollout - t_start, "time/score": t_score - t_rollout, "time/update": t_update - t_score,
                "time/tokens_per_s": float(action_mask.sum()) * d.world_size / (t_update - t_start),
                "val/nonfinite_scores": all_reduce_sum(exp["nonfinite_scores"].float(), d),
                "policy/skipped_steps": stats["skipped_steps"],
            }
        if cfg.adaptive_kl:
            signal = mean_kl if cfg.kl_signal == "sequence_sum" else token_kl
            kl_ctl.update(float(signal), cfg.rollout_batch_size)
        update += 1
        bar.update(1)
        bad_streak = bad_streak + 1 if stats["skipped_steps"] == stats["optimizer_steps"] else 0
        if update % cfg.log_every == 0 or update == cfg.num_updates:
            metrics_log.log(update, row, echo=False)
            bar.set_postfix(score=f"{float(row['objective/scores']):.3f}", kl=f"{float(row['objective/kl']):.2f}")
        check_nonfinite_streak(bad_streak, cfg.max_nonfinite_steps, update, cfg.run_dir)  # before saving this state
        if update % cfg.eval_every == 0 or update == cfg.num_updates:
            metrics_log.log(update, evaluate(policy, ref, reward_model, tok, eval_prompts, cfg, d, update))
        stopping = cfg.stop_after and update - start_update >= cfg.stop_after
        if update % cfg.save_every == 0 or update == cfg.num_updates or stopping:
            path = save_checkpoint(cfg.run_dir, update, dict(trainable.items()), {"ppo": (trainable, optimizer)},
                                   {"kl_coef": kl_ctl.value}, cfg, d)
            if update == cfg.num_updates:
                publish_final(cfg.run_dir, path or "", d)
        if stopping:
            break
    bar.close()
    if update == cfg.num_updates:
        publish_missing_final(cfg.run_dir, d)
    if d.is_main and update == cfg.num_updates:
        print(f"ppo: done; policy in {cfg.run_dir}/final/policy")
    shutdown_distributed()


@torch.no_grad()
def evaluate(policy, ref, reward_model, tok, prompts, cfg: Config, d: Dist, update: int) -> dict:
    """Held-out prompts: learned reward, KL to the reference (sequence-summed k1), length, EOS rate, and
    on the default task the gold reward, so reward hacking shows as it happens (learned up, gold down)."""
    samples = sample_responses(policy, tok, prompts, d, cfg.response_length, cfg.temperature, seed=cfg.seed + 1,
                               max_prompt_tokens=cfg.max_prompt_tokens)
    with offloaded(ref, cfg, d), offloaded(reward_model, cfg, d):
        learned, kls = score_samples(samples, policy, ref, reward_model, tok, cfg.temperature, d)
    out = {"eval/learned_reward": sum(learned) / len(learned), "eval/kl": sum(kls) / len(kls),
           "eval/response_length": sum(s["length"] for s in samples) / len(samples),
           "eval/eos_fraction": sum(s["ended"] for s in samples) / len(samples)}
    if cfg.dataset == "default":
        out["eval/gold_reward"] = sum(data.gold_reward(s["prompt"], s["response"]) for s in samples) / len(samples)
    if d.is_main:
        for s, r in list(zip(samples, learned))[:cfg.num_samples_shown]:
            tqdm.write(f"  [update {update}] {s['prompt_shown']!r} -> {s['response']!r} learned={r:.3f}"
                       + (f" gold={data.gold_reward(s['prompt'], s['response']):.3f}" if cfg.dataset == "default" else ""))
    return out


if __name__ == "__main__":
    main()
