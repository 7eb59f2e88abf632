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

The critic-free group methods run the same loop with `--advantage_estimator=grpo|rloo|reinforce_pp|
reinforce_pp_baseline` and `--samples_per_prompt=n`: no critic is built, and step 4 compares the n responses
to each prompt instead of asking a critic (presets verl_grpo, trl_grpo, trl_rloo, openrlhf_reinforce_pp).

The math lives in small pure functions (`compute_gae`, `grpo_advantages`, `rloo_advantages`, `aggregate`,
`masked_whiten`, `kl_penalty`, `policy_loss`, `value_loss`, `AdaptiveKLController`, ...), each citing the
convention it follows; tests import them.
Every convention on which frameworks differ is a config field, and `--preset=trl|openrlhf|verl|...`
sets them all at once (PRESETS below; docs/conventions.md has the table). The defaults follow the N+
implementation details (Huang et al. 2024) and TRL, except where a comment says otherwise.

    python ppo.py --sft=runs/sft/final --reward_model=runs/rm/final
    python ppo.py --sft=runs/sft/final --reward_model=runs/rm_ens --reward_ensemble=uwo --uwo_lambda=1  # an RM ensemble
    torchrun --nproc_per_node=8 ppo.py --preset=trl ...
"""

import contextlib
import functools
import math
import time
import types
from dataclasses import dataclass

import torch
import torch.nn as nn

import data
from evaluate import reward_model_paths, reward_scores, sample_metrics, sample_responses, score_samples, sequence_kl, show_samples
from model import BaseModel, KVCache, generate, lora_flags, prefill_prompts_once, token_logprobs
from runtime import (Dist, adamw, all_reduce_mean, all_reduce_sum, apply_preset, autocast, batch_at, check_context,
                     check_nonfinite_streak, check_writable, clip_grad_norm, exit_preempted, init_distributed,
                     load_model, lr_at, parse_config, preempted, progress_bar, save_checkpoint, seed_all, shard_model,
                     run_main, shutdown_distributed, start_or_resume, step_if_finite, unsharded, watch_preemption)
from sft import loss_start, sft_loss


@dataclass
class Config:
    # --- models and data
    sft: str = "runs/sft/final"
    """the SFT checkpoint: the initial policy and the frozen reference"""
    reward_model: str = "runs/rm/final"
    """the reward model checkpoint (its normalization gain/bias is applied); "none": reward functions only"""
    reward_fn: str = ""
    """reward functions (RLVR), comma-separated "module:function" or "path/to/file.py:function", e.g.
    data:reverse_reward. Each is called as TRL's GRPOTrainer calls its reward_funcs (call_reward_functions) and
    returns one float or None per completion; alone (--reward_model=none) or added to the reward model's score"""
    reward_weights: str = ""
    """one weight per reward function, comma-separated (TRL GRPOConfig.reward_weights); empty = 1.0 each"""
    reward_model_weight: float = 1.0
    """the reward model's weight when reward functions are added to it: the score is the weighted sum over the
    reward model and each function (combine_rewards), the RM being one more of TRL's reward_funcs"""
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
    chat_template: str = "auto"
    """prompts rendered by a chat template: "auto" = the tokenizer's own if it has one (instruct models; GPT-2 and
    the char tokenizer have none), "none" = plain text, or a Jinja file (data.apply_chat_template)"""
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
    advantage_estimator: str = "gae"
    """"gae": critic + GAE (PPO); critic-free, no critic built: "grpo" (group mean/std), "rloo" (leave-one-out),
    "reinforce_pp" (discounted returns, then whitening; OpenRLHF/verl REINFORCE++), "reinforce_pp_baseline" (group mean subtracted first) (verl adv_estimator names)"""
    samples_per_prompt: int = 1
    """responses sampled per prompt in one rollout, one group (GRPO G, TRL num_generations, verl rollout.n, OpenRLHF n_samples_per_prompt)"""
    group_std_scaling: str = "group"
    """grpo only: divide by the group's std ("group", TRL scale_rewards, verl norm_adv_by_std_in_grpo), the whole batch's ("batch", TRL), or not ("none": Dr. GRPO); std is Bessel-corrected as in TRL and verl"""
    group_std_eps: float = 1e-6
    """grpo: A = (r - mean) / (std + eps); verl 1e-6, TRL 1e-4"""
    kl_coef: float = 0.1
    """beta, the KL penalty coefficient (initial value when adaptive); TRL and N+ use 0.05 (--preset=trl)"""
    kl_estimator: str = "k1"
    """per-token KL(pi || ref) estimate, x = logp - ref: "k1" = x (OAI/TRL/OpenRLHF default); "k2" = x^2 / 2 (verl mse); "k3" = exp(-x) - 1 + x (verl low_var_kl, TRL GRPO)"""
    kl_location: str = "reward"
    """"reward": -beta*KL per token in the reward (PPO); "loss": beta*KL added to the loss (GRPO, verl use_kl_loss); "none".
    "loss" with k1 is refused unless kl_is_weight: its expected gradient is zero (OpenRLHF PR #1309)"""
    kl_is_weight: bool = False
    """kl_location=loss: multiply the per-token KL by the ratio pi/pi_old, differentiable, so its expected gradient is that of KL(pi || ref) for k1 and k3 (TRL use_bias_correction_kl, default True since #6503; OpenRLHF unbiased_gradient PR #1309; DeepSeek-V3.2)"""
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
    min_response_tokens: int = 0
    """responses with fewer tokens than this before their EOS get short_response_penalty as their score (0 = off):
    for a reward model that likes empty answers (on HH, PPO answered with EOS alone within 10 updates)"""
    short_response_penalty: float = -1.0
    """the score of a too-short response (see min_response_tokens)"""
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
    """policy ratio clip epsilon (the lower one when clip_high is set: TRL epsilon, verl clip_ratio_low)"""
    clip_high: float = 0.0
    """upper clip epsilon, clip(ratio, 1 - cliprange, 1 + clip_high) (DAPO clip-higher 0.28; TRL epsilon_high, verl clip_ratio_high); 0 = cliprange"""
    importance_sampling_level: str = "token"
    """the ratio: per "token"; "sequence" = exp(mean of the log-ratios of the response) (GSPO; TRL importance_sampling_level); "sequence_sum" = exp(sum), TRL RLOOTrainer's"""
    cliprange_value: float = 0.2
    """value clip around the old values (OpenRLHF and verl: 0.5); 0 = no value clipping"""
    dual_clip: float = 0.0
    """dual-clip constant c for negative advantages (verl: 3.0 always on); 0 = off"""
    vf_coef: float = 0.1
    """loss = policy_loss + vf_coef * value_loss"""
    entropy_coef: float = 0.0
    """entropy bonus coefficient"""
    loss_aggregation: str = "token_mean"
    """how per-token losses become one number (verl agg_loss names; TRL loss_type in brackets): "token_mean": mean over the valid tokens of
    each micro-batch (TRL PPO, N+; bnpo); "global_token_mean": sum / valid tokens of the whole minibatch over all micro-batches and ranks
    (OpenRLHF, verl token-mean; dapo); "seq_mean_token_mean": each response's mean, averaged over the minibatch's responses (grpo);
    "seq_mean_token_sum": each response's sum, averaged; "seq_mean_token_sum_norm": that / response_length (Dr. GRPO; dr_grpo).
    All but token_mean are normalized over the whole minibatch, so micro_batch_size and the process count do not change the gradient"""
    old_logprobs: str = "sampling"
    """"sampling": log-probs recorded while generating (N+, TRL, torchtune); "recompute": a fresh forward pass (OpenRLHF, verl, DS-Chat)"""
    skip_unused_reference: bool = False
    """at kl_coef 0 without adaptive_kl the reference changes nothing in the update (its KL term is multiplied by 0):
    skip its forward, as TRL does not even load it at beta 0 (trl 1.12 grpo_trainer.py L968). Training is
    the same; objective/kl is then NaN, and held-out evaluations still measure the KL (eval/kl)"""
    logprob_check_every: int = 0
    """with old_logprobs=sampling the policy's recompute forward only feeds diagnostics (val/logprob_recompute_maxdiff,
    val/mismatch_kl, the top-k/top-p check): run it on every Nth update (1 = every update); 0 = on the updates that are
    logged (log_every), so every logged row still has them. Updates without it omit those two metrics; training is
    the same. With old_logprobs=recompute or a shared critic (one pass gives the values too) it runs every update"""
    compile_decode: bool = False
    """sample with model.generate(compile_step=True): the one-token decode step through torch.compile over a fixed-shape
    KV cache (CUDA graphs on CUDA, gpt-fast style; inductor's C++ kernels on CPU). Same tokens as eager; the first
    rollout pays the compile (tens of seconds on a CPU). Measured on CPU only (docs/benchmarks.md); off by default"""
    share_prompts: bool = False
    """run each distinct prompt of a rollout through the trunk once, not once per sample: in generation's prefill and
    in the policy's (and reference's) log-prob forwards, whose responses then attend to the prompt's cached keys and
    values (`model.prefill_prompts_once`). A group method's k samples per prompt then cost one prompt forward. Same
    samples, log-probs and gradients to float32 rounding (tests/test_perf_paths.py); one process only (untested
    under FSDP2, which would see two forwards per micro-batch). Off by default; launch.sh rlvr turns it on"""
    rollout_batch_size: int = 64
    """PROMPTS per update, over all processes; each is sampled samples_per_prompt times, so an update trains on
    rollout_batch_size x samples_per_prompt sequences whatever the number of processes (groups never straddle ranks)"""
    num_ppo_epochs: int = 2
    """passes over each rollout (TRL GRPO num_iterations, verl ppo_epochs). 2 on the built-in task: it ended as high
    on gold as TRL's and N+'s 4, at lower KL, in about two thirds of PPO's time (docs/lab.md); real data keeps 4"""
    num_minibatches: int = 1
    """optimizer steps per epoch; the rollout's sequences are split evenly among them"""
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
    lora_rank: int = 0
    """LoRA rank r (0 = full fine-tuning): trainable low-rank adapters on the block projections, base frozen (model.LoRALinear)"""
    lora_alpha: float = 16.0
    """LoRA scale: the update is B A x * lora_alpha / lora_rank (PEFT's scaling, not rsLoRA)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input (PEFT's lora_dropout)"""
    lora_targets: str = "all"
    """projections with adapters: "all" (attention q, k, v, o and the MLP), or HF names: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (Llama family), c_attn,c_proj,c_fc (GPT-2)"""
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
    keep_last: int = 2
    """checkpoints kept in run_dir (0: all); the newest is never deleted, older ones only once it checks out"""
    preempt_signals: str = "SIGTERM,SIGUSR1"
    """on these signals, finish the step, save a checkpoint and exit with code 75 (launch.sh: "preempted"); "" = off"""
    stop_after: int = 0
    """stop with a checkpoint after this many updates of this invocation (tests of resume); 0 = off"""
    seed: int = 0
    """seeds data order and sampling"""
    device: str = "auto"
    """auto, cpu or cuda"""
    bf16: bool = True
    """bf16 on CUDA (runtime.precision: FSDP2 bf16 compute / autocast, bf16 frozen models); false: float32
    throughout (the parity run). Ignored on CPU"""
    # --- sampler truncation and the sampler/trainer mismatch (REFERENCES 5.2a rows 5-6)
    top_k: int = 0
    """sample from the k most likely tokens only (0 = off). The policy's log-probs (sampling, recompute, update) are those of this truncated, renormalized distribution; the reference's stay full-vocabulary"""
    top_p: float = 1.0
    """nucleus sampling: the most likely tokens holding top_p of the mass (1 = off); log-probs as for top_k"""
    tis_cap: float = 0.0
    """truncated importance sampling, with old_logprobs=recompute: each token's policy loss x min(exp(old - sampling logp), tis_cap) (TRL vllm_importance_sampling_cap, OpenRLHF is_correction_mode=clip, verl rollout_is_threshold; 2.0 is verl's default); 0 = off"""
    # --- reward-model ensembles (Coste et al. 2023), when --reward_model names several (ensemble.json or a comma list)
    reward_ensemble: str = "mean"
    """how the members' scores combine (ensemble_reward): "mean"; "min" (worst-case optimization, WCO); "uwo"
    (uncertainty-weighted: mean - uwo_lambda x variance across members). One member: every mode is that member"""
    uwo_lambda: float = 1.0
    """UWO's penalty on the variance across members (population variance, in normalized-reward units squared)"""
    eval_greedy: bool = False
    """with reward functions, also answer the held-out prompts greedily (T = 0, the rate users see) and log each
    function's mean as eval/greedy/rewards/<name>/mean; eval/rewards/... are at the sampling temperature"""
    eval_at_start: bool = True
    """also evaluate before the first update (step 0 in metrics.jsonl): the start, d = sqrt(KL) = 0, of the
    over-optimization curve (plots.py gao)"""


