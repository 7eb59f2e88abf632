"""ppo.py's pure math, against hand-worked numbers, brute force and TRL's own functions.

Expected values are worked out in the comments (as torchtune's PPO loss tests do), so a wrong sign, a
swapped clip branch or a mask that leaks fails here rather than as a slowly drifting learning curve.
TRL references are trl 1.12.0, `trl/experimental/ppo/ppo_trainer.py` (REFERENCES.md section 2.4).
"""

import copy
import math
import os

import pytest
import torch

from model import GPT, config_for, token_logprobs
import ppo  # noqa: E402
from ppo import (AdaptiveKLController, aggregate, apply_missing_eos_penalty, compute_gae, compute_rewards,
                 entropy_from_logits, first_true_indices, kl_penalty, masked_mean, masked_var, masked_whiten,
                 policy_loss, response_logprobs, response_masks, score_indices, value_loss, whiten_advantages)
from runtime import Dist


def t(*rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def right_padded_mask(lengths, n):
    """(B, n) bool mask with the first lengths[b] positions of row b valid."""
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


@pytest.fixture(scope="module")
def trl():
    """TRL's PPO helpers (importing trl takes ~8 s, so once per module)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl", reason="trl (requirements-dev.txt) is needed for parity with TRL")
    ppo_trainer = pytest.importorskip("trl.experimental.ppo.ppo_trainer", reason="trl.experimental.ppo missing")
    utils = pytest.importorskip("trl.experimental.utils", reason="trl.experimental.utils missing")

    class TRL:
        masked_mean = staticmethod(ppo_trainer.masked_mean)
        masked_var = staticmethod(ppo_trainer.masked_var)
        masked_whiten = staticmethod(ppo_trainer.masked_whiten)
        truncate_response = staticmethod(ppo_trainer.truncate_response)
        first_true_indices = staticmethod(utils.first_true_indices)
    return TRL


# -----------------------------------------------------------------------------
# 1. KL estimators


def test_kl_penalty_hand_values():
    # logp = -1, ref = -2: log_ratio = logp - ref = 1.
    #   k1 = 1
    #   k3 = exp(ref - logp) - 1 - (ref - logp) = e^-1 - 1 + 1 = 0.36788
    # The other way round (logp = -2, ref = -1): log_ratio = -1.
    #   k1 = -1 (k1 can be negative per token)
    #   k3 = e^1 - 1 - 1 = 0.71828
    logp, ref = t(-1.0, -2.0), t(-2.0, -1.0)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t(1.0, -1.0))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), t(math.exp(-1), math.e - 2))


def test_kl_penalty_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 9, generator=g) * 5
    for estimator in ("k1", "k3"):
        kl = kl_penalty(logp, logp.clone(), estimator)
        assert torch.equal(kl, torch.zeros_like(kl)), estimator  # exactly: exp(0) - 1 + 0 == 0


def test_k3_nonnegative_and_below_k1_squared_growth():
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    k3 = kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 is not, on the same inputs


def test_kl_estimators_are_unbiased():
    """E_{x ~ pi}[k(x)] = KL(pi || ref) exactly, for k1 and k3 (Schulman 2020): sum over a small
    vocabulary weighted by pi. With the sign of k3's log-ratio flipped this would give a different value."""
    g = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    ref = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    kl = (logp.exp() * (logp - ref)).sum()
    for estimator in ("k1", "k3"):
        expectation = (logp.exp() * kl_penalty(logp, ref, estimator).double()).sum()
        torch.testing.assert_close(expectation, kl, rtol=1e-5, atol=1e-6)


def test_kl_clamp():
    # log_ratio = -1 - (-30) = 29 -> k1 29 -> clamped 10; log_ratio -29 -> k1 -29 -> -10;
    # k3 at log_ratio -29: e^29 - 1 - 29 ~ 3.9e12 -> 10. clamp = 0 is off.
    logp, ref = t(-1.0, -30.0), t(-30.0, -1.0)
    torch.testing.assert_close(kl_penalty(logp, ref, "k1", clamp=10.0), t(10.0, -10.0))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3", clamp=10.0)[1], torch.tensor(10.0))
    torch.testing.assert_close(kl_penalty(logp, ref, "k1", clamp=0.0), t(29.0, -29.0))
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")  # k2 exists since issue #15


def test_kl_is_exactly_zero_when_policy_equals_reference():
    """Step 3 of the loop on a real (tiny) model: the reference is a copy of the policy, so the per-token
    KL must be exactly 0 before any update (any nonzero value means the two forward passes differ)."""
    policy = GPT(config_for("tiny", vocab_size=50))
    policy.init_weights(seed=0)
    policy.eval()
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (3, 14), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # left-padded prompts, as in the rollout
    attention_mask[2, :5] = 0
    with torch.no_grad():
        logp, _, _ = response_logprobs(policy, ids, attention_mask, 6, temperature=0.7)
        ref_logp, _, _ = response_logprobs(ref, ids, attention_mask, 6, temperature=0.7)
        full = token_logprobs(policy(ids, attention_mask=attention_mask)[:, :-1], ids[:, 1:], 0.7)
    assert logp.shape == (3, 8)
    torch.testing.assert_close(logp, full[:, 5:])  # response token t is predicted at position P - 1 + t
    for estimator in ("k1", "k3"):
        kl = kl_penalty(logp, ref_logp, estimator)
        assert torch.equal(kl, torch.zeros_like(kl)), estimator


# -----------------------------------------------------------------------------
# 2. GAE


def brute_force_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t over the valid
    positions only (V = 0 past the last valid one); everything 0 outside the mask. Plain Python loops."""
    B, N = rewards.shape
    adv = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        L = lengths[b]
        v = [float(values[b, i]) if i < L else 0.0 for i in range(N + 1)]
        delta = [float(rewards[b, i]) + gamma * v[i + 1] - v[i] for i in range(L)]
        for i in range(L):
            adv[b, i] = sum((gamma * lam) ** k * delta[i + k] for k in range(L - i))
    return adv


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95)])
def test_gae_equals_brute_force(gamma, lam):
    g = torch.Generator().manual_seed(4)
    lengths, N = [7, 1, 4, 5, 2], 7
    mask = right_padded_mask(lengths, N)
    rewards = torch.randn(5, N, generator=g, dtype=torch.float64)
    values = torch.randn(5, N, generator=g, dtype=torch.float64)
    # Junk outside the mask must not reach the advantages.
    rewards_junk = torch.where(mask, rewards, torch.full_like(rewards, 1e3))
    values_junk = torch.where(mask, values, torch.full_like(values, -1e3))
    adv, ret = compute_gae(rewards_junk, values_junk, mask, gamma, lam)
    expected = brute_force_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
    assert torch.equal(ret[~mask], torch.zeros_like(ret[~mask]))


def test_gae_hand_values():
    # r = [0, 0, 1], V = [0.5, 0.5, 0.5], gamma 1, lam 0.5, all valid:
    #   delta_2 = 1 + 0 - 0.5 = 0.5;  delta_1 = 0 + 0.5 - 0.5 = 0;  delta_0 = 0
    #   A_2 = 0.5;  A_1 = 0 + 0.5 * 0.5 = 0.25;  A_0 = 0 + 0.5 * 0.25 = 0.125
    #   returns = A + V = [0.625, 0.75, 1.0]
    adv, ret = compute_gae(t([0.0, 0.0, 1.0]), t([0.5, 0.5, 0.5]), torch.ones(1, 3, dtype=torch.bool), 1.0, 0.5)
    torch.testing.assert_close(adv, t([0.125, 0.25, 0.5]))
    torch.testing.assert_close(ret, t([0.625, 0.75, 1.0]))
    # The docstring's promise holds for any mask, not only right padding: zero outside it.
    hole = t([True, False, True], dtype=torch.bool)
    adv, ret = compute_gae(t([1.0, 2.0, 3.0]), t([0.5, 0.5, 0.5]), hole, 1.0, 0.5)
    assert adv[0, 1] == 0 and ret[0, 1] == 0


def trl_gae_loop(rewards, values, gamma, lam):
    """The GAE loop of trl 1.12.0 trl/experimental/ppo/ppo_trainer.py L786-796, as a reference: no mask,
    TRL relies on its inputs being 0 past the (p1) mask."""
    lastgaelam, reversed_adv = 0, []
    N = rewards.shape[1]
    for i in reversed(range(N)):
        nextvalues = values[:, i + 1] if i < N - 1 else 0.0
        delta = rewards[:, i] + gamma * nextvalues - values[:, i]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_trl_loop(gamma, lam):
    g = torch.Generator().manual_seed(5)
    lengths, N = [9, 3, 6, 1], 9
    mask = right_padded_mask(lengths, N)
    # TRL's inputs: values masked_fill(padding_mask_p1, 0); rewards are -beta * KL with INVALID_LOGPROB
    # on both sides past the mask, so 0 there.
    rewards = torch.randn(4, N, generator=g) * mask
    values = torch.randn(4, N, generator=g) * mask
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    trl_adv, trl_ret = trl_gae_loop(rewards, values, gamma, lam)
    torch.testing.assert_close(adv, trl_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(ret, trl_ret, rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# 3. Policy loss


def log(x):
    return math.log(x)


@pytest.mark.parametrize("ratio,adv,loss,clipped", [
    # loss = max(-A * r, -A * clip(r, 0.8, 1.2))
    (1.5, +1.0, -1.2, 1.0),  # max(-1.5, -1.2) = -1.2: clipped, no incentive to push r higher
    (1.5, -1.0, 1.5, 0.0),   # max(1.5, 1.2) = 1.5: unclipped, the bad action keeps its full penalty
    (0.5, +1.0, -0.5, 0.0),  # max(-0.5, -0.8) = -0.5: unclipped
    (0.5, -1.0, 0.8, 1.0),   # max(0.5, 0.8) = 0.8: clipped
    (1.0, +2.0, -2.0, 0.0),  # r = 1: loss = -A
    (1.0, -3.0, 3.0, 0.0),
])
def test_policy_loss_single_token(ratio, adv, loss, clipped):
    logp, old = t([log(ratio)]), t([0.0])
    value, stats = policy_loss(logp, old, t([adv]), torch.ones(1, 1, dtype=torch.bool), cliprange=0.2)
    torch.testing.assert_close(value, torch.tensor(loss))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(clipped))
    torch.testing.assert_close(stats["ratio"], torch.tensor(ratio))
    torch.testing.assert_close(stats["approxkl"], torch.tensor(0.5 * log(ratio) ** 2))


def test_policy_loss_batch_stats_and_gradient():
    # The four cases above in one row of 4 valid tokens plus 2 masked ones holding junk.
    #   loss = (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15;  clipfrac = 2 / 4
    #   approxkl = 0.5 * (2 ln(1.5)^2 + 2 ln(0.5)^2) / 4 = 0.25 * (0.164402 + 0.480453) = 0.161214
    #   d loss / d logp_t = -A_t r_t / 4 where unclipped, 0 where clipped: [0, 1.5/4, -0.5/4, 0]
    logp = t([log(1.5), log(1.5), log(0.5), log(0.5), 50.0, -50.0]).requires_grad_()
    old = torch.zeros(1, 6)
    adv = t([1.0, -1.0, 1.0, -1.0, 1e6, -1e6])
    mask = t([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.15))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(0.5))
    torch.testing.assert_close(stats["approxkl"], torch.tensor(0.25 * (log(1.5) ** 2 + log(0.5) ** 2)))
    torch.testing.assert_close(stats["ratio"], torch.tensor((1.5 + 1.5 + 0.5 + 0.5) / 4))
    loss.backward()
    torch.testing.assert_close(logp.grad, t([0.0, 0.375, -0.125, 0.0, 0.0, 0.0]))


def test_policy_loss_is_minus_mean_advantage_at_ratio_one():
    """First minibatch of an update: new == old log-probs, so ratio is exactly 1, nothing is clipped,
    approxkl is 0 and the loss is -masked_mean(A)."""
    g = torch.Generator().manual_seed(6)
    logp = -torch.rand(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    mask = right_padded_mask([5, 2, 4], 5)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask)
    torch.testing.assert_close(loss, -adv[mask].mean())
    assert stats["clipfrac"] == 0 and stats["approxkl"] == 0 and stats["ratio"] == 1


def test_dual_clip_caps_negative_advantage_loss():
    # A = -1, r = 5: the plain clipped loss is max(5, 1.2) = 5; dual clip c = 3 caps it at -A * c = 3.
    # A = -1, r = 2: max(2, 1.2) = 2 < 3, unchanged.  A = +1, r = 5: -1.2, dual clip never touches A > 0.
    logp, old, mask = t([log(5.0), log(2.0), log(5.0)]), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)
    adv = t([-1.0, -1.0, 1.0])
    per_token = [policy_loss(logp[:, i:i + 1], old[:, i:i + 1], adv[:, i:i + 1], mask[:, i:i + 1], 0.2, dual_clip=3.0)[0]
                 for i in range(3)]
    torch.testing.assert_close(torch.stack(per_token), torch.tensor([3.0, 2.0, -1.2]))
    no_dual = policy_loss(logp[:, :1], old[:, :1], adv[:, :1], mask[:, :1], 0.2, dual_clip=0.0)[0]
    torch.testing.assert_close(no_dual, torch.tensor(5.0))


def test_policy_loss_ignores_masked_positions():
    g = torch.Generator().manual_seed(7)
    logp, old, adv = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = right_padded_mask([6, 1, 3, 5], 6)
    junk = ~mask
    loss_a, stats_a = policy_loss(logp, old, adv, mask)
    loss_b, stats_b = policy_loss(torch.where(junk, 30.0, logp), torch.where(junk, -30.0, old),
                                  torch.where(junk, -1e6, adv), mask)
    torch.testing.assert_close(loss_a, loss_b)
    for key in stats_a:
        torch.testing.assert_close(stats_a[key], stats_b[key])


def test_seq_mean_token_mean_aggregation():
    # Ratio 1 so the per-token loss is -A. Row 0: 1 valid token, loss 4. Row 1: 3 valid tokens, loss 1 each.
    #   token_mean          = (4 + 1 + 1 + 1) / 4 = 1.75  (long responses weigh more)
    #   seq_mean_token_mean = (4 / 1 + 3 / 3) / 2 = 2.5   (every response weighs the same)
    logp = torch.zeros(2, 3)
    adv = t([-4.0, 99.0, 99.0], [-1.0, -1.0, -1.0])
    mask = right_padded_mask([1, 3], 3)
    torch.testing.assert_close(policy_loss(logp, logp, adv, mask, aggregation="token_mean")[0], torch.tensor(1.75))
    torch.testing.assert_close(policy_loss(logp, logp, adv, mask, aggregation="seq_mean_token_mean")[0], torch.tensor(2.5))
    # A row with no valid token is skipped, not counted as a NaN or a zero.
    losses = t([4.0, 0.0, 0.0], [1.0, 1.0, 1.0], [7.0, 7.0, 7.0])
    torch.testing.assert_close(aggregate(losses, right_padded_mask([1, 3, 0], 3), "seq_mean_token_mean"), torch.tensor(2.5))
    with pytest.raises(ValueError):
        aggregate(losses, right_padded_mask([1, 3, 0], 3), "token_sum")


# -----------------------------------------------------------------------------
# 4. Value loss


def test_value_loss_hand_values():
    one = torch.ones(1, 1, dtype=torch.bool)
    # old 0, new 1, return 2, clip 0.2: clipped V = 0 + clamp(1, -0.2, 0.2) = 0.2
    #   max((1 - 2)^2, (0.2 - 2)^2) = max(1, 3.24) = 3.24 -> 0.5 * 3.24 = 1.62; the clipped term won
    loss, clipfrac = value_loss(t([1.0]), t([0.0]), t([2.0]), one, 0.2)
    torch.testing.assert_close(loss, torch.tensor(1.62))
    assert clipfrac == 1.0
    # old 0, new 1, return 0: max((1 - 0)^2, (0.2 - 0)^2) = 1 -> 0.5; the unclipped term won
    loss, clipfrac = value_loss(t([1.0]), t([0.0]), t([0.0]), one, 0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5))
    assert clipfrac == 0.0
    # Inside the clip range (old 0, new 0.1, return 1): both terms (0.1 - 1)^2 = 0.81 -> 0.405, not clipped
    loss, clipfrac = value_loss(t([0.1]), t([0.0]), t([1.0]), one, 0.2)
    torch.testing.assert_close(loss, torch.tensor(0.405))
    assert clipfrac == 0.0


def test_value_loss_unclipped_is_half_mse_over_mask():
    # cliprange_value = 0: 0.5 * mean((1 - 0)^2, (3 - 1)^2) = 0.5 * (1 + 4) / 2 = 1.25; the masked third
    # position (V 100, R -100) would add 40000 if it leaked.
    values, old, returns = t([1.0, 3.0, 100.0]), t([5.0, -5.0, 0.0]), t([0.0, 1.0, -100.0])
    mask = right_padded_mask([2], 3)
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.0)
    torch.testing.assert_close(loss, torch.tensor(1.25))
    assert clipfrac == 0.0
    # With clipping on, the same tokens: clipped V = [5 - 0.2, -5 + 0.2] = [4.8, -4.8]
    #   max(1, 4.8^2 = 23.04) = 23.04;  max(4, (-4.8 - 1)^2 = 33.64) = 33.64
    #   0.5 * (23.04 + 33.64) / 2 = 14.17; both clipped
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(14.17))
    assert clipfrac == 1.0


# -----------------------------------------------------------------------------
# 5. Masked statistics and whitening


def test_masked_var_hand_values_and_bessel():
    # x = [1, 2, 3, 4] (+ junk 1e6 masked): mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4
    # = 1.25, unbiased 5 / 3 = 1.25 * 4 / 3.
    x, mask = t([1.0, 2.0, 3.0, 4.0, 1e6]), t([1, 1, 1, 1, 0], dtype=torch.bool)
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(2.5))
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(1.25))
    torch.testing.assert_close(masked_var(x, mask, unbiased=True), torch.tensor(5.0 / 3.0))
    g = torch.Generator().manual_seed(8)
    x, mask = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.rand(4, 9, generator=g) < 0.6
    n = int(mask.sum())
    torch.testing.assert_close(masked_var(x, mask, True) / masked_var(x, mask, False),
                               torch.tensor(n / (n - 1), dtype=torch.float64))
    with pytest.raises(ValueError):
        masked_var(x, torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), True)[:1], unbiased=True)


def test_masked_whiten_hand_values():
    # x = [1, 3]: mean 2, population variance 1 -> [-1, 1]; shift_mean=False adds the mean back -> [1, 3].
    # Unbiased variance 2 -> [-1, 1] / sqrt(2).
    x, mask = t([1.0, 3.0, -7e5]), t([1, 1, 0], dtype=torch.bool)
    torch.testing.assert_close(masked_whiten(x, mask)[mask], torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False)[mask], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(masked_whiten(x, mask, unbiased=True)[mask], torch.tensor([-1.0, 1.0]) / math.sqrt(2))


@pytest.mark.parametrize("unbiased", [False, True])
def test_masked_whiten_statistics_use_the_mask_only(unbiased):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64) * 3 + 2
    mask = right_padded_mask([8, 2, 5, 1, 7], 8)
    huge = torch.where(mask, x, torch.full_like(x, 1e6))
    other = torch.where(mask, x, torch.full_like(x, -4e5))
    w = masked_whiten(huge, mask, unbiased=unbiased)
    torch.testing.assert_close(w[mask], masked_whiten(other, mask, unbiased=unbiased)[mask])
    assert abs(float(w[mask].mean())) < 1e-10
    torch.testing.assert_close(masked_var(w, mask, unbiased), torch.tensor(1.0, dtype=torch.float64))
    kept = masked_whiten(huge, mask, shift_mean=False, unbiased=unbiased)
    torch.testing.assert_close(kept[mask].mean(), x[mask].mean())
    torch.testing.assert_close(masked_var(kept, mask, unbiased), torch.tensor(1.0, dtype=torch.float64))


def test_masked_stats_match_trl(trl):
    g = torch.Generator().manual_seed(10)
    for _ in range(5):
        x = torch.randn(6, 11, generator=g) * 2 + 0.5
        mask = torch.rand(6, 11, generator=g) < 0.5
        mask[0, :2] = True
        torch.testing.assert_close(masked_mean(x, mask), trl.masked_mean(x, mask))
        torch.testing.assert_close(masked_mean(x, mask, dim=1), trl.masked_mean(x, mask, 1))
        torch.testing.assert_close(masked_var(x, mask, unbiased=True), trl.masked_var(x, mask))
        torch.testing.assert_close(masked_var(x, mask, unbiased=False), trl.masked_var(x, mask, unbiased=False))
        for shift_mean in (True, False):
            torch.testing.assert_close(masked_whiten(x, mask, shift_mean, unbiased=True),
                                       trl.masked_whiten(x, mask, shift_mean))


def test_first_true_indices_hand_and_trl(trl):
    # [F T T] -> 1; [F F F] -> 3 (the row length); [T F F] -> 0
    bools = t([False, True, True], [False, False, False], [True, False, False], dtype=torch.bool)
    assert first_true_indices(bools).tolist() == [1, 3, 0]
    g = torch.Generator().manual_seed(11)
    for shape in [(7, 10), (2, 3, 6), (4, 1)]:
        bools = torch.rand(*shape, generator=g) < 0.2
        bools.view(-1, shape[-1])[0] = False  # an all-False row
        torch.testing.assert_close(first_true_indices(bools), trl.first_true_indices(bools))


def test_response_masks_hand_worked_with_an_extra_stop_token():
    # EOS 9, extra stop token 7. Row 0 stops at its first EOS (index 1), row 1 at the stop token (index 2),
    # row 2 never stops (eos_index N - 1 = 3), row 3 stops on its first token.
    response = t([4, 9, 9, 9], [4, 4, 7, 9], [4, 4, 4, 4], [7, 4, 4, 4], dtype=torch.long)
    ended, eos_index, action_mask, score_idx, value_mask = response_masks(response, 9, 7, "after_eos")
    assert ended.tolist() == [True, True, False, True]
    assert eos_index.tolist() == [1, 2, 3, 0]
    assert action_mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert score_idx.tolist() == [2, 3, 3, 1]  # one slot after the stop token, clipped to N - 1
    assert value_mask.int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    ended, eos_index, action_mask, score_idx, value_mask = response_masks(response, 9, -1, "eos")
    assert ended.tolist() == [True, True, False, False]  # without the extra stop token, rows 1 and 3 run on
    assert eos_index.tolist() == [1, 3, 3, 3] and torch.equal(score_idx, eos_index)
    assert torch.equal(value_mask, action_mask)


def test_masks_match_trl_truncate_response(trl):
    """Our action mask (tokens up to and including the first stop) is TRL's non-pad part of
    truncate_response; our "after_eos" value mask and score index are TRL's padding_mask_p1 and actual_end
    (ppo_trainer.py L762-779)."""
    g = torch.Generator().manual_seed(12)
    stop, pad, N = 3, 99, 10
    response = torch.randint(0, 8, (16, N), generator=g)
    response[0] = 5  # never stops
    response[1, -1] = stop  # stops on the last token
    response[1, :-1] = 6
    response[2, 0] = stop  # stops on the first token
    ended, eos_index, action_mask, score_idx, value_mask = response_masks(response, stop, -1, "after_eos")
    post = trl.truncate_response(stop, pad, response)
    sequence_lengths = trl.first_true_indices(post == pad) - 1
    idx = torch.arange(N).repeat(response.size(0), 1)
    padding_mask = idx > sequence_lengths[:, None]
    padding_mask_p1 = idx > (sequence_lengths + 1)[:, None]
    actual_end = torch.where(sequence_lengths + 1 < N, sequence_lengths + 1, sequence_lengths)
    assert torch.equal(action_mask, post != pad)
    assert torch.equal(action_mask, ~padding_mask)
    assert torch.equal(eos_index, sequence_lengths)
    assert torch.equal(value_mask, ~padding_mask_p1)
    assert torch.equal(score_idx, actual_end)
    assert torch.equal(ended, (post == stop).any(1))
    assert not ended[0] and ended[1] and ended[2]
    assert action_mask[0].all() and action_mask[1].all() and action_mask[2].tolist() == [True] + [False] * (N - 1)


def test_rewards_and_advantages_match_trl_pipeline(trl):
    """Steps 3-4 of the loop with the trl preset (k1, score after EOS, subtractive missing-EOS penalty,
    unbiased rollout whitening) against TRL's steps on the same tensors (ppo_trainer.py L755-797)."""
    g = torch.Generator().manual_seed(13)
    B, N, stop, pad, beta, gamma, lam = 8, 9, 3, 99, 0.05, 1.0, 0.95
    response = torch.randint(0, 8, (B, N), generator=g)
    response[0] = 5
    logp = -torch.rand(B, N, generator=g) * 3
    ref_logp = -torch.rand(B, N, generator=g) * 3
    values = torch.randn(B, N, generator=g)
    scores = torch.randn(B, generator=g)

    # TRL (missing_eos_penalty=1.0, INVALID_LOGPROB=1.0, whiten_rewards=False)
    post = trl.truncate_response(stop, pad, response)
    seq_len = trl.first_true_indices(post == pad) - 1
    idx = torch.arange(N).repeat(B, 1)
    padding_mask, padding_mask_p1 = idx > seq_len[:, None], idx > (seq_len + 1)[:, None]
    trl_scores = scores.clone()
    trl_scores[~(post == stop).any(1)] -= 1.0
    t_logp, t_ref = logp.masked_fill(padding_mask, 1.0), ref_logp.masked_fill(padding_mask, 1.0)
    t_values = values.masked_fill(padding_mask_p1, 0)
    trl_rewards = -beta * (t_logp - t_ref)
    actual_end = torch.where(seq_len + 1 < N, seq_len + 1, seq_len)
    trl_rewards[torch.arange(B), actual_end] += trl_scores
    trl_adv, trl_returns = trl_gae_loop(trl_rewards, t_values, gamma, lam)
    trl_adv = trl.masked_whiten(trl_adv, ~padding_mask).masked_fill(padding_mask, 0)

    # Ours, as ppo.main composes the functions
    ended, eos_index, action_mask, score_idx, value_mask = response_masks(response, stop, -1, "after_eos")
    our_scores = apply_missing_eos_penalty(scores, ended, -1.0, "subtract")
    kl = kl_penalty(logp, ref_logp, "k1") * action_mask
    rewards, _ = compute_rewards(kl, our_scores, score_idx, beta)
    adv, returns = compute_gae(rewards, values * value_mask, value_mask, gamma, lam)
    adv = whiten_advantages(adv, action_mask, "rollout", True, Dist())

    torch.testing.assert_close(our_scores, trl_scores)
    torch.testing.assert_close(rewards, trl_rewards)
    torch.testing.assert_close(returns, trl_returns, rtol=0, atol=1e-6)
    torch.testing.assert_close(adv, trl_adv, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# 6. Advantage whitening modes


def test_whiten_advantages_modes():
    g = torch.Generator().manual_seed(14)
    mask = right_padded_mask([6, 3, 1, 5], 6)
    adv = torch.where(mask, torch.randn(4, 6, generator=g, dtype=torch.float64) + 0.7, torch.full((4, 6), 1e5, dtype=torch.float64))
    d = Dist()
    zeros_outside = lambda out: torch.equal(out[~mask], torch.zeros_like(out[~mask]))  # noqa: E731
    for unbiased in (False, True):
        rollout = whiten_advantages(adv, mask, "rollout", unbiased, d)
        torch.testing.assert_close(rollout, masked_whiten(adv, mask, unbiased=unbiased) * mask)
        assert abs(float(rollout[mask].mean())) < 1e-10
        torch.testing.assert_close(masked_var(rollout, mask, unbiased), torch.tensor(1.0, dtype=torch.float64))
        # One process: "global" statistics are this rank's.
        torch.testing.assert_close(whiten_advantages(adv, mask, "global", unbiased, d), rollout)
        # torchtune's whiten: unit variance, mean kept.
        kept = whiten_advantages(adv, mask, "mean_preserving", unbiased, d)
        torch.testing.assert_close(kept[mask].mean(), adv[mask].mean())
        torch.testing.assert_close(masked_var(kept, mask, unbiased), torch.tensor(1.0, dtype=torch.float64))
        for mode in ("none", "minibatch"):  # "minibatch" whitens later, inside the update loop
            torch.testing.assert_close(whiten_advantages(adv, mask, mode, unbiased, d), adv * mask)
        for out in (rollout, kept):
            assert zeros_outside(out)
    # Hand: [0, 4] -> mean 2, population std 2 -> [-1, 1] + 2 = [1, 3] (mean_preserving), [-1, 1] (rollout)
    x, m = t([0.0, 4.0]), torch.ones(1, 2, dtype=torch.bool)
    torch.testing.assert_close(whiten_advantages(x, m, "mean_preserving", False, d), t([1.0, 3.0]))
    torch.testing.assert_close(whiten_advantages(x, m, "rollout", False, d), t([-1.0, 1.0]))


def test_whiten_advantages_rejects_unknown_mode():
    with pytest.raises(ValueError):
        whiten_advantages(t([0.0, 4.0]), torch.ones(1, 2, dtype=torch.bool), "globl", False, Dist())


# -----------------------------------------------------------------------------
# 7. Adaptive KL controller


def test_adaptive_kl_controller_hand_values():
    # init 0.1, target 6, horizon 10000, n_steps 512:
    #   KL 12:  error = clip(12 / 6 - 1 = 1, +-0.2) = 0.2;  beta = 0.1 * (1 + 0.2 * 512 / 10000) = 0.101024
    #   KL 3:   error = clip(-0.5) = -0.2;                  beta = 0.1 * (1 - 0.0512 / 5)        = 0.098976
    #   KL 6.6: error = 0.1 (inside the clip);              beta = 0.1 * (1 + 0.1 * 0.0512)      = 0.100512
    #   KL 6:   error 0, beta unchanged
    for kl, expected in [(12.0, 0.101024), (3.0, 0.098976), (6.6, 0.100512), (6.0, 0.1)]:
        ctl = AdaptiveKLController(0.1, 6.0, 10000)
        assert ctl.update(kl, 512) == pytest.approx(expected, rel=1e-12)
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    # Updates compound: two steps at KL 12 -> 0.1 * 1.01024^2
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 512)
    assert ctl.update(100.0, 512) == pytest.approx(0.1 * 1.01024 ** 2, rel=1e-12)


# -----------------------------------------------------------------------------
# 8. Score placement, the no-EOS penalty, per-token rewards


def test_score_indices():
    eos_index = torch.tensor([0, 3, 6, 7])
    assert score_indices(eos_index, 8, "eos").tolist() == [0, 3, 6, 7]
    assert score_indices(eos_index, 8, "after_eos").tolist() == [1, 4, 7, 7]  # n - 1 at the end
    with pytest.raises(ValueError):
        score_indices(eos_index, 8, "last")


def test_apply_missing_eos_penalty():
    scores, ended = t(0.5, -0.3, 2.0, 1.0), torch.tensor([True, False, False, True])
    # replace: score := -1 on rows 1 and 2;  subtract: score - 1 there (TRL passes +1.0, we store -1.0)
    torch.testing.assert_close(apply_missing_eos_penalty(scores, ended, -1.0, "replace"), t(0.5, -1.0, -1.0, 1.0))
    torch.testing.assert_close(apply_missing_eos_penalty(scores, ended, -3.0, "replace"), t(0.5, -3.0, -3.0, 1.0))
    torch.testing.assert_close(apply_missing_eos_penalty(scores, ended, -1.0, "subtract"), t(0.5, -1.3, 1.0, 1.0))
    torch.testing.assert_close(apply_missing_eos_penalty(scores, ended, 1.0, "subtract"), t(0.5, -1.3, 1.0, 1.0))
    torch.testing.assert_close(apply_missing_eos_penalty(scores, ended, -1.0, "none"), scores)
    assert scores.tolist() == pytest.approx([0.5, -0.3, 2.0, 1.0])  # not modified in place
    with pytest.raises(ValueError):
        apply_missing_eos_penalty(scores, ended, -1.0, "scale")


def test_compute_rewards_hand_values():
    # beta 0.1, kl row 0 = [1, 2, 3, 4], score 2 at index 1:
    #   -0.1 * kl = [-0.1, -0.2, -0.3, -0.4] -> [-0.1, 1.8, -0.3, -0.4]
    # row 1: kl 0, score -1 at index 3 -> [0, 0, 0, -1]
    kl = t([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    kl_before = kl.clone()
    rewards, non_score = compute_rewards(kl, t(2.0, -1.0), torch.tensor([1, 3]), 0.1)
    torch.testing.assert_close(rewards, t([-0.1, 1.8, -0.3, -0.4], [0.0, 0.0, 0.0, -1.0]))
    torch.testing.assert_close(non_score, -0.1 * kl_before)
    assert torch.equal(kl, kl_before)


def test_compute_rewards_beta_zero_is_score_one_hot():
    g = torch.Generator().manual_seed(15)
    kl = torch.randn(5, 7, generator=g)
    scores = torch.randn(5, generator=g)
    score_idx = torch.tensor([0, 6, 3, 3, 2])
    rewards, non_score = compute_rewards(kl, scores, score_idx, 0.0)
    expected = torch.zeros(5, 7)
    expected[torch.arange(5), score_idx] = scores
    assert torch.equal(rewards, expected)
    assert torch.equal(non_score.abs(), torch.zeros(5, 7))
    rewards, _ = compute_rewards(kl, scores, score_idx, 0.3)
    torch.testing.assert_close(rewards, -0.3 * kl + expected)


# -----------------------------------------------------------------------------
# 10. Entropy


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(16)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 3
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits).double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)
    # Uniform logits (any constant) -> log V; a near one-hot -> 0, not NaN; bf16 in, float32 out.
    torch.testing.assert_close(entropy_from_logits(torch.full((2, 50), 7.0)), torch.full((2,), math.log(50)))
    peaked = torch.zeros(1, 50)
    peaked[0, 3] = 1e4
    torch.testing.assert_close(entropy_from_logits(peaked), torch.zeros(1))
    assert entropy_from_logits(logits.to(torch.bfloat16)).dtype == torch.float32


def test_short_response_penalty_replaces_only_short_scores():
    scores, lengths = torch.tensor([0.9, 0.5, 2.0, -0.3]), torch.tensor([0, 1, 2, 5])  # tokens before EOS
    got = ppo.apply_short_response_penalty(scores, lengths, min_tokens=2, penalty=-1.0)
    assert torch.equal(got, torch.tensor([-1.0, -1.0, 2.0, -0.3]))
    assert torch.equal(ppo.apply_short_response_penalty(scores, lengths, 0, -1.0), scores)  # off by default


def test_degeneration_warnings_fire_on_collapse_and_kl_jump_only():
    assert ppo.degeneration_warnings(30.0, 40.0, 1.0, 0.8) == []
    collapse = ppo.degeneration_warnings(1.8, 40.0, 1.0, 0.8)  # HH: EOS-only answers after 10 updates
    assert len(collapse) == 1 and "fell from 40.0 to 1.8 tokens" in collapse[0]
    jump = ppo.degeneration_warnings(30.0, 40.0, 4.0, 0.9)
    assert len(jump) == 1 and "jumped from 0.90 to 4.00" in jump[0]
    assert ppo.degeneration_warnings(30.0, 40.0, 4.0, None) == []  # the first update has nothing to compare
