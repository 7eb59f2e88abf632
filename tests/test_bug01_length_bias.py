"""Bug class 1 (issue #16): how the loss aggregation weighs each token of a short and a long response.

Sources: TRL PR #3138 (seq-mean-token-mean vs / max_completion_length vs token-mean; long negative-advantage
completions were penalized less per token), TRL PR #3256 (TRL's "DAPO" was really BNPO), Dr. GRPO (Liu et al.
2025). Two responses of lengths L1 = 2 and L2 = 5 in one batch (B = 2, horizon N = 8), the same advantage on
every token: d loss / d (token loss) is each token's weight, hand-worked per mode:

  token_mean, global_token_mean   1 / (L1 + L2) = 1/7 for every token
  seq_mean_token_mean             1 / (B * L_i): 1/4 on the short response, 1/10 on the long one
  seq_mean_token_sum              1 / B = 1/2 for every token
  seq_mean_token_sum_norm         1 / (B * N) = 1/16 for every token

So under seq_mean_token_mean a token of the long response moves the policy 2.5x less than one of the short
response: a long bad answer is penalized less per token (the length bias Dr. GRPO removes).
"""

import pytest
import torch

import ppo

L1, L2, N = 2, 5, 8
MASK = torch.arange(N)[None, :] < torch.tensor([L1, L2])[:, None]
EXPECTED = {
    "token_mean": (1 / 7, 1 / 7),
    "global_token_mean": (1 / 7, 1 / 7),
    "seq_mean_token_mean": (1 / 4, 1 / 10),
    "seq_mean_token_sum": (1 / 2, 1 / 2),
    "seq_mean_token_sum_norm": (1 / 16, 1 / 16),
}


def token_weights(mode):
    losses = torch.randn(2, N, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ppo.aggregate(losses, MASK, mode, horizon=N).backward()
    return losses.grad


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_per_token_weight(mode):
    w = token_weights(mode)
    short, long_ = EXPECTED[mode]
    expected = torch.zeros(2, N)
    expected[0, :L1], expected[1, :L2] = short, long_
    torch.testing.assert_close(w, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_policy_gradient_weight_through_policy_loss(mode):
    """The same weights reach the log-probs through ppo.policy_loss at ratio 1: d loss / d logp_t = -A * w_t."""
    logp = torch.zeros(2, N, requires_grad=True)
    adv = torch.full((2, N), -1.0)  # a bad answer: the gradient pushes its tokens down, each by its weight
    loss, _ = ppo.policy_loss(logp, logp.detach(), adv, MASK, aggregation=mode, horizon=N)
    loss.backward()
    short, long_ = EXPECTED[mode]
    assert logp.grad[0, 0].item() == pytest.approx(short) and logp.grad[1, 0].item() == pytest.approx(long_)
    assert (logp.grad[~MASK] == 0).all()