# --profile=real: limits as sft.py's; lr 3e-6, beta 0.05 and 4 epochs are TRL's PPOConfig defaults
# (trl/experimental/ppo/ppo_config.py L124; the N+ TL;DR runs use beta 0.05 and 4 epochs too).
REAL_DATA = dict(max_prompt_tokens=384, response_length=128, lr=3e-6, kl_coef=0.05, micro_batch_size=8,
                 num_ppo_epochs=4)


# Each framework's conventions, read from its source (REFERENCES.md section 2; docs/conventions.md has the table
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
    # The group methods: no critic, n samples per prompt. Every knob that matters to them is listed.
    "verl_grpo": dict(  # verl examples/grpo_trainer/run_qwen2-7b.sh (n=5, use_kl_loss, kl_loss_coef 0.001,
        # low_var_kl, mini-batch 256 of 1024 prompts), core_algos.py (GRPO eps 1e-6, unbiased std, dual clip c=3,
        # k3 clamp 10), _generated_ppo_trainer.yaml (token-mean over the global batch, clip 0.2, ppo_epochs 1)
        advantage_estimator="grpo", samples_per_prompt=5, group_std_scaling="group", group_std_eps=1e-6,
        kl_estimator="k3", kl_location="loss", kl_is_weight=False, kl_clamp=10.0, adaptive_kl=False, kl_coef=0.001,
        score_position="eos", missing_eos_mode="none", reward_clip=0.0, whiten_rewards=False,
        advantage_whitening="none", unbiased_variance=True, gamma=1.0, lam=1.0, cliprange=0.2, clip_high=0.0,
        importance_sampling_level="token", dual_clip=3.0, loss_aggregation="global_token_mean",
        old_logprobs="recompute", temperature=1.0, divide_logits_by_temperature=True, num_ppo_epochs=1,
        num_minibatches=4, lr=1e-6, lr_schedule="constant"),
    "trl_grpo": dict(  # trl/trainer/grpo_config.py (trl 1.12.0): num_generations 8, beta 0 (KL off; a --kl_coef
        # turns on TRL's k3-in-loss with use_bias_correction_kl=True), scale_rewards "group" (eps 1e-4 in
        # grpo_trainer.py L2809), loss_type "dapo", epsilon 0.2, epsilon_high None, importance_sampling_level
        # "token", num_iterations 1, lr 1e-6, temperature 1.0; HF TrainingArguments: linear schedule, adam eps
        # 1e-8, max_grad_norm 1.0. One generation batch = one optimizer step (steps_per_generation = GA).
        advantage_estimator="grpo", samples_per_prompt=8, group_std_scaling="group", group_std_eps=1e-4,
        kl_estimator="k3", kl_location="loss", kl_is_weight=True, kl_clamp=0.0, adaptive_kl=False, kl_coef=0.0,
        score_position="eos", missing_eos_mode="none", reward_clip=0.0, whiten_rewards=False,
        advantage_whitening="none", unbiased_variance=True, gamma=1.0, lam=1.0, cliprange=0.2, clip_high=0.0,
        importance_sampling_level="token", dual_clip=0.0, loss_aggregation="global_token_mean",
        old_logprobs="recompute", temperature=1.0, divide_logits_by_temperature=True, num_ppo_epochs=1,
        num_minibatches=1, lr=1e-6, lr_schedule="linear", adam_eps=1e-8, grad_clip=1.0),
    "trl_rloo": dict(  # trl/trainer/rloo_config.py + rloo_trainer.py (trl 1.12.0): num_generations 2, beta 0.05
        # as sequence-summed k1 subtracted from the reward (L1571-1580), leave-one-out baseline, normalize_advantages
        # False, one ratio per sequence exp(sum of log-ratios) clipped at 0.2, loss = mean over sequences (L1728-1737)
        advantage_estimator="rloo", samples_per_prompt=2, kl_estimator="k1", kl_location="reward", kl_is_weight=False,
        kl_clamp=0.0, adaptive_kl=False, kl_coef=0.05, score_position="eos", missing_eos_mode="none",
        reward_clip=0.0, whiten_rewards=False, advantage_whitening="none", unbiased_variance=True, gamma=1.0,
        lam=1.0, cliprange=0.2, clip_high=0.0, importance_sampling_level="sequence_sum", dual_clip=0.0,
        loss_aggregation="seq_mean_token_mean", old_logprobs="recompute", temperature=1.0,
        divide_logits_by_temperature=True, num_ppo_epochs=1, num_minibatches=1, lr=1e-6, lr_schedule="linear",
        adam_eps=1e-8, grad_clip=1.0),
    "openrlhf_reinforce_pp": dict(  # openrlhf/cli/train_ppo_ray.py (0.11.2): --algo.advantage.estimator reinforce,
        # n_samples_per_prompt 1, k1 in the reward with init_coef 0.01, gamma 1, eps_clip 0.2, token-mean over the
        # optimizer step, rollout 1024 / train batch 128 = 8 steps, max_epochs 1, reward clip 10;
        # experience_maker.py: cumulative returns, then global whitening with the population variance
        advantage_estimator="reinforce_pp", samples_per_prompt=1, kl_estimator="k1", kl_location="reward",
        kl_is_weight=False, kl_clamp=10.0, adaptive_kl=False, kl_coef=0.01, kl_signal="token_mean",
        score_position="eos", missing_eos_mode="none", reward_clip=10.0, whiten_rewards=False,
        advantage_whitening="global", unbiased_variance=False, gamma=1.0, lam=1.0, cliprange=0.2, clip_high=0.0,
        importance_sampling_level="token", dual_clip=0.0, loss_aggregation="global_token_mean",
        old_logprobs="recompute", temperature=1.0, divide_logits_by_temperature=True, num_ppo_epochs=1,
        num_minibatches=8, lr=1e-6, lr_schedule="cosine"),
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
    KL divergence", 2020), x = logp - ref; verl `kl_penalty_forward` (core_algos.py L2216-2251) names them.

    k1 = x: unbiased, can be negative per token (OpenAI 2019, TRL/OpenRLHF default; verl "kl").
    k2 = x^2 / 2: biased value, >= 0; as a loss its on-policy gradient is that of KL (verl "mse").
    k3 = exp(-x) - 1 + x: unbiased, >= 0, lower variance (TRL GRPO, verl "low_var_kl"). Computed as
    expm1(-x) + x: exp(-x) - 1 cancels catastrophically for tiny x and came out negative in float32.
    Which of them give the right *gradient* in the loss or the reward: tests/test_bug03_kl_gradient.py.
    clamp > 0 clips the estimate to [-clamp, clamp] (OpenRLHF `compute_approx_kl`, verl k3: 10)."""
    log_ratio = logp.float() - ref_logp.float()
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * log_ratio ** 2
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}: k1, k2 or k3")
    return kl.clamp(-clamp, clamp) if clamp > 0 else kl


def ensemble_reward(member_scores: torch.Tensor, mode: str, uwo_lambda: float = 0.0) -> torch.Tensor:
    """The score PPO optimizes from K reward models: member_scores (K, B) -> (B,), float32.

    Coste, Anwar, Kirk, Krueger 2023, "Reward Model Ensembles Help Mitigate Overoptimization" (arXiv:2310.02743),
    section 3, for each (prompt q, response a) with member rewards R_1..R_K:
        mean: R_mean = (1/K) sum_i R_i
        WCO:  R_WCO  = min_i R_i                                        (worst-case optimization)
        UWO:  R_UWO  = (1/K) sum_i R_i - lambda * (1/K) sum_i (R_i - R_mean)^2   (uncertainty-weighted optimization)
    The variance is the population one (1/K), as the paper writes it; with K = 1 it is 0 and all three are R_1.
    Each member is normalized on its own (mean 0 on SFT samples, reward_model.py), so they share one scale.
    A non-finite member score makes the combined score non-finite, and make_experience masks that response out."""
    scores = member_scores.float()
    if mode == "mean":
        return scores.mean(0)
    if mode == "min":
        return scores.min(0).values
    if mode == "uwo":
        return scores.mean(0) - uwo_lambda * scores.var(0, unbiased=False)
    raise ValueError(f"unknown reward ensemble {mode!r}: mean, min or uwo")


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


# The critic-free estimators. A rollout holds groups of samples_per_prompt = n consecutive responses to one
# prompt; each response has one scalar reward r (its score plus its summed per-token KL reward, if any).


def group_centered(rewards: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """r - mean(r of its group), (B,) -> (B,), groups of n consecutive rows. valid (B,) bool leaves responses out
    of their group's statistics (a non-finite score: TRL's unscorable completions, grpo_trainer.py L2777-2786);
    they get 0. A group whose valid rewards are all equal, or that has fewer than 2, gets exactly 0: the float
    mean need not equal the rewards (8 x 0.35 sums with rounding), and that residue over a ~0 std became
    advantages of 1e3-1e4 (NeMo-RL PR #4161); one valid reward made TRL's nanstd NaN (PR #5773)."""
    g = rewards.view(-1, n)
    v = torch.ones_like(g, dtype=torch.bool) if valid is None else valid.view(-1, n)
    count = v.sum(1, keepdim=True)
    mean = torch.where(v, g, 0).sum(1, keepdim=True) / count.clamp(min=1)
    spread = g.masked_fill(~v, -torch.inf).amax(1, keepdim=True) - g.masked_fill(~v, torch.inf).amin(1, keepdim=True)
    degenerate = (count < 2) | (spread == 0)
    return torch.where(v & ~degenerate, g - mean, torch.zeros_like(g)).view(-1)


def grpo_advantages(rewards: torch.Tensor, n: int, std_scaling: str = "group", eps: float = 1e-6,
                    batch_std: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A = (r - group mean) / (std + eps), (B,) -> (B,).

    std_scaling "group": the group's Bessel-corrected std (verl `compute_grpo_outcome_advantage` L268-331 with
    eps 1e-6; TRL GRPOTrainer `scale_rewards="group"` with eps 1e-4, grpo_trainer.py L2787-2809); "batch": the
    std of all rewards of the rollout (TRL "batch"; pass batch_std when the rollout spans ranks); "none": no
    division (Dr. GRPO, Liu et al. 2025; verl norm_adv_by_std_in_grpo=False, OpenRLHF dr_grpo). valid: see
    group_centered; invalid responses are left out of every statistic."""
    centered = group_centered(rewards, n, valid)
    if std_scaling == "none":
        return centered
    v = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    if std_scaling == "group":
        count = v.view(-1, n).sum(1, keepdim=True)
        var = (centered.view(-1, n) ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
        std = var.sqrt().expand(-1, n).reshape(-1)
    elif std_scaling == "batch":
        std = rewards[v].std() if batch_std is None else batch_std
    else:
        raise ValueError(f"unknown group_std_scaling {std_scaling!r}: group, batch or none")
    return torch.where(centered == 0, centered, centered / (std + eps))  # 0, not 0 / 0, for a zero-std group


def rloo_advantages(rewards: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): A_i = r_i - mean of the other n - 1 rewards of its group,
    = n / (n - 1) * (r_i - group mean). (B,) -> (B,). verl `compute_rloo_outcome_advantage` (L588-636), TRL
    RLOOTrainer (rloo_trainer.py L1582-1597), OpenRLHF `rloo` (experience_maker.py L268-270). With valid, n is
    each group's count of valid responses (TRL's scorable count)."""
    v = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    count = v.view(-1, n).sum(1, keepdim=True).expand(-1, n).reshape(-1).to(rewards.dtype)
    return group_centered(rewards, n, valid) * count / (count - 1).clamp(min=1)


def reinforce_pp_baseline(scores: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): the group's mean score is subtracted from each score before the
    per-token KL reward joins it; then returns and whitening as reinforce_pp_returns. (B,) -> (B,). OpenRLHF
    `reinforce_baseline` (experience_maker.py L271-272). verl's version (L536-584) subtracts the mean of the
    summed token rewards and skips the per-token KL; the two agree when the KL is not in the reward."""
    return group_centered(scores, n, valid)


def reinforce_pp_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025): the advantage is the discounted return of the per-token rewards (score at the
    end, -beta * KL on every token), G_t = r_t + gamma * G_{t+1}, then whitened over the batch by the caller
    (advantage_whitening). rewards, mask: (B, N) -> (B, N), zero outside the mask. OpenRLHF
    `get_cumulative_returns` (experience_maker.py L390-421), verl `compute_reinforce_plus_plus_outcome_advantage`
    (L694-731; it also whitens)."""
    mask = mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def aggregate(losses: torch.Tensor, mask: torch.Tensor, mode: str, batch_tokens=None, batch_seqs=None,
              horizon: int | None = None, world_size: int = 1) -> torch.Tensor:
    """Reduce (B, N) per-token losses of one micro-batch to the scalar this rank backpropagates (verl `agg_loss`,
    core_algos.py L1140-1207, whose mode names these are with _ for -).

    "token_mean": mean over this micro-batch's valid tokens (TRL PPO, N+; TRL GRPO "bnpo"); ppo_update averages
    it over micro-batches, so a micro-batch with few tokens weighs as much as one with many.
    The others are normalized over the whole minibatch: batch_tokens / batch_seqs are the valid tokens / non-empty
    responses of the minibatch summed over all its micro-batches and all ranks (ppo_update all-reduces them), and
    the result is scaled by world_size because data-parallel training averages gradients over ranks. Summing the
    returned values over micro-batches and averaging over ranks then gives the same number, and gradient, for any
    micro_batch_size and process count (TRL PR #6024, verl #5625; tests/test_bug02_grad_accum_norm.py).
    None means this micro-batch is the whole minibatch.
      "global_token_mean": sum / batch_tokens (OpenRLHF, verl "token-mean"; TRL "dapo").
      "seq_mean_token_mean": sum over responses of their token mean / batch_seqs (TRL "grpo").
      "seq_mean_token_sum": sum over responses of their token sum / batch_seqs.
      "seq_mean_token_sum_norm": that / horizon, a constant (response_length) (Dr. GRPO; TRL "dr_grpo").
    Responses with no valid token (a non-finite score clears their mask) count nowhere and get zero gradient."""
    mask = mask.to(losses.dtype)
    masked = losses * mask
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if mode == "global_token_mean":
        n_tokens = mask.sum() if batch_tokens is None else batch_tokens
        return masked.sum() / n_tokens * world_size
    lengths = mask.sum(1)
    n_seqs = (lengths > 0).sum() if batch_seqs is None else batch_seqs
    if mode == "seq_mean_token_mean":
        per_seq = masked.sum(1) / lengths.clamp(min=1)  # clamp: an empty response is 0 / 1, not 0 / 0 = NaN
    elif mode in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        per_seq = masked.sum(1)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    loss = per_seq.sum() / n_seqs * world_size
    if mode == "seq_mean_token_sum_norm":
        loss = loss / (horizon or mask.size(1))
    return loss


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2, dual_clip: float = 0.0, aggregation: str = "token_mean",
                clip_high: float = 0.0, importance_sampling_level: str = "token", **normalizers):
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimize:
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)) per token, aggregated over the mask (`aggregate`,
    which takes the minibatch `normalizers`).

    clip_high > 0 sets eps_high apart from eps (DAPO clip-higher; TRL epsilon_high, verl clip_ratio_high).
    importance_sampling_level "sequence": one ratio per response, exp(mean over its tokens of the log-ratio),
    broadcast to its tokens (GSPO, Zheng et al. 2025; TRL grpo_trainer.py L3173-3180; with seq_mean_token_mean
    this equals verl `compute_policy_loss_gspo`); "sequence_sum": exp(sum), the response's probability ratio
    (TRL RLOOTrainer, rloo_trainer.py L1728-1737). Advantages must then be constant over each response.
    dual_clip = c > 1 additionally caps the loss at -A * c where A < 0 (Ye et al. 2020; verl
    `compute_policy_loss_vanilla`, always on with c = 3). Returns (loss, stats) with clipfrac (fraction
    of tokens where the clipped term is the max, TRL's definition) and approxkl = 0.5 * mean(diff^2)
    (OpenAI 2019, TRL)."""
    log_ratio = logp - old_logp
    if importance_sampling_level == "token":
        log_weight = log_ratio
    elif importance_sampling_level in ("sequence", "sequence_sum"):
        per_seq = (log_ratio * mask).sum(1)
        if importance_sampling_level == "sequence":
            per_seq = per_seq / mask.sum(1).clamp(min=1)
        log_weight = per_seq[:, None].expand_as(log_ratio)
    else:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    ratio = torch.exp(log_weight)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + (clip_high or cliprange))
    losses = torch.max(losses1, losses2)
    if dual_clip > 0:
        losses = torch.where(advantages < 0, torch.min(losses, -advantages * dual_clip), losses)
    loss = aggregate(losses, mask, aggregation, **normalizers)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((losses2 > losses1).float(), mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def truncated_is_weight(old_logp: torch.Tensor, sample_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): min(exp(old_logp - sample_logp), cap) per token, (B, N) -> (B, N), no gradient.

    The tokens were drawn from the sampler's distribution (sample_logp), while PPO's ratio is taken against
    the recomputed old log-probs; the weight corrects the policy loss for that gap, truncated at cap for a
    bounded variance. Token level as TRL `vllm_importance_sampling_mode="token_truncate"` (grpo_trainer.py),
    OpenRLHF `PolicyLoss` is_correction_mode="clip" (models/loss.py) and verl
    `compute_rollout_correction_weights(rollout_is="token")` (trainer/ppo/rollout_corr_helper.py L522-596)."""
    return torch.exp(old_logp.float() - sample_logp.float()).clamp(max=cap).detach()


def mismatch_kl(sample_logp: torch.Tensor, recomputed_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(sampler || trainer) estimated with k3 on the sampled tokens, averaged over the mask: how far
    the recomputed log-probs are from those the sampler recorded (bf16 numerics, kernels, a truncation
    mismatch). verl logs the same quantity as `rollout_corr/k3_kl` (rollout_corr_helper.py L960-966); exactly
    0 when both are computed alike in float32 (Qi et al. 2025, OpenRLHF #1155, for why it grows under bf16)."""
    return masked_mean(kl_penalty(sample_logp, recomputed_logp, "k3"), mask)


def check_truncated_recompute(sample_logp: torch.Tensor, recomputed_logp: torch.Tensor, mask: torch.Tensor):
    """With top-k/top-p on, fail loudly when the recomputed log-probs cannot be those of the sampled
    distribution (REFERENCES 5.2a row 5; TRL #6789: ratio mean 0.896 = the kept mass at top_p 0.8):
    - a sampled token with -inf: it lies outside the recomputed top-k/top-p set (a changed support);
    - every token lower than its sampling log-prob, by 0.01 nats on average: the recompute renormalized
      over the full vocabulary (each log-prob is then low by -log of the kept mass). Numerical noise, as
      bf16's, scatters both ways and does not trigger this."""
    m = mask.bool()
    if not m.any():
        return
    if torch.isinf(recomputed_logp[m]).any():
        raise RuntimeError("--top_k/--top_p: a sampled token lies outside the recomputed top-k/top-p set "
                           "(its recomputed log-prob is -inf); sampling and recompute disagree on the support")
    gap = (recomputed_logp - sample_logp.float())[m]
    if gap.mean() < -0.01 and (gap < 0).float().mean() > 0.95:
        raise RuntimeError(f"--top_k/--top_p is on, but the recomputed log-probs are lower than the sampling ones on "
                           f"{float((gap < 0).float().mean()):.0%} of tokens (mean {float(gap.mean()):.3f} nats): "
                           "the recompute uses the full vocabulary, not the truncated distribution that was sampled")


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2, aggregation: str = "token_mean", **normalizers):
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2) over the mask (OpenAI 2019,
    TRL, OpenRLHF `ValueLoss`). cliprange_value = 0 turns clipping off. Returns (loss, clipfrac)."""
    losses1 = (values - returns) ** 2
    if cliprange_value > 0:
        clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        losses2 = (clipped - returns) ** 2
    else:
        losses2 = losses1
    loss = 0.5 * aggregate(torch.max(losses1, losses2), mask, aggregation, **normalizers)
    return loss, masked_mean((losses2 > losses1).float(), mask).detach()


def loss_side_kl(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: float = 0.0,
                 is_weight: bool = False) -> torch.Tensor:
    """The per-token KL term of kl_location=loss, (B, N), differentiated through logp (the policy's current
    log-probs). is_weight multiplies it by the ratio pi / pi_old = exp(logp - old_logp), old a constant: its
    value is the plain estimate on-policy, but its gradient becomes r * (logp - ref) * grad logp for k3 (and
    r * (logp - ref + 1) * grad logp for k1), whose expectation over the sampled tokens is grad KL(pi || ref)
    (TRL `use_bias_correction_kl`, grpo_trainer.py L3187-3194 and PR #6503; OpenRLHF PR #1309; verl PR #2953
    derives the bias of plain k3). Without it, k2 is unbiased only on-policy, k3 descends KL(ref || pi) and k1
    has zero expected gradient (tests/test_bug03_kl_gradient.py enumerates every case)."""
    kl = kl_penalty(logp, ref_logp, estimator, clamp)
    return kl * torch.exp(logp - old_logp) if is_weight else kl


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, float32: logsumexp(z) - sum(p * z)."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def entropy_term(logits: torch.Tensor, mask: torch.Tensor, entropy_coef: float) -> torch.Tensor:
    """Masked mean entropy of one micro-batch, logits (B, N, V), mask (B, N) -> scalar. With entropy_coef 0 it is
    only logged, so it is computed under no_grad: with gradients the softmax (B, N, V) would be kept for the
    backward, ~1.6 GB at B=64, N=128, V=50257 in float32 (tests/test_scale.py checks no graph is kept)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_coef != 0):
        return masked_mean(entropy_from_logits(logits), mask)


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


