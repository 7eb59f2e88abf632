"""Parity with verl 0.9.1's own functions (`verl/trainer/ppo/core_algos.py`), run here on the same random tensors.

verl imports on a CPU machine when installed with `pip install --no-deps verl==0.9.1` plus ray, tensordict,
omegaconf, codetiming and pylatexenc (.ci/run). Compared: the group advantage estimators (GRPO with and without
the std, RLOO, REINFORCE++ and its baseline variant), `agg_loss` for every mode (locally and with the
global-batch normalizers verl passes under data parallelism), `compute_policy_loss` (vanilla with dual clip and
clip-higher), GSPO, and `kl_penalty` for every estimator. verl's GAE and value loss against today's PPO
conventions are in tests/test_parity_verl.py.
"""

import numpy as np
import pytest
import torch

import ppo

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl==0.9.1 (.ci/run) is needed for parity")

TOL = dict(atol=1e-6, rtol=1e-5)
B, N, G = 12, 7, 4  # 3 groups of 4 responses, 7 response tokens


def random_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 7, 2, 4, 7, 5, 3, 6])
    mask = torch.arange(N)[None, :] < lengths[:, None]
    scores = torch.randn(B, generator=g)
    eos = lengths - 1
    token_rewards = torch.zeros(B, N)
    token_rewards[torch.arange(B), eos] = scores  # verl's naive reward manager: the score on the last valid token
    return g, mask, scores, token_rewards


def index():
    return np.repeat(np.arange(B // G), G)  # verl groups by a uid per prompt


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_advantage(norm_by_std):
    _, mask, scores, token_rewards = random_batch()
    theirs, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask.float(), index(), epsilon=1e-6,
                                                          norm_adv_by_std_in_grpo=norm_by_std)
    ours = ppo.grpo_advantages(scores, G, "group" if norm_by_std else "none", eps=1e-6)[:, None] * mask
    torch.testing.assert_close(ours, theirs, **TOL)


def test_rloo_advantage():
    _, mask, scores, token_rewards = random_batch(1)
    theirs, _ = core_algos.compute_rloo_outcome_advantage(token_rewards, mask.float(), index())
    torch.testing.assert_close(ppo.rloo_advantages(scores, G)[:, None] * mask, theirs, **TOL)


def test_reinforce_plus_plus_advantage():
    from verl.trainer.config import AlgoConfig
    g, mask, scores, token_rewards = random_batch(2)
    kl = 0.1 * torch.randn(B, N, generator=g) * mask
    rewards = token_rewards - 0.05 * kl  # a per-token KL reward, so gamma and the masking matter
    for gamma in (1.0, 0.9):
        theirs, _ = core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask.float(),
                                                                             config=AlgoConfig(gamma=gamma))
        ours = ppo.reinforce_pp_returns(rewards, mask, gamma)
        ours = ppo.whiten_advantages(ours, mask, "rollout", unbiased=True, d=ppo.Dist())  # verl's masked_whiten
        torch.testing.assert_close(ours, theirs, **TOL)


def test_reinforce_plus_plus_baseline_advantage():
    # verl subtracts the group mean of the summed token rewards and broadcasts; ours subtracts it from the score,
    # then forms returns. With the KL out of the reward (verl's default) the two agree.
    from verl.trainer.config import AlgoConfig
    _, mask, scores, token_rewards = random_batch(3)
    theirs, _ = core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage(
        token_rewards, mask.float(), index(), config=AlgoConfig())
    eos = mask.sum(1) - 1
    rewards, _ = ppo.compute_rewards(torch.zeros(B, N), ppo.reinforce_pp_baseline(scores, G), eos, 0.0)
    ours = ppo.reinforce_pp_returns(rewards, mask, 1.0)
    ours = ppo.whiten_advantages(ours, mask, "rollout", unbiased=True, d=ppo.Dist())
    torch.testing.assert_close(ours, theirs, **TOL)


VERL_MODES = {"global_token_mean": "token-mean", "seq_mean_token_mean": "seq-mean-token-mean",
              "seq_mean_token_sum": "seq-mean-token-sum", "seq_mean_token_sum_norm": "seq-mean-token-sum-norm"}


@pytest.mark.parametrize("mode", sorted(VERL_MODES))
def test_agg_loss_every_mode(mode):
    g, mask, _, _ = random_batch(4)
    mask[3] = False  # an empty response: verl leaves it out of the sequence count, as we do
    losses = torch.randn(B, N, generator=g)
    theirs = core_algos.agg_loss(losses, mask.float(), VERL_MODES[mode])
    torch.testing.assert_close(ppo.aggregate(losses, mask, mode), theirs, **TOL)
    # Data parallel: verl is given the global token / sequence counts and the dp size; a rank's micro-batch.
    rows = slice(0, 5)
    kwargs = dict(dp_size=2, batch_num_tokens=int(mask.sum()), global_batch_size=int(mask.any(1).sum()))
    theirs = core_algos.agg_loss(losses[rows], mask[rows].float(), VERL_MODES[mode], **kwargs)
    ours = ppo.aggregate(losses[rows], mask[rows], mode, batch_tokens=mask.sum().float(),
                         batch_seqs=mask.any(1).sum().float(), world_size=2)
    torch.testing.assert_close(ours, theirs, **TOL)
    # The constant of Dr. GRPO: verl's loss_scale_factor, ours the horizon (response_length).
    if mode == "seq_mean_token_sum_norm":
        theirs = core_algos.agg_loss(losses, mask.float(), VERL_MODES[mode], loss_scale_factor=32)
        torch.testing.assert_close(ppo.aggregate(losses, mask, mode, horizon=32), theirs, **TOL)


