"""Bug class 3 (issue #16): a KL estimator and its placement can give a gradient that is not that of KL(pi || ref).

Sources: verl PR #2953 (E[grad k3] != grad KL), OpenRLHF PR #1309 (k1 in the loss has zero expected gradient, k3
in the loss descends the forward KL), TRL #4967 and PR #6503 (k1 in the reward is unbiased; the IS weight
changes the gradient even at ratio 1), slime PR #1039 (IS-weighted k2 is biased).

A one-token "language model": a categorical policy pi = softmax(theta) over K = 5 tokens, a fixed reference, and
the sampling policy pi_old. Because the support is enumerable, the *expected* gradient of each placement is an
exact sum, sum_x pi_old(x) grad L(x), no sampling noise. Each is compared with the analytic gradient of
KL(pi || ref) (and of the forward KL(ref || pi)), for every estimator and placement, on-policy (pi_old = pi)
and off-policy. The per-sample losses are built with ppo.py's own functions:

- "reward": -beta * k(x) is the reward, so the advantage is -k(x) and the loss is ppo.policy_loss (beta = 1);
- "loss": ppo.loss_side_kl(..., is_weight=False), as ppo_update adds it;
- "loss+IS": ppo.loss_side_kl(..., is_weight=True) (TRL use_bias_correction_kl).

Expected, worked out in ppo.loss_side_kl's docstring and the threads above (l = log pi - log ref, r = pi / pi_old):
  reward:  k1 -> E[l grad log pi] = grad KL       unbiased
           k2, k3                                 biased
  loss:    k1 -> E[grad log pi] = 0              biased (regularizes nothing; ppo.validate refuses it)
           k2 -> E[l grad log pi]                 unbiased on-policy only
           k3 -> E[(1 - ref/pi) grad log pi] = grad KL(ref || pi)   biased (forward KL)
  loss+IS: k1 -> E_old[r (l + 1) grad log pi] = grad KL     unbiased
           k2 -> E_old[r (l + l^2/2) grad log pi]           biased
           k3 -> E_old[r l grad log pi] = grad KL           unbiased
"""

import pytest
import torch

import ppo

K = 5
THETA = torch.tensor([0.3, -1.2, 0.8, 0.0, -0.4], dtype=torch.float64)
REF = torch.log_softmax(torch.tensor([-0.5, 0.4, 0.2, -1.0, 0.9], dtype=torch.float64), 0)
OLD = torch.log_softmax(torch.tensor([0.1, -0.7, 1.1, 0.3, -0.2], dtype=torch.float64), 0)  # off-policy sampler


def expected_grad(placement: str, estimator: str, on_policy: bool) -> torch.Tensor:
    theta = THETA.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, 0)  # log pi(x) for every token x: the "batch" is the whole support
    old = logp.detach() if on_policy else OLD
    tokens = lambda v: v[:, None]  # (K,) -> (K, 1): K one-token responses  # noqa: E731
    mask = torch.ones(K, 1, dtype=torch.bool)
    if placement == "reward":
        k = ppo.kl_penalty(tokens(old), tokens(REF), estimator).detach()  # estimated on the sampled tokens
        losses, _ = ppo.policy_loss(tokens(logp), tokens(old), -k, mask, cliprange=1e9, aggregation="seq_mean_token_sum")
        # The per-sample loss policy_loss aggregates, at ratio 1 and unclipped: -A * ratio (checked to equal it).
        surrogate = k[:, 0] * torch.exp(logp - old)
        torch.testing.assert_close(losses, surrogate.mean())
    else:
        surrogate = ppo.loss_side_kl(tokens(logp), tokens(old), tokens(REF), estimator,
                                     is_weight=(placement == "loss+IS"))[:, 0]
    weights = old.exp()  # the samples come from pi_old
    (grad,) = torch.autograd.grad((weights * surrogate).sum(), theta)
    return grad


def analytic(kind: str) -> torch.Tensor:
    theta = THETA.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, 0)
    kl = (logp.exp() * (logp - REF)).sum() if kind == "reverse" else (REF.exp() * (REF - logp)).sum()
    return torch.autograd.grad(kl, theta)[0]


# (placement, estimator, on_policy) -> what the expected gradient equals: "reverse", "forward", "zero" or "biased".
CASES = {
    ("reward", "k1", True): "reverse", ("reward", "k2", True): "biased", ("reward", "k3", True): "biased",
    ("loss", "k1", True): "zero", ("loss", "k2", True): "reverse", ("loss", "k3", True): "forward",
    ("loss+IS", "k1", True): "reverse", ("loss+IS", "k2", True): "biased", ("loss+IS", "k3", True): "reverse",
    ("loss", "k2", False): "biased", ("loss+IS", "k1", False): "reverse", ("loss+IS", "k3", False): "reverse",
    ("loss+IS", "k2", False): "biased",
}


@pytest.mark.parametrize("placement,estimator,on_policy", sorted(CASES))
def test_expected_kl_gradient(placement, estimator, on_policy):
    g = expected_grad(placement, estimator, on_policy)
    reverse, forward = analytic("reverse"), analytic("forward")
    verdict = CASES[placement, estimator, on_policy]
    label = "unbiased" if verdict == "reverse" else "biased"
    print(f"{placement:8s} {estimator} {'on' if on_policy else 'off'}-policy: {label:8s} "
          f"E[grad] - grad KL(pi||ref) = {(g - reverse).abs().max().item():.2e}")
    # kl_penalty computes in float32 (as in training), hence 1e-6; the biases are 5e-2 or more.
    if verdict == "reverse":
        torch.testing.assert_close(g, reverse, atol=1e-6, rtol=0)
    elif verdict == "forward":
        torch.testing.assert_close(g, forward, atol=1e-6, rtol=0)
        assert (g - reverse).abs().max() > 1e-2
    elif verdict == "zero":
        torch.testing.assert_close(g, torch.zeros(K, dtype=torch.float64), atol=1e-6, rtol=0)
    else:
        assert (g - reverse).abs().max() > 1e-2, "expected a biased gradient"


def test_is_weight_changes_the_gradient_at_ratio_one():
    # TRL PR #6503 review: the weight's value is 1 on-policy, but it is differentiable.
    assert (expected_grad("loss", "k3", True) - expected_grad("loss+IS", "k3", True)).abs().max() > 1e-2
