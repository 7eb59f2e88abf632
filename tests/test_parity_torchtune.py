"""Parity with torchtune 0.6.1's PPO functions, run from torchtune itself (torchtune/rlhf/rewards.py,
torchtune/rlhf/loss/ppo.py), fed as its recipe feeds them (recipes/ppo_full_finetune_single_device.py
L835-876: log-probs set to 1.0 after the stop token, values zeroed past the score slot, the score on
`value_seq_idxs`, one slot after EOS).

Ours is `--preset=torchtune`: score_position after_eos, k1 in the reward, gamma 1, lambda 0.95,
advantage_whitening mean_preserving (torchtune's `whiten` re-adds the mean, shift_mean=True there),
Bessel-corrected variance, policy and value clip 0.2, vf_coef 0.1.
"""

import pytest
import torch

import ppo
from framework_code import load_torchtune
from runtime import Dist

TT = ppo.PRESETS["torchtune"]


@pytest.fixture(scope="module")
def torchtune():
    return load_torchtune()


def _rollout(seed=0, B=5, N=8, eos_at=(2, 5, 7, 0, 6)):
    """eos_at[i]: index of row i's stop token; N - 1 with no stop token means truncated (row 2)."""
    g = torch.Generator().manual_seed(seed)
    eos = torch.tensor(eos_at[:B])
    positions = torch.arange(N)[None, :]
    padding = positions > eos[:, None]  # torchtune's response_padding_masks: True after the stop token
    return dict(padding=padding, eos=eos, N=N,
                logp=-torch.rand(B, N, generator=g) * 3, ref=-torch.rand(B, N, generator=g) * 3,
                values=torch.randn(B, N, generator=g), scores=torch.randn(B, generator=g),
                new_logp=-torch.rand(B, N, generator=g) * 3, new_values=torch.randn(B, N, generator=g))


def _value_seq_idxs(seq_lens, N):
    """recipes/ppo_full_finetune_single_device.py L856-860, verbatim in effect."""
    return torch.where((seq_lens > 0) & (seq_lens < N - 1), seq_lens + 1, seq_lens)


def _theirs(torchtune, r, kl_coef):
    rlhf, N = torchtune.rlhf, r["N"]
    logp, ref = r["logp"].masked_fill(r["padding"], 1.0), r["ref"].masked_fill(r["padding"], 1.0)
    idx = _value_seq_idxs(r["eos"], N)
    value_padding = r["padding"].clone().scatter_(1, idx[:, None], False)
    values = r["values"].masked_fill(value_padding, 0.0)
    rewards, _, _ = rlhf.get_rewards_ppo(r["scores"], logp, ref, kl_coef, idx)
    adv, ret = rlhf.estimate_advantages(values, rewards, TT["gamma"], TT["lam"], masks=~r["padding"])
    return dict(rewards=rewards, adv=adv, ret=ret, values=values, value_mask=~value_padding)


def _ours(r, kl_coef):
    N = r["N"]
    action_mask = ~r["padding"]
    score_idx = ppo.score_indices(r["eos"], N, TT["score_position"])
    value_mask = torch.arange(N)[None, :] <= score_idx[:, None]
    kl = ppo.kl_penalty(r["logp"] * action_mask, r["ref"] * action_mask, TT["kl_estimator"], TT["kl_clamp"]) * action_mask
    rewards, _ = ppo.compute_rewards(kl, r["scores"], score_idx, kl_coef)
    values = r["values"] * value_mask
    adv, ret = ppo.compute_gae(rewards, values, value_mask, TT["gamma"], TT["lam"])
    adv = ppo.whiten_advantages(adv, action_mask, TT["advantage_whitening"], TT["unbiased_variance"], Dist())
    return dict(rewards=rewards, adv=adv, ret=ret, values=values, value_mask=value_mask)