def test_token_mean_equals_verl_on_one_micro_batch():
    # Our per-micro-batch token_mean is verl's token-mean when the micro-batch is the whole batch.
    g, mask, _, _ = random_batch(5)
    losses = torch.randn(B, N, generator=g)
    torch.testing.assert_close(ppo.aggregate(losses, mask, "token_mean"),
                               core_algos.agg_loss(losses, mask.float(), "token-mean"), **TOL)


def logprob_batch(seed):
    g, mask, _, _ = random_batch(seed)
    old = -torch.rand(B, N, generator=g) * 3
    new = old + 0.3 * torch.randn(B, N, generator=g)  # ratios from ~0.4 to ~2.5: every clip branch is hit
    adv = torch.randn(B, N, generator=g)
    return mask, old, new, adv


@pytest.mark.parametrize("clip_high", [0.2, 0.28])
@pytest.mark.parametrize("agg", ["global_token_mean", "seq_mean_token_mean"])
def test_policy_loss_dual_clip_and_clip_higher(clip_high, agg):
    mask, old, new, adv = logprob_batch(6)
    loss_v, clipfrac_v, _, _ = core_algos.compute_policy_loss(old, new, adv, mask.float(), cliprange=0.2,
                                                             cliprange_low=0.2, cliprange_high=clip_high,
                                                             clip_ratio_c=3.0, loss_agg_mode=VERL_MODES[agg])
    new_ = new.clone().requires_grad_(True)
    loss, stats = ppo.policy_loss(new_, old, adv, mask, cliprange=0.2, dual_clip=3.0, aggregation=agg,
                                  clip_high=clip_high)
    torch.testing.assert_close(loss, loss_v, **TOL)
    torch.testing.assert_close(stats["clipfrac"], clipfrac_v, **TOL)
    # And the gradient with respect to the log-probs.
    new_v = new.clone().requires_grad_(True)
    core_algos.compute_policy_loss(old, new_v, adv, mask.float(), cliprange=0.2, cliprange_low=0.2,
                                   cliprange_high=clip_high, clip_ratio_c=3.0, loss_agg_mode=VERL_MODES[agg])[0].backward()
    loss.backward()
    torch.testing.assert_close(new_.grad, new_v.grad, **TOL)


def test_gspo_sequence_ratio():
    # verl's GSPO builds a token-level ratio whose value is the sequence ratio; with seq-mean-token-mean (verl's
    # recommended aggregation, and the only one TRL recommends for "sequence") value and gradient equal ours.
    from verl.workers.config import ActorConfig
    mask, old, new, _ = logprob_batch(7)
    seq_adv = torch.randn(B, generator=torch.Generator().manual_seed(8))[:, None] * mask
    cfg = ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                      ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False, rollout_n=G)
    new_v = new.clone().requires_grad_(True)
    loss_v, _ = core_algos.compute_policy_loss_gspo(old, new_v, seq_adv, mask.float(), "seq-mean-token-mean", cfg)
    new_ = new.clone().requires_grad_(True)
    loss, _ = ppo.policy_loss(new_, old, seq_adv, mask, cliprange=0.2, aggregation="seq_mean_token_mean",
                              clip_high=0.28, importance_sampling_level="sequence")
    torch.testing.assert_close(loss, loss_v, **TOL)
    loss.backward()
    loss_v.backward()
    torch.testing.assert_close(new_.grad, new_v.grad, **TOL)


@pytest.mark.parametrize("ours,theirs", [("k1", "kl"), ("k1", "k1"), ("k2", "mse"), ("k2", "k2"), ("k3", "low_var_kl"),
                                          ("k3", "k3")])
def test_kl_penalty_every_estimator(ours, theirs):
    g = torch.Generator().manual_seed(9)
    logp = -torch.rand(B, N, generator=g) * 4
    ref = logp + torch.randn(B, N, generator=g)
    clamp = 10.0 if ours == "k3" else 0.0  # verl clamps k3 to +-10 (and its log-ratio to +-20)
    torch.testing.assert_close(ppo.kl_penalty(logp, ref, ours, clamp), core_algos.kl_penalty(logp, ref, theirs), **TOL)
    # Gradients too (no "+" suffix: verl differentiates the estimator itself, as we do without kl_is_weight).
    a, b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    ppo.kl_penalty(a, ref, ours, clamp).sum().backward()
    core_algos.kl_penalty(b, ref, theirs).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)
