"""Parity with OpenRLHF 0.11.2's advantage code, run from its own file
(openrlhf/trainer/ppo_utils/experience_maker.py, loaded by path: see framework_code.py).

- `get_advantages_and_returns` (L343-387): GAE over the action mask;
- `compute_advantages_and_returns` (L238-341), the whole step after the forward passes: reward clip,
  `compute_reward` (models/utils.py L131-159: -beta * KL per token, score on the last action token),
  GAE, then normalization over ALL experiences of the rollout (population variance). Ours is
  `--preset=openrlhf`: reward_clip 10, score_position eos, gamma 1, lambda 1, advantage_whitening global,
  unbiased_variance False. OpenRLHF's losses are run in test_parity_trl.py.
"""

import types

import pytest
import torch

import ppo
from framework_code import load_openrlhf_experience_maker
from runtime import Dist

OPENRLHF = ppo.PRESETS["openrlhf"]


@pytest.fixture(scope="module")
def openrlhf():
    return load_openrlhf_experience_maker()


def _batch(seed=0, B=5, N=8):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([N, 1, 3, 6, 4])[:B]
    mask = torch.arange(N)[None, :] < lengths[:, None]
    noise = lambda: 40.0 + torch.randn(B, N, generator=g)  # noqa: E731  (garbage in padded slots)
    return dict(mask=mask,
                values=torch.where(mask, torch.randn(B, N, generator=g), noise()),
                logp=torch.where(mask, -torch.rand(B, N, generator=g) * 3, noise()),
                ref=torch.where(mask, -torch.rand(B, N, generator=g) * 3, noise()),
                scores=torch.randn(B, generator=g) * 8)  # some beyond the +-10 clip


@pytest.mark.parametrize("gamma,lam", [(OPENRLHF["gamma"], OPENRLHF["lam"]), (0.99, 0.95)])
def test_gae_matches_openrlhf(openrlhf, gamma, lam):
    b = _batch()
    rewards = torch.where(b["mask"], torch.randn(b["mask"].shape), 30.0)
    theirs_adv, theirs_ret = openrlhf.maker.RemoteExperienceMaker.get_advantages_and_returns(
        None, b["values"], rewards, b["mask"].float(), gamma, lam)
    adv, ret = ppo.compute_gae(rewards, b["values"], b["mask"], gamma, lam)
    assert torch.allclose(adv * b["mask"], theirs_adv * b["mask"], atol=1e-6, rtol=0)
    assert torch.allclose(ret * b["mask"], theirs_ret * b["mask"], atol=1e-6, rtol=0)


def _their_pipeline(openrlhf, parts, kl_coef):
    """OpenRLHF's compute_advantages_and_returns on a list of experiences (one per micro-batch), with a
    stand-in `self` carrying just the attributes that method reads."""
    Maker = openrlhf.maker.RemoteExperienceMaker
    args = types.SimpleNamespace(
        reward=types.SimpleNamespace(clip_range=(-OPENRLHF["reward_clip"], OPENRLHF["reward_clip"])),
        rollout=types.SimpleNamespace(n_samples_per_prompt=1),
        algo=types.SimpleNamespace(advantage=types.SimpleNamespace(
            estimator="gae", gamma=OPENRLHF["gamma"], lambd=OPENRLHF["lam"], no_std_norm=False)))
    me = types.SimpleNamespace(strategy=types.SimpleNamespace(args=args), advantage_estimator="gae",
                               kl_ctl=types.SimpleNamespace(value=kl_coef))
    me.get_advantages_and_returns = lambda *a: Maker.get_advantages_and_returns(me, *a)
    experiences, start = [], 0
    for p in parts:
        n = p["mask"].size(0)
        experiences.append(types.SimpleNamespace(
            rewards=p["scores"].clone(), index=list(range(start, start + n)), action_mask=p["mask"].float(),
            values=p["values"], info={},
            kl=openrlhf.utils.compute_approx_kl(p["logp"], p["ref"], kl_estimator=OPENRLHF["kl_estimator"])))
        start += n
    Maker.compute_advantages_and_returns(me, experiences)
    return torch.cat([e.advantages for e in experiences]), torch.cat([e.returns for e in experiences])