def apply_short_response_penalty(scores: torch.Tensor, lengths: torch.Tensor, min_tokens: int,
                                 penalty: float) -> torch.Tensor:
    """score := penalty for responses of fewer than min_tokens tokens (EOS not counted), the EOS trick's twin for
    degenerate short answers; OpenRLHF and verl have length penalties for the other end (DAPO's overlong
    punishment). scores, lengths: (B,)."""
    return torch.where(lengths < min_tokens, torch.full_like(scores, penalty), scores) if min_tokens > 0 else scores


def degeneration_warnings(length: float, first_length: float, kl: float, last_kl: float | None) -> list[str]:
    """Plain-language warnings for the two signs of a policy gaming its reward model: the mean response length
    collapsing to under a quarter of the first rollout's, and the KL more than doubling (by over 1 nat) in one update."""
    out = []
    if first_length > 0 and length < 0.25 * first_length:
        out.append(f"mean response length fell from {first_length:.1f} to {length:.1f} tokens: the policy may be "
                   f"exploiting a reward model that likes short answers (see --min_response_tokens)")
    if last_kl is not None and kl > 2 * last_kl + 1.0:
        out.append(f"KL to the reference jumped from {last_kl:.2f} to {kl:.2f} nats per sequence in one update "
                   f"(raise --kl_coef, lower --lr)")
    return out


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
# Reward functions (RLVR): Python code that scores a completion, in place of or added to the reward model