def test_rewards_and_advantages_match_torchtune(torchtune):
    r = _rollout(eos_at=(2, 5, 7, 3, 6))
    kl_coef = 0.1
    theirs, ours = _theirs(torchtune, r, kl_coef), _ours(r, kl_coef)
    vm = ours["value_mask"]
    assert torch.equal(vm, theirs["value_mask"])
    assert torch.allclose(ours["rewards"], theirs["rewards"], atol=1e-6, rtol=0)
    assert torch.allclose(ours["ret"] * vm, theirs["ret"] * vm, atol=1e-6, rtol=0)
    assert torch.allclose(ours["adv"], theirs["adv"], atol=1e-5, rtol=0), (ours["adv"] - theirs["adv"]).abs().max()


def test_whitening_differs_from_zero_mean(torchtune):
    """The preset's mean_preserving is load-bearing: the usual zero-mean whitening does not match torchtune."""
    r = _rollout(eos_at=(2, 5, 7, 3, 6))
    theirs = _theirs(torchtune, r, 0.1)
    ours = _ours(r, 0.1)
    adv, _ = ppo.compute_gae(ours["rewards"], ours["values"], ours["value_mask"], TT["gamma"], TT["lam"])
    zero_mean = ppo.whiten_advantages(adv, ~r["padding"], "rollout", TT["unbiased_variance"], Dist())
    assert (zero_mean - theirs["adv"]).abs().max() > 1e-2


@pytest.mark.xfail(strict=True, reason="a response that is EOS alone: torchtune's recipe scores the EOS slot "
                   "itself (its `seq_lens > 0` guard, L856-860), ours the slot after it, as for every other row")
def test_eos_first_token_score_slot_matches_torchtune(torchtune):
    r = _rollout(eos_at=(2, 5, 7, 0, 6))
    assert torch.equal(_ours(r, 0.1)["value_mask"], _theirs(torchtune, r, 0.1)["value_mask"])


def test_ppo_loss_matches_torchtune(torchtune):
    r = _rollout(1, eos_at=(2, 5, 7, 3, 6))
    traj = _theirs(torchtune, r, 0.1)
    action_mask, value_mask = ~r["padding"], traj["value_mask"]
    old_logp = r["logp"].masked_fill(r["padding"], 1.0)
    new_logp = (r["new_logp"].masked_fill(r["padding"], 1.0) + 0.3 * torch.randn(r["padding"].shape)).requires_grad_()
    new_values = r["new_values"].masked_fill(~value_mask, 0.0)
    loss_fn = torchtune.PPOLoss(epsilon=TT["cliprange"], value_clip_range=TT["cliprange_value"], value_coeff=TT["vf_coef"])
    loss, pg, vf, _, clipfrac = loss_fn(old_logp, new_logp, traj["adv"], traj["values"], new_values, traj["ret"],
                                        padding_masks=action_mask, value_padding_masks=value_mask)
    ours_new = new_logp.detach().clone().requires_grad_()
    our_pg, stats = ppo.policy_loss(ours_new, old_logp, traj["adv"], action_mask, TT["cliprange"], TT["dual_clip"])
    our_vf, _ = ppo.value_loss(new_values, traj["values"], traj["ret"], value_mask, TT["cliprange_value"])
    our_loss = our_pg + TT["vf_coef"] * our_vf
    assert torch.allclose(our_pg, pg, atol=1e-6, rtol=0), (our_pg, pg)
    assert torch.allclose(our_vf, vf, atol=1e-6, rtol=0), (our_vf, vf)
    assert torch.allclose(our_loss, loss, atol=1e-6, rtol=0)
    assert abs(float(stats["clipfrac"]) - float(clipfrac)) < 1e-6 and 0 < float(clipfrac) < 1
    loss.backward(), our_loss.backward()
    assert torch.allclose(ours_new.grad, new_logp.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_loss_matches_torchtune(torchtune, label_smoothing):
    """torchtune/rlhf/loss/dpo.py `DPOLoss` (sigmoid, conservative with label_smoothing): losses and rewards."""
    import dpo
    from torchtune.rlhf.loss import DPOLoss
    g = torch.Generator().manual_seed(7)
    logps = [-torch.rand(6, generator=g) * 20 for _ in range(4)]
    theirs = DPOLoss(beta=0.1, label_smoothing=label_smoothing)(*logps)
    ours = dpo.dpo_loss(*logps, beta=0.1, label_smoothing=label_smoothing)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