def test_rewards_advantages_returns_match_openrlhf(openrlhf):
    """Two micro-batches: OpenRLHF normalizes advantages over both, as `advantage_whitening=global` does."""
    parts = [_batch(1), _batch(2, B=3)]
    kl_coef = 0.05  # the preset's 0.01 would make the KL term too small to notice
    theirs_adv, theirs_ret = _their_pipeline(openrlhf, parts, kl_coef)

    b = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    mask, N = b["mask"], b["mask"].size(1)
    kl = ppo.kl_penalty(b["logp"] * mask, b["ref"] * mask, OPENRLHF["kl_estimator"], OPENRLHF["kl_clamp"]) * mask
    scores = b["scores"].clamp(-OPENRLHF["reward_clip"], OPENRLHF["reward_clip"])
    score_idx = ppo.score_indices(mask.sum(1) - 1, N, OPENRLHF["score_position"])
    rewards, _ = ppo.compute_rewards(kl, scores, score_idx, kl_coef)
    adv, ret = ppo.compute_gae(rewards, b["values"], mask, OPENRLHF["gamma"], OPENRLHF["lam"])
    adv = ppo.whiten_advantages(adv, mask, OPENRLHF["advantage_whitening"], OPENRLHF["unbiased_variance"], Dist())
    assert (b["scores"].abs() > OPENRLHF["reward_clip"]).any()  # the clip is exercised
    assert torch.allclose(ret * mask, theirs_ret * mask, atol=1e-5, rtol=0), ((ret - theirs_ret) * mask).abs().max()
    assert torch.allclose(adv, theirs_adv * mask, atol=1e-5, rtol=0), ((adv - theirs_adv) * mask).abs().max()


def test_tis_matches_openrlhf_policy_loss(openrlhf):
    """OpenRLHF's token-level IS correction in clip mode (models/loss.py `PolicyLoss`, is_correction_mode="clip":
    loss x clamp(exp(old - rollout), low, high)) with low 0 is our TIS (`truncated_is_weight`, cap = high)."""
    g = torch.Generator().manual_seed(4)
    B, N, cap = 4, 7, 2.0
    mask = torch.rand(B, N, generator=g) > 0.2
    new, old = -torch.rand(B, N, generator=g) * 2, -torch.rand(B, N, generator=g) * 2
    rollout = old + 0.8 * torch.randn(B, N, generator=g)  # the sampler's log-probs, some far off
    adv = torch.randn(B, N, generator=g)
    theirs = openrlhf.loss.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2, is_correction_level="token",
                                      is_correction_mode="clip", is_correction_threshold=(0.0, cap))
    their_loss = theirs(new, old, adv, mask.float(), rollout_log_probs=rollout)[0]
    w = ppo.truncated_is_weight(old, rollout, cap)
    assert (w == cap).any() and (w < 1).any()
    ours, _ = ppo.policy_loss(new, old, adv * w, mask, 0.2)
    assert torch.allclose(ours, their_loss, atol=1e-6, rtol=0), (ours, their_loss)


@pytest.mark.parametrize("ipo", [False, True])
def test_dpo_and_ipo_losses_match_openrlhf(openrlhf, ipo):
    """OpenRLHF's DPOLoss on summed log-probs equals ours with the default --ipo_average=False."""
    import dpo
    g = torch.Generator().manual_seed(5)
    logps = [-torch.rand(6, generator=g) * 20 for _ in range(4)]
    theirs = openrlhf.loss.DPOLoss(beta=0.1, label_smoothing=0.0, ipo=ipo)(*logps)[0]
    ours = dpo.dpo_loss(*logps, beta=0.1, loss_type="ipo" if ipo else "sigmoid")[0].mean()
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-6), (ours, theirs)


def test_pairwise_rm_loss_matches_openrlhf(openrlhf):
    import reward_model
    g = torch.Generator().manual_seed(6)
    chosen, rejected = torch.randn(8, generator=g), torch.randn(8, generator=g)
    theirs = openrlhf.loss.PairWiseLoss()(chosen, rejected)
    assert torch.allclose(reward_model.bradley_terry_loss(chosen, rejected), theirs, atol=1e-6)