class RewardFunctionError(RuntimeError):
    """A reward function misbehaved. The message names the function and the row. It is raised while scoring
    (step 2), before any optimizer step of the update, so the run's last checkpoint is still its last good state."""


RM_NAME = "reward_model"  # the reward model's name among the reward functions (metrics rewards/reward_model/...)


def load_reward_functions(spec: str, weights: str) -> list[tuple[str, object, float]]:
    """--reward_fn and --reward_weights -> [(name, function, weight)]. Each entry is "module:function" (imported
    from the Python path, the repo first: "data:reverse_reward") or "path/to/file.py:function" (verl's
    custom_reward_function.path/name, OpenRLHF's reward file). The name is the function's __name__, as TRL names
    its metrics (grpo_trainer.py L512-531); weights default to 1.0 each (TRL reward_weights, L534-542)."""
    import importlib
    import importlib.util
    import os
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    ws = [float(w) for w in weights.split(",") if w.strip()] if weights else [1.0] * len(entries)
    if len(ws) != len(entries):
        raise SystemExit(f"--reward_weights has {len(ws)} weights for {len(entries)} reward functions")
    out = []
    for entry, w in zip(entries, ws):
        target, _, attr = entry.rpartition(":")
        if not target or not attr:
            raise SystemExit(f"--reward_fn={entry!r}: write module:function or path/to/file.py:function")
        try:
            if target.endswith(".py"):
                if not os.path.isfile(target):
                    raise SystemExit(f"--reward_fn={entry!r}: no such file {target}")
                module_spec = importlib.util.spec_from_file_location(os.path.basename(target)[:-3], target)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(target)
        except ImportError as e:
            raise SystemExit(f"--reward_fn={entry!r}: cannot import {target} ({e})")
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise SystemExit(f"--reward_fn={entry!r}: {target} has no function {attr!r}")
        name = getattr(fn, "__name__", attr)
        if name in [n for n, _, _ in out] + [RM_NAME]:
            raise SystemExit(f"--reward_fn: two reward functions named {name!r}; their metrics would collide")
        out.append((name, fn, w))
    return out


def call_reward_functions(fns, prompts: list, completions: list, completion_ids: list, columns: dict,
                          extra: dict | None = None, where: str = "") -> torch.Tensor:
    """Each function's reward of each completion: (B, F) float32, NaN where it returned None.

    The call is TRL GRPOTrainer's (_calculate_rewards, grpo_trainer.py L1632-1689): keywords only, prompts (the
    records' prompts before any chat template), completions (decoded text, stop token dropped), completion_ids
    (the response's ids, stop token included, no padding), and every other record field as a list aligned with
    them (columns; the "answer" of a checkable task), plus `extra` (trainer_state, log_metric, log_extra), so a TRL
    user's function runs unchanged. TRL's None -> NaN. Unlike TRL, NaN or inf returned by a function and any
    non-number are errors: None is the way to say "no reward for this one". Errors name the function and the row."""
    B = len(prompts)
    out = torch.empty(B, len(fns))
    kwargs = dict(columns, **(extra or {}))
    row = lambda i: f"{where}row {i}: prompt {prompts[i][-80:]!r}, completion {completions[i][:80]!r}"  # noqa: E731
    for j, (name, fn, _) in enumerate(fns):
        try:
            values = list(fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
        except Exception as e:
            # Find the first row that raises on its own, to name it (the functions are per-completion anyway).
            bad = next((i for i in range(B) if _raises(fn, prompts, completions, completion_ids, kwargs, i)), None)
            at = row(bad) if bad is not None else f"{where}the batch of {B} (no single row raises alone)"
            raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e} (at {at})") from e
        if len(values) != B:
            raise RewardFunctionError(f"reward function {name!r} returned {len(values)} rewards for {B} completions "
                                      f"({where}rows 0..{B - 1}); it must return one float or None per completion")
        for i, v in enumerate(values):
            if v is None:
                out[i, j] = float("nan")
                continue
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise RewardFunctionError(f"reward function {name!r} returned {v!r} ({type(v).__name__}), not a "
                                          f"number, for {row(i)}") from None
            if not math.isfinite(x):
                raise RewardFunctionError(f"reward function {name!r} returned {x} for {row(i)}; return None for "
                                          f"'no reward' (TRL's convention), never NaN or inf")
            out[i, j] = x
    return out


def _raises(fn, prompts, completions, completion_ids, kwargs, i) -> bool:
    one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == len(prompts) else v) for k, v in kwargs.items()}
    try:
        fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1], completion_ids=completion_ids[i:i + 1], **one)
        return False
    except Exception:
        return True


def trl_extra(update: int, cfg: Config, log_metric=lambda name, value: None) -> dict:
    """The extra keywords TRL's GRPOTrainer passes its reward functions: trainer_state (global_step, max_steps),
    log_metric, and log_extra (TRL's completions table; none here, so it is ignored)."""
    return dict(trainer_state=types.SimpleNamespace(global_step=update, max_steps=cfg.num_updates),
                log_metric=log_metric, log_extra=lambda *a, **k: None)


