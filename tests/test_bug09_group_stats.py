"""Bug class 9 (issue #16): numerics of the group statistics.

Sources: NeMo-RL PR #4161 (a float32 std residue of ~1e-4 in a group that should have had zero spread turned
advantages into thousands), TRL PR #5773/#5775 (nanstd NaN with one valid reward poisoned the batch), UniRL
PR #335 (sample vs population std). Here:
- a group whose rewards are all equal gets advantage exactly 0 under every estimator and std scaling, with no
  NaN or inf, for non-dyadic rewards (0.35 x 8 sums with rounding, so the float mean is not 0.35);
- a 7-vs-1 split stays bounded, at the hand-worked values: with the Bessel std (TRL, verl and OpenRLHF all use
  it for groups) the z-scores of a 7-vs-1 split are -(n-1)/sqrt(n) = -2.4749 for the odd one and 1/sqrt(n) =
  0.35355 for the others whatever the two reward values, so |A| <= 2.475 for n = 8.
"""

import math

import numpy as np
import pytest
import torch

import ppo

N_GEN = 8


@pytest.mark.parametrize("value", [0.35, 0.1, 1 / 3, 0.7, -2.3])
def test_identical_rewards_give_exactly_zero(value):
    r = torch.cat([torch.full((N_GEN,), value), torch.linspace(-1, 1, N_GEN)])  # an identical group, then a spread one
    if value == 0.35:  # the case that matters: the float32 mean of eight 0.35s is not 0.35
        assert (r[:N_GEN] - r[:N_GEN].mean()).abs().max() > 0
    for scaling in ("group", "batch", "none"):
        for eps in (1e-6, 1e-4, 0.0):
            adv = ppo.grpo_advantages(r, N_GEN, scaling, eps)
            assert torch.isfinite(adv).all(), (scaling, eps)
            assert torch.equal(adv[:N_GEN], torch.zeros(N_GEN)), (scaling, eps, adv[:N_GEN])
            assert adv[N_GEN:].abs().max() > 0.1  # the spread group still learns
    assert torch.equal(ppo.rloo_advantages(r, N_GEN)[:N_GEN], torch.zeros(N_GEN))
    assert torch.equal(ppo.reinforce_pp_baseline(r, N_GEN)[:N_GEN], torch.zeros(N_GEN))


def test_verl_leaves_a_residue_on_identical_rewards():
    """What the guard removes: verl 0.9.1 divides the float32 residue of the mean by std + 1e-6 (std itself ~3e-8)."""
    import verl.trainer.ppo.core_algos as core_algos
    r = torch.full((N_GEN,), 0.35)
    token_rewards = torch.zeros(N_GEN, 3)
    token_rewards[:, -1] = r
    theirs, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, torch.ones(N_GEN, 3), np.zeros(N_GEN))
    assert theirs.abs().max() > 1e-2  # 0.029: not 0
    assert torch.equal(ppo.grpo_advantages(r, N_GEN, "group", 1e-6), torch.zeros(N_GEN))


@pytest.mark.parametrize("odd", [0.0, 1.0, 0.3500001])
def test_seven_vs_one_split_is_bounded(odd):
    r = torch.tensor([0.35] * 7 + [odd])
    adv = ppo.grpo_advantages(r, N_GEN, "group", 1e-6)
    assert torch.isfinite(adv).all()
    bound = (N_GEN - 1) / math.sqrt(N_GEN)
    assert adv.abs().max() <= bound + 1e-4
    sign = 1 if odd > 0.35 else -1
    if abs(odd - 0.35) > 1e-3:  # a real split: the hand-worked z-scores
        torch.testing.assert_close(adv, sign * torch.tensor([-1 / math.sqrt(N_GEN)] * 7 + [bound]), rtol=1e-4, atol=1e-5)
    # RLOO: the odd one minus the mean of seven 0.35s, the others 0.35 minus (6 x 0.35 + odd) / 7.
    expected = torch.tensor([(0.35 - odd) / 7] * 7 + [odd - 0.35])
    torch.testing.assert_close(ppo.rloo_advantages(r, N_GEN), expected, atol=1e-6, rtol=0)


def test_tiny_split_is_not_blown_up_beyond_the_z_bound():
    # 7 x 0.35 and one reward 1e-7 away (a float32 near-tie, NeMo-RL #4161's situation): the std is ~4e-8, so
    # eps = 1e-6 dominates and keeps |A| small; no 1e3-1e4 advantages.
    r = torch.tensor([0.35] * 7 + [0.35 + 1e-7])
    adv = ppo.grpo_advantages(r, N_GEN, "group", 1e-6)
    assert torch.isfinite(adv).all() and adv.abs().max() < 1.0, adv


def test_unscored_response_is_left_out_of_its_group():
    """A response with a non-finite score (make_experience masks it) must not pull its siblings' baseline: their
    advantages equal those of the group without it (TRL's unscorable completions); it gets 0, and a group left
    with one scored response gets 0, not NaN (TRL PR #5773)."""
    r = torch.tensor([1.0, 0.0, 2.0, 4.0, 0.5, 0.0, 0.0, 0.0])  # row 1's 0 stands for a NaN score; group 1: one valid
    valid = torch.tensor([True, False, True, True, True, False, False, False])
    kept = torch.tensor([1.0, 2.0, 4.0])
    for scaling in ("group", "none"):
        adv = ppo.grpo_advantages(r, 4, scaling, 1e-6, valid=valid)
        torch.testing.assert_close(adv[[0, 2, 3]], ppo.grpo_advantages(kept, 3, scaling, 1e-6))
        assert adv[1] == 0 and torch.equal(adv[4:], torch.zeros(4))
    adv = ppo.rloo_advantages(r, 4, valid=valid)
    torch.testing.assert_close(adv[[0, 2, 3]], ppo.rloo_advantages(kept, 3))  # mean of the other 2 valid ones
    assert adv[1] == 0 and torch.equal(adv[4:], torch.zeros(4))
    assert torch.isfinite(ppo.grpo_advantages(r, 4, "batch", 1e-6, valid=valid)).all()