def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, F) rewards, NaN = None -> (B,) score: the weighted sum over the functions that scored the row (nansum),
    NaN where none did. TRL's multi_objective_aggregation="sum_then_normalize" (grpo_trainer.py L2779-2787: nansum,
    then unscorable rows set to NaN); a NaN score takes the row out of the group statistics and the update, as
    make_experience treats a non-finite score (TRL: excluded from nanmean/nanstd, advantage 0)."""
    scores = (rewards_per_func.float() * weights.float()[None, :]).nansum(1)
    return scores.masked_fill(rewards_per_func.isnan().all(1), float("nan"))


def reward_function_metrics(rewards_per_func: torch.Tensor, names: list[str], d: Dist, prefix: str = "") -> dict:
    """rewards/<name>/mean and /std of each function over the rollout of all ranks, leaving out its None rows:
    TRL's names and statistics (grpo_trainer.py L2843-2848: nanmean, nanstd with Bessel's correction)."""
    out = {}
    for j, name in enumerate(names):
        x = rewards_per_func[:, j].to(d.device, torch.float64)
        ok = ~x.isnan()
        n = all_reduce_sum(ok.sum().double(), d)
        total = all_reduce_sum(x[ok].sum(), d)
        mean = total / n
        sq = all_reduce_sum(((x[ok] - mean) ** 2).sum(), d)
        out[f"{prefix}rewards/{name}/mean"] = float(mean)
        out[f"{prefix}rewards/{name}/std"] = float((sq / (n - 1)).sqrt()) if n > 1 else float("nan")
    return out


def function_rewards(reward_fns, rm_scores: torch.Tensor | None, rm_weight: float, rows: list[dict],
                     completions: list[str], completion_ids: list[list[int]], extra: dict | None = None, where: str = ""):
    """Step 2 with reward functions: (rewards_per_func (B, F'), names, combined score (B,)). F' counts the reward
    model first (named RM_NAME, weight rm_weight) when there is one. rows: one record per completion, {"prompt",
    other fields}. A row that every function left None, with no reward model, is an error: TRL only warns
    (grpo_trainer.py L1716-1730), but a row without a reward is a data or function bug. A non-finite reward-model
    score keeps its old meaning: the row is left out of the update (make_experience)."""
    prompts = [r["prompt"] for r in rows]
    keys = [k for k in rows[0] if k not in ("prompt", "completion", "completion_ids")] if rows else []
    columns = {k: [r.get(k) for r in rows] for k in keys}
    per_func = call_reward_functions(reward_fns, prompts, completions, completion_ids, columns, extra, where)
    names, weights = [n for n, _, _ in reward_fns], [w for _, _, w in reward_fns]
    if rm_scores is None:
        unscorable = per_func.isnan().all(1)
        if unscorable.any():
            i = int(unscorable.nonzero()[0, 0])
            raise RewardFunctionError(f"every reward function ({', '.join(names)}) returned None for {where}row {i}: "
                                      f"prompt {prompts[i][-80:]!r}, completion {completions[i][:80]!r}")
        return per_func, names, combine_rewards(per_func, torch.tensor(weights))
    rm = rm_scores.float().cpu()
    per_func = torch.cat([rm[:, None], per_func], 1)
    combined = combine_rewards(per_func, torch.tensor([rm_weight] + weights))
    return per_func, [RM_NAME] + names, torch.where(torch.isfinite(rm), combined, rm)


# -----------------------------------------------------------------------------
# Forward passes over prompt + response


def response_logprobs(model, query_response, attention_mask, context_length, temperature, head="lm", top_k=0, top_p=1.0,
                      share_prompts=False):
    """Log-probs (float32) of the response tokens, and values when head="both": position
    context_length - 1 + t predicts response token t, and holds the value of the state before it.
    top_k/top_p: the sampler's truncation, so the policy's log-probs are of the distribution sampled.
    share_prompts (head="lm"): each distinct prompt runs through the trunk once (`model.prefill_prompts_once`),
    then the responses attend to its cached keys and values; same log-probs and gradients to float32 rounding."""
    if share_prompts and head == "lm":
        B, T = query_response.shape
        cache = KVCache(model.config, B, T, query_response.device, next(model.parameters()).dtype)
        last_prompt = prefill_prompts_once(model, query_response[:, :context_length],
                                           attention_mask[:, :context_length], cache)
        rest = model(query_response[:, context_length:], attention_mask=attention_mask, kv_cache=cache)
        out = torch.cat([last_prompt, rest], 1)
    else:
        # The heads run on positions context_length - 1 .. T - 1 only (GPT.forward's logits_from): the prompt's
        # logits are never read.
        out = model(query_response, attention_mask=attention_mask, head=head, logits_from=context_length - 1)
    logits = out[0] if head == "both" else out
    logits = logits[:, :-1]
    logp = token_logprobs(logits, query_response[:, context_length:], temperature, top_k, top_p)
    values = out[1][:, :-1].float() if head == "both" else None
    return logp, values, logits


def critic_values(critic, query_response, attention_mask, context_length):
    """Values (B, N) float32 of the states before each response token (the critic's scalar head)."""
    return critic(query_response, attention_mask=attention_mask, head="score",
                  logits_from=context_length - 1)[:, :-1].float()


# -----------------------------------------------------------------------------
# Steps 2-4 and step 5 of the loop, as functions the parity tests can call on fixed rollouts


def response_masks(response: torch.Tensor, eos_id: int, stop_token_id: int, score_position: str):
    """The masks of a (B, N) response batch: (ended (B,), eos_index (B,), action_mask, score_idx (B,), value_mask).

    eos_index: the last valid token (the first stop token, EOS or stop_token_id >= 0, or N - 1 if the response
    never stopped). action_mask: the tokens the policy chose, EOS included (TRL's non-pad part of
    truncate_response). value_mask: up to score_idx (score_indices), so with "after_eos" the critic also
    predicts the slot after EOS (TRL's padding_mask_p1)."""
    N = response.size(1)
    is_stop = response == eos_id
    if stop_token_id >= 0:
        is_stop |= response == stop_token_id
    ended = is_stop.any(1)
    eos_index = torch.where(ended, first_true_indices(is_stop), torch.full_like(ended, N - 1, dtype=torch.long))
    positions = torch.arange(N, device=response.device)[None, :]
    score_idx = score_indices(eos_index, N, score_position)
    return ended, eos_index, positions <= eos_index[:, None], score_idx, positions <= score_idx[:, None]


@torch.no_grad()
def make_experience(policy, critic, ref, reward_model, query_response, query_mask, sample_logp, kl_coef, tok,
                    cfg: Config, d: Dist, check_logprobs: bool = True, reward_fns=None, fn_rows=None,
                    fn_extra=None, where: str = "") -> dict:
    """Steps 2-4 on one rollout: score, KL and per-token rewards, values, advantages (GAE or a critic-free
    estimator) and returns.

    query_response (B, P + N): left-padded prompts then responses, padded after the stop token; with
    samples_per_prompt = n, rows n*i .. n*i + n - 1 answer the same prompt (one group);
    sample_logp (B, N): the sampling log-probs from `generate`. Returns a dict of (B, N) float32
    tensors and masks, everything the PPO update needs. check_logprobs False (old_logprobs=sampling, a critic of its
    own or none): skip the policy's recompute forward, which then only feeds diagnostics; exp["recomputed_logp"]
    and exp["mismatch_kl"] are None. reward_fns (load_reward_functions), with fn_rows (the record of each row: prompt
    and fields) and fn_extra (TRL's trainer_state, log_metric, log_extra): scored by code too (function_rewards);
    reward_model None: by code only. `where` prefixes the rows that error messages name."""
    P = query_mask.size(1)
    response = query_response[:, P:]
    T_lp = cfg.temperature if cfg.divide_logits_by_temperature else 1.0
    ended, eos_index, action_mask, score_idx, value_mask = response_masks(response, tok.eos_id, cfg.stop_token_id,
                                                                          cfg.score_position)
    attention_mask = torch.cat([query_mask.long(), action_mask.long()], 1)

    # 2. Score with the frozen reward model, or each member of an ensemble in turn (one on the device at a time
    #    with offload_frozen), combined per --reward_ensemble; responses without EOS get the penalty.
    #    Reward functions (RLVR) score the decoded completions, alone or added to the reward model's score.
    member_scores = []
    for member in rm_list(reward_model):
        with offloaded(member, cfg, d), autocast(d, cfg.bf16):
            member_scores.append(reward_scores(member, query_response, attention_mask))  # at P + eos_index
    scores = ensemble_reward(torch.stack(member_scores), cfg.reward_ensemble, cfg.uwo_lambda) if member_scores else None
    rewards_per_func = reward_names = None
    if reward_fns:
        ids = [row[m].tolist() for row, m in zip(response.cpu(), action_mask.cpu())]  # stop token included (TRL)
        texts = [tok.decode(r[:-1] if e else r) for r, e in zip(ids, ended.tolist())]
        rewards_per_func, reward_names, scores = function_rewards(reward_fns, scores, cfg.reward_model_weight, fn_rows,
                                                                  texts, ids, fn_extra, where)
        scores = scores.to(response.device)
    # A non-finite score (a diverged reward model, a bf16 overflow) would reach every advantage of the rollout
    # through whitening, then every weight of the policy: those responses take no part in the update (counted).
    nonfinite = ~torch.isfinite(scores)
    scores = scores.masked_fill(nonfinite, 0.0)
    action_mask, value_mask = action_mask & ~nonfinite[:, None], value_mask & ~nonfinite[:, None]
    scores = apply_missing_eos_penalty(scores, ended, cfg.missing_eos_penalty, cfg.missing_eos_mode)
    scores = apply_short_response_penalty(scores, eos_index, cfg.min_response_tokens, cfg.short_response_penalty)
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)

    # 3. Log-probs of policy and reference (logits / T, float32), values, KL, per-token rewards.
    skip_ref = cfg.skip_unused_reference and kl_coef == 0 and not cfg.adaptive_kl
    if not skip_ref:
        with offloaded(ref, cfg, d), autocast(d, cfg.bf16):
            ref_logp, _, _ = response_logprobs(ref, query_response, attention_mask, P, T_lp,
                                               share_prompts=cfg.share_prompts)
    uses_critic = cfg.advantage_estimator == "gae"  # the group estimators need no values (no critic is built)
    shared_critic = critic is None and uses_critic  # one forward gives log-probs and values
    recomputed_logp = values = None
    with autocast(d, cfg.bf16):
        if cfg.old_logprobs == "recompute" or shared_critic or check_logprobs:
            recomputed_logp, values, _ = response_logprobs(policy, query_response, attention_mask, P, T_lp,
                                                           "both" if shared_critic else "lm", cfg.top_k, cfg.top_p,
                                                           cfg.share_prompts)
        if critic is not None:
            values = critic_values(critic, query_response, attention_mask, P)
        if values is None:
            values = torch.zeros_like(sample_logp, dtype=torch.float32)
    # Old log-probs: the sampling ones (N+, TRL) or a fresh forward (OpenRLHF, verl). They should agree
    # (logged as val/logprob_recompute_maxdiff); bf16 or a KV-cache bug would make them differ.
    logp = sample_logp.float() * action_mask if cfg.old_logprobs == "sampling" else recomputed_logp * action_mask
    if (cfg.top_k > 0 or cfg.top_p < 1.0) and recomputed_logp is not None:
        check_truncated_recompute(sample_logp, recomputed_logp, action_mask)
    # TIS: recomputed old log-probs, but tokens drawn by the sampler; weights of 1 when off.
    tis = cfg.tis_cap > 0 and cfg.old_logprobs == "recompute"
    tis_weight = truncated_is_weight(recomputed_logp, sample_logp, cfg.tis_cap) if tis else torch.ones_like(logp)
    ref_logp = logp.detach().clone() if skip_ref else ref_logp * action_mask  # skipped: a KL of 0, times beta 0
    kl = kl_penalty(logp, ref_logp, cfg.kl_estimator, cfg.kl_clamp) * action_mask
    n = cfg.samples_per_prompt
    # REINFORCE++-baseline (OpenRLHF): the group mean leaves the score before the per-token KL joins it.
    scored = ~nonfinite  # a response without a score takes no part in its group's statistics either
    baselined = reinforce_pp_baseline(scores, n, scored) if cfg.advantage_estimator == "reinforce_pp_baseline" else scores
    rewards, non_score_reward = compute_rewards(kl, baselined, score_idx,
                                                kl_coef if cfg.kl_location == "reward" else 0.0)
    values = values * value_mask
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, value_mask, shift_mean=False, unbiased=cfg.unbiased_variance) * value_mask

    # 4. Advantages and returns; whitening per the chosen convention (the group presets turn it off).
    if cfg.advantage_estimator == "gae":
        advantages, returns = compute_gae(rewards, values, value_mask, cfg.gamma, cfg.lam)
    elif cfg.advantage_estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        # value_mask: with score_position=after_eos the score sits one slot past the last action token.
        advantages = returns = reinforce_pp_returns(rewards, value_mask, cfg.gamma) * action_mask
    else:  # grpo, rloo: one number per response, its score plus its summed KL reward (verl: token rewards summed;
        # TRL RLOOTrainer subtracts beta * the summed k1), the same advantage on each of its tokens.
        seq_reward = rewards.sum(1)
        if cfg.advantage_estimator == "rloo":
            seq_adv = rloo_advantages(seq_reward, n, scored)
        else:
            batch_std = None
            if cfg.group_std_scaling == "batch" and d.distributed:  # the std of the whole rollout, all ranks
                count = all_reduce_sum(scored.sum().float(), d)
                mean = all_reduce_sum(seq_reward[scored].sum(), d) / count
                batch_std = (all_reduce_sum(((seq_reward[scored] - mean) ** 2).sum(), d) / (count - 1)).sqrt()
            seq_adv = grpo_advantages(seq_reward, n, cfg.group_std_scaling, cfg.group_std_eps, batch_std, scored)
        advantages = returns = seq_adv[:, None] * action_mask
    advantages = whiten_advantages(advantages, action_mask, cfg.advantage_whitening, cfg.unbiased_variance, d)
    return dict(query_response=query_response, attention_mask=attention_mask, context_length=P,
                action_mask=action_mask, value_mask=value_mask, ended=ended, scores=scores, logp=logp,
                recomputed_logp=None if recomputed_logp is None else recomputed_logp * action_mask,
                ref_logp=ref_logp, ref_skipped=skip_ref, values=values, rewards=rewards,
                non_score_reward=non_score_reward, advantages=advantages, returns=returns,
                nonfinite_scores=nonfinite.sum(), tis_weight=tis_weight * action_mask,
                mismatch_kl=None if recomputed_logp is None else
                mismatch_kl(sample_logp.float() * action_mask, recomputed_logp * action_mask, action_mask),
                rewards_per_func=rewards_per_func, reward_names=reward_names,
                kl_coef=kl_coef)  # the beta of this update, for a loss-side KL


def ppo_update(policy, critic, trainable, optimizer, base_lrs, exp: dict, update: int, num_updates: int,
               cfg: Config, d: Dist, ptx_batch=None) -> dict:
    """Step 5: num_ppo_epochs passes over the rollout in num_minibatches optimizer steps, each
    accumulated over micro-batches. Returns the mean of each statistic and all token ratios.

    Loss normalization: token_mean averages per-micro-batch means (divided by the number of micro-batches);
    every other aggregation divides by counts of the whole minibatch over all ranks (`minibatch_normalizers`),
    so each micro-batch's loss is already its share of the minibatch's and is not divided again."""
    local_batch = exp["query_response"].size(0)
    local_minibatch = local_batch // cfg.num_minibatches
    micro = min(cfg.micro_batch_size, local_minibatch)
    P, T_lp = exp["context_length"], cfg.temperature if cfg.divide_logits_by_temperature else 1.0
    stats = {k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "ratio", "entropy")}
    uses_critic = cfg.advantage_estimator == "gae"
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
            accumulation = n_micro if cfg.loss_aggregation == "token_mean" else 1
            # Dr. GRPO's constant is the maximum response length, not this rollout's (TRL max_completion_length).
            a_norm = minibatch_normalizers(exp["action_mask"][mb_idx], cfg.response_length, d)
            v_norm = minibatch_normalizers(exp["value_mask"][mb_idx], cfg.response_length, d)
            for i in range(n_micro):
                idx = mb_idx[i * micro:(i + 1) * micro]
                a_mask, v_mask = exp["action_mask"][idx], exp["value_mask"][idx]
                qr, attn = exp["query_response"][idx], exp["attention_mask"][idx]
                with autocast(d, cfg.bf16):
                    if critic is None and uses_critic:
                        new_logp, new_values, logits = response_logprobs(policy, qr, attn, P, T_lp, "both", cfg.top_k, cfg.top_p)
                    else:
                        new_logp, _, logits = response_logprobs(policy, qr, attn, P, T_lp, "lm", cfg.top_k, cfg.top_p,
                                                                cfg.share_prompts)
                        new_values = critic_values(critic, qr, attn, P) if critic is not None else None
                # TIS scales A by a positive weight, which scales each token's clipped loss by it (1 when off).
                adv = mb_adv[i * micro:(i + 1) * micro] * exp["tis_weight"][idx]
                pg_loss, pg_stats = policy_loss(new_logp, exp["logp"][idx], adv, a_mask,
                                                cfg.cliprange, cfg.dual_clip, cfg.loss_aggregation, cfg.clip_high,
                                                cfg.importance_sampling_level, **a_norm)
                if new_values is not None:
                    vf_loss, vf_clipfrac = value_loss(new_values * v_mask, exp["values"][idx], exp["returns"][idx],
                                                      v_mask, cfg.cliprange_value, cfg.loss_aggregation, **v_norm)
                else:  # critic-free: no value loss
                    vf_loss = vf_clipfrac = torch.zeros((), device=new_logp.device)
                loss = pg_loss + cfg.vf_coef * vf_loss
                if cfg.kl_location == "loss":  # GRPO-style: the KL is a loss term, aggregated as the policy loss
                    kl = loss_side_kl(new_logp, exp["logp"][idx], exp["ref_logp"][idx], cfg.kl_estimator, cfg.kl_clamp,
                                      cfg.kl_is_weight)
                    # The current beta (adaptive, or restored on resume), as the reward-side KL uses.
                    loss = loss + exp["kl_coef"] * aggregate(kl, a_mask, cfg.loss_aggregation, **a_norm)
                # Terms that are means of this micro-batch alone (TRL adds its entropy bonus this way too).
                per_micro = torch.zeros((), device=new_logp.device)
                entropy = entropy_term(logits, a_mask, cfg.entropy_coef)  # logits are already / T
                if cfg.entropy_coef > 0:
                    per_micro = per_micro - cfg.entropy_coef * entropy
                if ptx_batch is not None:  # PPO-ptx (InstructGPT eq. 2): the SFT loss on demonstrations
                    per_micro = per_micro + cfg.ptx_coef * ptx_batch(micro, (update, ppo_epoch, mb, i))
                loss = loss / accumulation + per_micro / n_micro
                loss.backward()
                # Logged losses are per-micro-batch means or, for the global modes, this micro-batch's share x n_micro,
                # so that their mean over micro-batches (and all_reduce_mean over ranks) is the minibatch's loss.
                share = n_micro / accumulation
                for key, value in (("approxkl", pg_stats["approxkl"]), ("clipfrac", pg_stats["clipfrac"]),
                                   ("pg_loss", pg_loss * share), ("vf_loss", vf_loss * share),
                                   ("vf_clipfrac", vf_clipfrac), ("ratio", pg_stats["ratio"]), ("entropy", entropy)):
                    stats[key].append(value.detach().float())
                ratios.append(torch.exp(new_logp - exp["logp"][idx]).detach()[a_mask])
            grad_norm = clip_grad_norm(trainable, cfg.grad_clip)  # grad_clip 0: the norm only
            skipped_steps += not step_if_finite(optimizer, loss, grad_norm, d)
    out = {k: torch.stack(v).mean() for k, v in stats.items()}
    out["skipped_steps"], out["optimizer_steps"] = skipped_steps, cfg.num_ppo_epochs * cfg.num_minibatches
    out["ratios"] = torch.cat(ratios)
    out["first_ratio"] = stats["ratio"][0]
    return out


def minibatch_normalizers(mask: torch.Tensor, horizon: int, d: Dist) -> dict:
    """What `aggregate`'s minibatch-wide modes divide by: the valid tokens and the non-empty responses of this
    rank's minibatch mask (B_mb, N), summed over all ranks, the constant horizon, and the world size."""
    return dict(batch_tokens=all_reduce_sum(mask.sum().float(), d), batch_seqs=all_reduce_sum(mask.any(1).sum().float(), d),
                horizon=horizon, world_size=d.world_size)


def ptx_batch(policy, pairs, n, key, tok, cfg: Config, d: Dist):
    """PPO-ptx: the mean SFT loss on n demonstrations, drawn by a generator seeded from key = (update,
    epoch, minibatch, micro-batch), so a resumed run draws the same ones."""
    update, epoch, mb, i = key
    g = torch.Generator().manual_seed(cfg.seed + ((update * 64 + epoch) * 1024 + mb) * 1024 + i)
    pick = torch.randint(len(pairs), (n,), generator=g).tolist()
    batch = data.collate_sft([pairs[j] for j in pick], tok.eos_id)
    first = loss_start(batch["loss_mask"])
    batch = {k: v.to(d.device) for k, v in batch.items()}
    with autocast(d, cfg.bf16):
        logits = policy(batch["input_ids"], attention_mask=batch["attention_mask"], logits_from=first)
    total, count = sft_loss(logits, batch["input_ids"], batch["loss_mask"], first)
    return total / count


def rm_list(reward_model) -> list:
    """The reward model's members: [] without one (--reward_model=none), the list of an ensemble, else [it]."""
    if reward_model is None:
        return []
    return list(reward_model) if isinstance(reward_model, (list, tuple)) else [reward_model]


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


CHOICES = {"critic": ("reward", "sft", "shared"), "kl_estimator": ("k1", "k2", "k3"), "kl_location": ("reward", "loss", "none"),
           "kl_signal": ("sequence_sum", "token_mean"), "score_position": ("eos", "after_eos"),
           "missing_eos_mode": ("replace", "subtract", "none"),
           "loss_aggregation": ("token_mean", "global_token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                "seq_mean_token_sum_norm"),
           "advantage_whitening": ("rollout", "global", "minibatch", "mean_preserving", "none"),
           "old_logprobs": ("sampling", "recompute"), "lr_schedule": ("linear", "cosine", "constant"),
           "advantage_estimator": ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"),
           "group_std_scaling": ("group", "batch", "none"), "importance_sampling_level": ("token", "sequence", "sequence_sum")}

# TRL GRPOConfig.loss_type -> loss_aggregation (trl/trainer/grpo_trainer.py L3241-3263; tests/test_parity_trl_grpo.py
# runs each). "bnpo" divides by the tokens of the local micro-batch; "dapo" by those of the whole accumulated batch
# over all processes (num_items_in_batch); "dr_grpo" by micro-batch size x max_completion_length, which summed over
# equal micro-batches is the minibatch's responses x that constant; "grpo" averages each response's token mean.
TRL_LOSS_TYPES = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm",
                  "dapo": "global_token_mean"}


def validate(cfg: Config):
    """Refuse a typo'd convention before any work: `--kl_location=rewards` must not silently drop the KL."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name}={getattr(cfg, name)!r}: choose one of {allowed}")
    if cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise SystemExit(f"--top_k={cfg.top_k} --top_p={cfg.top_p}: top_k >= 0 (0 = off), 0 < top_p <= 1 (1 = off)")
    if (cfg.top_k > 0 or cfg.top_p < 1) and not cfg.divide_logits_by_temperature:
        raise SystemExit("--top_k/--top_p need divide_logits_by_temperature: the log-probs must be of the distribution sampled")
    if cfg.logprob_check_every < 0:
        raise SystemExit(f"--logprob_check_every={cfg.logprob_check_every}: use 0 (on logged updates) or N >= 1")
    if cfg.tis_cap < 0 or (cfg.tis_cap > 0 and cfg.old_logprobs != "recompute"):
        raise SystemExit(f"--tis_cap={cfg.tis_cap}: TIS weights recomputed old log-probs against the sampling ones; "
                         "it needs --old_logprobs=recompute (with sampling log-probs every weight is 1)")
    if cfg.old_logprobs == "sampling" and not cfg.divide_logits_by_temperature and cfg.temperature != 1.0:
        raise SystemExit("old_logprobs=sampling needs divide_logits_by_temperature: the sampling log-probs are of logits / T")
    if cfg.samples_per_prompt < 1:
        raise SystemExit(f"--samples_per_prompt={cfg.samples_per_prompt}: at least 1")
    if cfg.advantage_estimator in ("grpo", "rloo", "reinforce_pp_baseline") and cfg.samples_per_prompt < 2:
        raise SystemExit(f"--advantage_estimator={cfg.advantage_estimator} compares the responses to one prompt: "
                         f"set --samples_per_prompt to 2 or more (it is {cfg.samples_per_prompt})")
    if cfg.kl_location == "loss" and cfg.kl_estimator == "k1" and not cfg.kl_is_weight:
        raise SystemExit("--kl_location=loss --kl_estimator=k1 regularizes nothing: the gradient of logp - ref is the score "
                         "function, whose expectation is zero (OpenRLHF PR #1309). Use --kl_estimator=k2 or k3, "
                         "--kl_is_weight (the IS-weighted form, unbiased; TRL #6503), or --kl_location=reward")
    if cfg.reward_ensemble not in ("mean", "min", "uwo"):
        raise SystemExit(f"--reward_ensemble={cfg.reward_ensemble!r}: choose mean, min (WCO) or uwo")
    if cfg.uwo_lambda < 0:
        raise SystemExit(f"--uwo_lambda={cfg.uwo_lambda}: a penalty on the variance, >= 0")
    if cfg.kl_is_weight and cfg.kl_location != "loss":
        raise SystemExit("--kl_is_weight weights the loss-side KL; it needs --kl_location=loss")
    if cfg.reward_model == "none" and not cfg.reward_fn:
        raise SystemExit("--reward_model=none needs --reward_fn: nothing would score the responses")


def build_models(cfg: Config, d: Dist):
    """Policy and reference from SFT, reward model, critic; frozen ones in eval mode, no grads. The critic-free
    estimators get no critic and no value head (critic None): three models, not four."""
    uses_critic = cfg.advantage_estimator == "gae"
    # Under torchrun each model is built on the meta device, sharded, and each rank reads only its own shards
    # (runtime.load_model shard=True); weight dtypes follow --bf16 (runtime.precision: frozen models bf16 on CUDA
    # only with --bf16; --bf16=false is a float32 run throughout).
    load = functools.partial(load_model, d=d, bf16=cfg.bf16, shard=True)
    policy = load(cfg.sft, "policy", trainable=True, scalar_head=(cfg.critic == "shared" and uses_critic), **lora_flags(cfg))
    if cfg.critic == "shared" and uses_critic:  # OpenAI 2019: value head on the policy trunk, zero-init
        nn.init.zeros_(policy.score.weight)
        nn.init.zeros_(policy.score.bias)
    # With --lora_rank the reference is the policy's frozen base with its adapters off (model.BaseModel; TRL GRPO's
    # disable_adapter, verl's ref_in_actor), not a second copy of the SFT weights.
    ref = BaseModel(policy) if cfg.lora_rank else load(cfg.sft, "policy", trainable=False)
    # One reward model, or an ensemble (reward_model.py --ensemble_size): a list of frozen models, one per member.
    rm_paths = reward_model_paths(cfg.reward_model) if cfg.reward_model != "none" else []
    members = [load(path, "reward", trainable=False) for path in rm_paths]
    for path, member in zip(rm_paths, members):
        if not member.config.scalar_head:
            raise SystemExit(f"{path} has no scalar head: is it a reward model checkpoint?")
    reward_model = (members[0] if len(members) == 1 else members) if members else None
    critic = None
    if cfg.critic not in ("reward", "sft", "shared"):
        raise SystemExit(f"unknown critic {cfg.critic!r}: reward, sft or shared")
    if cfg.critic in ("reward", "sft") and uses_critic:
        # Without a reward model (reward functions only) the critic starts from SFT, as verl's always does.
        from_rm = cfg.critic == "reward" and rm_paths
        source, name = (rm_paths[0], "reward") if from_rm else (cfg.sft, "policy")  # an ensemble's member 0
        # An SFT checkpoint has no score head: its fresh draw comes from the global generator after a plain
        # build (which draws too), so it is loaded whole and sharded later, to match a one-process run.
        # With --lora_rank the critic gets adapters of its own on its own frozen trunk, its value head trained in
        # full (OpenRLHF and verl give the critic LoRA the same way). Its trunk is the reward model's (or the SFT's),
        # not the policy's, so it cannot share the policy's base.
        critic = load(source, name, trainable=True, scalar_head=True, shard=bool(from_rm), **lora_flags(cfg))
        critic.config.reward_gain, critic.config.reward_bias = 1.0, 0.0  # a critic, not a reward model
    for m in [policy, critic] if critic is not None else [policy]:
        m.gradient_checkpointing = cfg.gradient_checkpointing
    return policy, ref, reward_model, critic


def checks_logprobs(update: int, cfg: Config) -> bool:
    """Whether update (0-based) runs the diagnostic recompute (--logprob_check_every): on the updates that are
    logged by default (ppo.main logs after update + 1 when it is a multiple of log_every, and the last)."""
    if cfg.logprob_check_every == 0:
        return (update + 1) % cfg.log_every == 0 or update + 1 == cfg.num_updates
    return update % cfg.logprob_check_every == 0


def make_optimizer(policy, critic, cfg: Config):
    """One AdamW over policy and critic, so vf_coef and gradient clipping act on both together (TRL's
    PolicyAndValueWrapper; N+); no weight decay, betas (0.9, 0.999) (N+, TRL)."""
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": cfg.lr}]  # LoRA: adapters only
    if critic is not None:
        groups.append({"params": [p for p in critic.parameters() if p.requires_grad], "lr": cfg.critic_lr or cfg.lr})
    return adamw(groups, betas=(0.9, 0.999), eps=cfg.adam_eps, weight_decay=0.0)  # fused where torch has it


@torch.no_grad()
def rollout(policy, query, query_mask, update: int, tok, cfg: Config, d: Dist):
    """Step 1: sample a response to each prompt, seeded by (seed, update, rank) so a resumed run samples the same.
    Returns (query_response (B, P + N), sampling log-probs (B, N)); see model.generate."""
    policy.eval()  # dropout is off anyway; eval() also documents that sampling takes no gradients
    gen = torch.Generator(device=d.device).manual_seed(cfg.seed * 1_000_003 + update * 7919 + d.rank)
    with unsharded(policy), autocast(d, cfg.bf16):
        out = generate(policy, query, query_mask, cfg.response_length, temperature=cfg.temperature, eos_id=tok.eos_id,
                       stop_id=cfg.stop_token_id if cfg.stop_token_id >= 0 else None, pad_id=tok.eos_id, generator=gen,
                       top_k=cfg.top_k, top_p=cfg.top_p, compile_step=cfg.compile_decode, share_prompts=cfg.share_prompts)
    policy.train()
    return out


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(Config, [a for a in argv if not a.startswith("--preset=")], {"real": REAL_DATA},
                       **apply_preset(argv, PRESETS))
    validate(cfg)
    reward_fns = load_reward_functions(cfg.reward_fn, cfg.reward_weights)  # a bad --reward_fn fails before any work
    d = init_distributed(cfg.device)
    seed_all(cfg.seed)
    check_writable(cfg.run_dir)
    preemption = watch_preemption(cfg.preempt_signals)  # SIGTERM: save at the end of this step, exit 75
    if cfg.share_prompts and d.world_size > 1:
        raise SystemExit(f"--share_prompts: one process only ({d.world_size} here); see its help")
    # rollout_batch_size counts prompts; each rank samples samples_per_prompt responses to each of its prompts.
    if cfg.rollout_batch_size % d.world_size:
        raise SystemExit(f"rollout_batch_size {cfg.rollout_batch_size} (prompts) must divide among {d.world_size} processes")
    local_prompts = cfg.rollout_batch_size // d.world_size
    local_batch = local_prompts * cfg.samples_per_prompt  # sequences on this rank
    if local_batch % cfg.num_minibatches:
        raise SystemExit(f"per-process rollout of {local_batch} sequences must split into num_minibatches={cfg.num_minibatches}")
    local_minibatch = local_batch // cfg.num_minibatches
    if local_minibatch % min(cfg.micro_batch_size, local_minibatch):
        raise SystemExit(f"per-process minibatch {local_minibatch} must be a multiple of micro_batch_size")

    # Models. The trainable ones go into one optimizer, so vf_coef and gradient clipping act on
    # policy and critic together (TRL's PolicyAndValueWrapper; N+).
    policy, ref, reward_model, critic = build_models(cfg, d)
    tok = data.get_tokenizer(policy.config.tokenizer)
    rm_members = rm_list(reward_model)
    for m, name in [(policy, "policy")] + [(m, "reward model") for m in rm_members[:1]]:
        check_context(m, cfg.max_prompt_tokens, cfg.response_length, f"ppo ({name})", "--max_prompt_tokens + --response_length")
    trainable = nn.ModuleDict({"policy": policy} | ({"critic": critic} if critic is not None else {}))
    for m in list(trainable.values()) + ([] if cfg.lora_rank else [ref]) + rm_members:  # a BaseModel shares the policy's shards
        shard_model(m, d, cfg.bf16)
    optimizer = make_optimizer(policy, critic, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    if cfg.offload_frozen:
        for m in [ref] + rm_members:
            m.to("cpu")

    try:
        records, eval_records = data.split_heldout(
            lambda source, split, n: data.load_records(source, "prompt", split, max_records=n, seed=cfg.seed),
            cfg.dataset, cfg.eval_dataset, 0, cfg.eval_prompts, "ppo", f"{cfg.run_dir}/prompts.json" if d.is_main else None)
        # Reward functions see the records as loaded (prompt before the chat template, every other field).
        fn_records, fn_eval_records = records, eval_records
        records, eval_records = (data.apply_chat_template(r, tok, cfg.chat_template) for r in (records, eval_records))
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

    update, state, metrics_log = start_or_resume(cfg.run_dir, cfg.resume, dict(trainable.items()),
                                                 {"ppo": (trainable, optimizer)}, cfg.num_updates, d, "ppo", config=cfg)
    kl_ctl = AdaptiveKLController(state.get("kl_coef", cfg.kl_coef), cfg.target_kl, cfg.kl_horizon)
    start_update, bad_streak = update, 0
    first_length, last_kl, warned = 0.0, None, set()  # for degeneration_warnings
    bar = progress_bar(cfg.num_updates, update, "ppo", d)
    evaluate_now = lambda update: eval_metrics(policy, ref, reward_model, tok, eval_prompts, cfg, d, update,  # noqa: E731
                                               reward_fns, fn_eval_records)
    if update == 0 and cfg.eval_at_start:
        metrics_log.log(0, evaluate_now(0))

    while update < cfg.num_updates:
        t_start = time.time()
        epoch, index = divmod(update, updates_per_epoch)
        batch_idx = batch_at(list(range(len(prompt_ids))), local_prompts, cfg.seed, epoch, index, d.rank, d.world_size)
        query, query_mask = data.pad_left([prompt_ids[i] for i in batch_idx], tok.eos_id)
        # Groups: each prompt repeated samples_per_prompt times in consecutive rows.
        query, query_mask = query.repeat_interleave(cfg.samples_per_prompt, 0), query_mask.repeat_interleave(cfg.samples_per_prompt, 0)
        query, query_mask = query.to(d.device), query_mask.to(d.device)

        # 1. Rollout. Seeded by (seed, update, rank): a resumed run samples the same responses.
        query_response, sample_logp = rollout(policy, query, query_mask, update, tok, cfg, d)
        t_rollout = time.time()

        # 2-4. Score, KL and rewards, advantages.
        logged = {}  # what reward functions send through TRL's log_metric: averaged into this update's metrics
        fn_extra = trl_extra(update, cfg, log_metric=lambda name, value: logged.setdefault(name, []).append(float(value)))
        exp = make_experience(policy, critic, ref, reward_model, query_response, query_mask, sample_logp,
                              kl_ctl.value, tok, cfg, d, check_logprobs=checks_logprobs(update, cfg), reward_fns=reward_fns,
                              fn_rows=[fn_records[i] for i in batch_idx for _ in range(cfg.samples_per_prompt)],
                              fn_extra=fn_extra, where=f"update {update + 1}, rank {d.rank}, ")
        t_score = time.time()

        # 5. PPO update: epochs x minibatches x micro-batches (gradient accumulation).
        stats = ppo_update(policy, critic, trainable, optimizer, base_lrs, exp, update, cfg.num_updates, cfg, d,
                           ptx_batch=(lambda n, key: ptx_batch(policy, ptx_pairs, n, key, tok, cfg, d)) if ptx_pairs else None)
        t_update = time.time()

        # 6. Log (TRL's metric names, so runs overlay), adapt beta, evaluate, checkpoint.
        with torch.no_grad():
            logp, ref_logp, action_mask, scores = exp["logp"], exp["ref_logp"], exp["action_mask"], exp["scores"]
            seq_kl = sequence_kl(logp, ref_logp, action_mask)  # logged KL is always k1, summed (TRL)
            mean_kl = all_reduce_mean(seq_kl.mean(), d) if not exp["ref_skipped"] else torch.tensor(float("nan"))
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
                "val/tis_weight_mean": all_reduce_mean(masked_mean(exp["tis_weight"], action_mask), d),
                "beta": kl_ctl.value, "lr": optimizer.param_groups[0]["lr"],
                "episode": (update + 1) * cfg.rollout_batch_size * cfg.samples_per_prompt,
                "time/rollout": t_rollout - t_start, "time/score": t_score - t_rollout, "time/update": t_update - t_score,
                "time/tokens_per_s": float(action_mask.sum()) * d.world_size / (t_update - t_start),
                "val/nonfinite_scores": all_reduce_sum(exp["nonfinite_scores"].float(), d),
                "policy/skipped_steps": stats["skipped_steps"],
            }
            if exp["rewards_per_func"] is not None:  # TRL's per-function names; log_metric's as means over ranks
                row.update(reward_function_metrics(exp["rewards_per_func"], exp["reward_names"], d))
                row.update({name: all_reduce_mean(torch.tensor(sum(v) / len(v), device=d.device), d)
                            for name, v in sorted(logged.items())})
            if exp["recomputed_logp"] is not None:  # on the updates that ran the recompute (logprob_check_every)
                row["val/logprob_recompute_maxdiff"] = ((exp["recomputed_logp"] - logp) * action_mask).abs().max()
                row["val/mismatch_kl"] = all_reduce_mean(exp["mismatch_kl"], d)  # verl rollout_corr/k3_kl
        length, kl = float(row["val/response_length"]), float(row["objective/kl"])
        first_length = first_length or length
        for warning in degeneration_warnings(length, first_length, kl, last_kl) if d.is_main else []:
            if warning.split(" ")[0] not in warned:  # once per kind, not every update
                warned.add(warning.split(" ")[0])
                print(f"ppo: warning at update {update + 1}: {warning}", flush=True)
        last_kl = kl
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
            metrics_log.log(update, evaluate_now(update))
        stopping = cfg.stop_after and update - start_update >= cfg.stop_after
        preempt = preempted(preemption, d) and update < cfg.num_updates  # under torchrun, a MAX all_reduce: all ranks stop together
        if update % cfg.save_every == 0 or update == cfg.num_updates or stopping or preempt:
            save_checkpoint(cfg.run_dir, update, dict(trainable.items()), {"ppo": (trainable, optimizer)},
                            {"kl_coef": kl_ctl.value}, cfg, d, keep=cfg.keep_last, final=update == cfg.num_updates)
        if preempt:
            exit_preempted(cfg.run_dir, update, d, "ppo")
        if stopping:
            break
    bar.close()
    if d.is_main and update == cfg.num_updates:
        print(f"ppo: done; policy in {cfg.run_dir}/final/policy")
    shutdown_distributed()


@torch.no_grad()
def eval_metrics(policy, ref, reward_model, tok, prompts, cfg: Config, d: Dist, update: int, reward_fns=None,
                 fn_records=None) -> dict:
    """Held-out prompts: learned reward, KL to the reference (sequence-summed k1), length, EOS rate, and
    on the default task the gold reward, so reward hacking shows as it happens (learned up, gold down)."""
    samples = sample_responses(policy, tok, prompts, d, cfg.response_length, cfg.temperature, seed=cfg.seed + 1,
                               max_prompt_tokens=cfg.max_prompt_tokens, bf16=cfg.bf16)
    # The held-out learned reward is the combined score PPO optimizes (ensemble_reward); each member visits the
    # device in turn with offload_frozen.
    with offloaded(ref, cfg, d):
        learned, kls = score_samples(samples, policy, ref, reward_model, tok, cfg.temperature, d, bf16=cfg.bf16,
                                     reduce=lambda s: ensemble_reward(s, cfg.reward_ensemble, cfg.uwo_lambda),
                                     visit=lambda m: offloaded(m, cfg, d))
    fn_metrics, greedy, greedy_scores = {}, None, None
    extra = trl_extra(update, cfg)  # held-out: log_metric is not logged
    if reward_fns:  # the score PPO optimizes, and each function's mean (every rank scores every held-out sample)
        per_func, names, combined = function_rewards(
            reward_fns, torch.tensor(learned) if learned else None, cfg.reward_model_weight, fn_records,
            [s["response"] for s in samples], [s["response_ids"] for s in samples], where="held-out ", extra=extra)
        learned = combined.tolist()
        fn_metrics = reward_function_metrics(per_func, names, Dist(), prefix="eval/")  # already whole on every rank
        if cfg.eval_greedy:
            greedy = sample_responses(policy, tok, prompts, d, cfg.response_length, 0.0, seed=cfg.seed + 1,
                                      max_prompt_tokens=cfg.max_prompt_tokens, bf16=cfg.bf16)
            rm_stub = torch.zeros(len(greedy)) if reward_model is not None else None  # only functions, greedily
            per_func, names, greedy_scores = function_rewards(
                reward_fns, rm_stub, 0.0, fn_records, [s["response"] for s in greedy], [s["response_ids"] for s in greedy],
                extra, "held-out greedy ")
            fn_metrics.update({k: v for k, v in reward_function_metrics(per_func, names, Dist(), "eval/greedy/").items()
                               if f"/{RM_NAME}/" not in k})
    out = {"eval/learned_reward": sum(learned) / len(learned), "eval/kl": sum(kls) / len(kls), **fn_metrics,
           **sample_metrics(samples, graded=cfg.dataset == "default")}
    # The first held-out prompts, the same at every evaluation, so a report can set "before" beside "after".
    out["eval/samples"] = [{"prompt": s["prompt_shown"], "response": s["response"], "ended": s["ended"], "score": learned[i]}
                           | ({"greedy": greedy[i]["response"], "greedy_ended": greedy[i]["ended"],
                               "greedy_score": float(greedy_scores[i])} if greedy else {})
                           for i, s in enumerate(samples[:cfg.num_samples_shown])]
    if d.is_main:
        show_samples(samples, cfg.num_samples_shown, f"update {update}", cfg.dataset == "default", learned)
    return out


if __name__ == "__main__":
    run_main(main)
