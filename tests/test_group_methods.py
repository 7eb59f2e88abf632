"""Group methods in ppo.py (GRPO, Dr. GRPO, RLOO, REINFORCE++), against hand-worked values.

Parity with verl's, TRL's and OpenRLHF's own code is in tests/test_parity_verl_group.py, test_parity_trl_grpo.py and
test_parity_openrlhf_group.py; the bug classes of issue #16 that these methods raise are in tests/test_bug0*.py.
"""

import json
import math

import pytest
import torch

import data
import ppo
from model import generate
from runtime import Dist


def setup(checkpoints, **overrides):
    cfg = ppo.Config(sft=str(checkpoints / "sft"), reward_model=str(checkpoints / "rm"), response_length=8,
                     temperature=0.7, num_ppo_epochs=2, rollout_batch_size=6, micro_batch_size=3, lr=1e-3,
                     **overrides)
    d = Dist()
    policy, ref, rm, critic = ppo.build_models(cfg, d)
    trainable = torch.nn.ModuleDict({"policy": policy} | ({"critic": critic} if critic is not None else {}))
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr)
    return cfg, d, policy, ref, rm, critic, trainable, optimizer


def rollout(policy, tok, cfg, seed=1):
    prompts = ["ab=", "cdefgh=", "p=", "abcdefgh=", "mno=", "ij="]
    ids, mask = data.pad_left([tok.encode(p) for p in prompts], tok.eos_id)
    qr, logp = generate(policy, ids, mask, cfg.response_length, temperature=cfg.temperature, eos_id=tok.eos_id,
                        pad_id=tok.eos_id, generator=torch.Generator().manual_seed(seed))
    return qr, mask, logp


def right_padded_mask(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


# -----------------------------------------------------------------------------
# The bug: an empty response under seq_mean_token_mean


def test_empty_response_does_not_poison_seq_mean_token_mean_gradient():
    """A response whose action mask is all False (its reward model score was non-finite, make_experience clears
    it) must be left out of the loss and of the gradient; before the fix its per-sequence mean was 0/0 = NaN,
    and although indexing dropped it from the loss *value*, backward multiplied that NaN into every gradient."""
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], requires_grad=True)
    mask = right_padded_mask([2, 0, 3], 3)  # row 1 is empty
    loss = ppo.aggregate(losses, mask, "seq_mean_token_mean")
    loss.backward()
    # Hand-worked: mean of the two non-empty rows' means: ((1 + 2) / 2 + (7 + 8 + 9) / 3) / 2 = (1.5 + 8) / 2.
    assert loss.item() == pytest.approx(4.75)
    assert torch.isfinite(losses.grad).all(), losses.grad
    # d loss / d l_bt = 1 / (B_valid * L_b) on valid tokens: 1/4 for row 0, 1/6 for row 2, 0 elsewhere.
    expected = torch.tensor([[0.25, 0.25, 0.0], [0.0, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]])
    torch.testing.assert_close(losses.grad, expected)


def test_empty_response_is_left_out_of_a_whole_update(checkpoints):
    """End to end: the reward model returns NaN for one response, make_experience clears its mask, and the update
    under seq_mean_token_mean still takes every optimizer step (before the fix: all skipped, as the issue says)."""
    cfg, d, policy, ref, rm, critic, trainable, optimizer = setup(checkpoints, loss_aggregation="seq_mean_token_mean")
    tok = data.get_tokenizer("char")
    qr, mask, logp = rollout(policy, tok, cfg)
    real = ppo.reward_scores

    def one_nan(*a, **k):
        s = real(*a, **k).clone()
        s[1] = float("nan")
        return s
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo, "reward_scores", one_nan)
        exp = ppo.make_experience(policy, critic, ref, rm, qr, mask, logp, cfg.kl_coef, tok, cfg, d)
    assert exp["nonfinite_scores"].item() == 1 and not exp["action_mask"][1].any()
    before = [p.detach().clone() for p in policy.parameters()]
    stats = ppo.ppo_update(policy, critic, trainable, optimizer, [cfg.lr], exp, 0, 10, cfg, d)
    assert stats["skipped_steps"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


# -----------------------------------------------------------------------------
# Advantage estimators, hand-worked


def test_grpo_advantages_hand_values():
    # Group 0: r = [1, 2, 3, 6], mean 3, r - mean = [-2, -1, 0, 3]; Bessel variance (4 + 1 + 0 + 9) / 3 = 14/3.
    # Group 1: four equal rewards -> exactly 0 (see group_centered).
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.35, 0.35, 0.35, 0.35], dtype=torch.float64)
    std0 = math.sqrt(14 / 3)
    got = ppo.grpo_advantages(r, 4, "group", eps=0.0)
    expected = torch.tensor([-2 / std0, -1 / std0, 0.0, 3 / std0, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    # eps is added to the std, not inside a square root (verl, TRL).
    torch.testing.assert_close(ppo.grpo_advantages(r, 4, "group", eps=0.5)[3], torch.tensor(3 / (std0 + 0.5), dtype=torch.float64))
    # Dr. GRPO: no division.
    torch.testing.assert_close(ppo.grpo_advantages(r, 4, "none"), torch.tensor([-2.0, -1, 0, 3, 0, 0, 0, 0], dtype=torch.float64))
    # "batch": the group-centered rewards over the Bessel std of all 8 rewards (TRL scale_rewards="batch").
    batch_std = r.std().item()
    torch.testing.assert_close(ppo.grpo_advantages(r, 4, "batch", eps=0.0)[:4],
                               torch.tensor([-2.0, -1, 0, 3], dtype=torch.float64) / batch_std)


def test_rloo_advantages_hand_values():
    # r_i minus the mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3.
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(ppo.rloo_advantages(r, 4), torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0], dtype=torch.float64))
    # n = 2: each is the difference to its sibling.
    torch.testing.assert_close(ppo.rloo_advantages(torch.tensor([0.2, 0.9]), 2), torch.tensor([-0.7, 0.7]))


def test_reinforce_pp_hand_values():
    # gamma 0.5. Row 0 (3 valid tokens): G2 = 1.0, G1 = -0.2 + 0.5 * 1.0 = 0.3, G0 = 0.1 + 0.5 * 0.3 = 0.25.
    # Row 1 (4 valid): G3 = 2, G2 = 0 + 1 = 1, G1 = 0 + 0.5 = 0.5, G0 = -1 + 0.25 = -0.75. Zero outside the mask.
    rewards = torch.tensor([[0.1, -0.2, 1.0, 7.0], [-1.0, 0.0, 0.0, 2.0]])
    got = ppo.reinforce_pp_returns(rewards, right_padded_mask([3, 4], 4), gamma=0.5)
    torch.testing.assert_close(got, torch.tensor([[0.25, 0.3, 1.0, 0.0], [-0.75, 0.5, 1.0, 2.0]]))
    # The baseline variant subtracts the group mean of the scores first: [1, 3] -> [-1, 1].
    torch.testing.assert_close(ppo.reinforce_pp_baseline(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2), torch.tensor([-1.0, 1.0, 0.0, 0.0]))


# -----------------------------------------------------------------------------
# Clipping variants


def test_clip_high_and_sequence_level_ratio():
    # One response, two tokens, A = +1 on both, old log-probs 0.
    # Token level: log-ratios [0.5, -0.5] -> ratios [e^.5 = 1.6487, e^-.5 = 0.6065].
    #   eps 0.2 symmetric: token 0 clipped at 1.2 (loss -1.2), token 1 not (loss -0.6065). token mean -0.90327.
    #   clip_high 0.28: token 0 clipped at 1.28 instead: (-1.28 - 0.6065) / 2 = -0.94327.
    logp = torch.tensor([[0.5, -0.5]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)
    loss, stats = ppo.policy_loss(logp, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-(1.2 + math.exp(-0.5)) / 2, abs=1e-6)
    loss, _ = ppo.policy_loss(logp, old, adv, mask, cliprange=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-(1.28 + math.exp(-0.5)) / 2, abs=1e-6)
    # Sequence level (GSPO): one ratio exp(mean log-ratio) = exp(0) = 1 for both tokens, so nothing is clipped and
    # the gradient is -A * 1 * (1/2) per token (d mean / d logp_t = 1/2).
    loss, _ = ppo.policy_loss(logp, old, adv, mask, 0.2, aggregation="seq_mean_token_mean", importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-1.0)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.tensor([[-0.5, -0.5]]))
    # "sequence_sum" (TRL RLOOTrainer): exp(sum) = exp(0.5 - 0.5) = 1 here too, and d sum / d logp_t = 1.
    loss, _ = ppo.policy_loss(logp, old, adv, mask, 0.2, aggregation="seq_mean_token_mean",
                              importance_sampling_level="sequence_sum")
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, torch.tensor([[-1.0, -1.0]]))
    # Sequence ratio exp(mean([0.5, 0.3])) = e^0.4 = 1.49 > 1.2: clipped, zero gradient.
    logp2 = torch.tensor([[0.5, 0.3]], requires_grad=True)
    loss, _ = ppo.policy_loss(logp2, old, adv, mask, 0.2, importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-1.2)
    assert torch.equal(torch.autograd.grad(loss, logp2)[0], torch.zeros(1, 2))


# -----------------------------------------------------------------------------
# KL estimators and where the KL goes


def test_k2_and_k3_hand_values_and_k3_expm1():
    # x = logp - ref = 1: k2 = 0.5; k3 = e^-1 - 1 + 1 = 0.36788. x = -2: k2 = 2, k3 = e^2 - 1 - 2 = 4.38906.
    logp, ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    torch.testing.assert_close(ppo.kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(ppo.kl_penalty(logp, ref, "k3"), torch.tensor([math.exp(-1), math.e ** 2 - 3]))
    # Tiny x in float32: the old exp(-x) - 1 + x cancels to negative values (about half of them at |x| < 1e-4,
    # errors up to 6e-8 = one ulp of 1); expm1(-x) + x stays >= 0 and within float32 rounding of x^2 / 2.
    x = (torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 1e-3
    logp, ref = x, torch.zeros_like(x)
    old = torch.exp(-x) - 1 + x
    assert (old < 0).any(), "the float32 cancellation this test is about did not happen"
    k3 = ppo.kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all(), k3.min()
    torch.testing.assert_close(k3.double(), (x.double() ** 2 / 2), atol=1e-10, rtol=1e-3)


def test_validate_refuses_what_regularizes_nothing():
    base = dict(advantage_estimator="grpo", samples_per_prompt=4)
    with pytest.raises(SystemExit, match="regularizes nothing"):
        ppo.validate(ppo.Config(**base, kl_location="loss", kl_estimator="k1"))
    ppo.validate(ppo.Config(**base, kl_location="loss", kl_estimator="k1", kl_is_weight=True))  # IS form: fine
    ppo.validate(ppo.Config(**base, kl_location="loss", kl_estimator="k3"))
    with pytest.raises(SystemExit, match="kl_is_weight"):
        ppo.validate(ppo.Config(**base, kl_is_weight=True))  # kl_location=reward
    with pytest.raises(SystemExit, match="samples_per_prompt"):
        ppo.validate(ppo.Config(advantage_estimator="rloo", samples_per_prompt=1))
    ppo.validate(ppo.Config(advantage_estimator="reinforce_pp", samples_per_prompt=1))  # no group needed
    with pytest.raises(SystemExit, match="loss_aggregation"):
        ppo.validate(ppo.Config(loss_aggregation="seq-mean-token-mean"))


def test_trl_loss_types_map_onto_modes():
    assert set(ppo.TRL_LOSS_TYPES.values()) <= set(ppo.CHOICES["loss_aggregation"])
    assert ppo.PRESETS["trl_grpo"]["loss_aggregation"] == ppo.TRL_LOSS_TYPES["dapo"]  # GRPOConfig default


# -----------------------------------------------------------------------------
# Wiring: groups, no critic, the current beta


def group_setup(checkpoints, n=4, **overrides):
    cfg = ppo.Config(**{**dict(sft=str(checkpoints / "sft"), reward_model=str(checkpoints / "rm"), response_length=6,
                               temperature=1.0, num_ppo_epochs=1, rollout_batch_size=3, samples_per_prompt=n,
                               micro_batch_size=3 * n, lr=1e-2, advantage_estimator="grpo", advantage_whitening="none",
                               old_logprobs="recompute", missing_eos_mode="none"), **overrides})
    ppo.validate(cfg)
    d = Dist()
    policy, ref, rm, critic = ppo.build_models(cfg, d)
    tok = data.get_tokenizer("char")
    ids, mask = data.pad_left([tok.encode(p) for p in ["ab=", "cdefgh=", "p="]], tok.eos_id)
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    qr, logp = generate(policy, ids, mask, cfg.response_length, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.eos_id,
                        generator=torch.Generator().manual_seed(3))
    return cfg, d, policy, ref, rm, critic, tok, qr, mask, logp


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_group_rollout_has_no_critic_and_zero_mean_groups(checkpoints, estimator):
    cfg, d, policy, ref, rm, critic, tok, qr, mask, logp = group_setup(checkpoints, advantage_estimator=estimator,
                                                                        kl_coef=0.0)
    assert critic is None and not policy.config.scalar_head  # three models, not four
    exp = ppo.make_experience(policy, critic, ref, rm, qr, mask, logp, 0.0, tok, cfg, d)
    adv, am = exp["advantages"], exp["action_mask"]
    per_seq = adv[:, 0]
    # The same advantage on every token of a response, zero outside it.
    assert torch.equal(adv, per_seq[:, None] * am)
    assert not torch.equal(per_seq, torch.zeros_like(per_seq))
    # Each group's advantages sum to 0 (all three estimators centre on the group mean).
    torch.testing.assert_close(per_seq.view(3, 4).sum(1), torch.zeros(3), atol=1e-5, rtol=0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    stats = ppo.ppo_update(policy, None, torch.nn.ModuleDict({"policy": policy}), optimizer, [cfg.lr], exp, 0, 1, cfg, d)
    assert stats["skipped_steps"] == 0 and stats["vf_loss"].item() == 0.0


def test_loss_side_kl_uses_the_current_beta_not_cfg(checkpoints):
    """The loss-side KL must use the beta make_experience was given (adaptive, or restored on resume)."""
    def weights_after(beta_in_exp, cfg_kl_coef):
        cfg, d, policy, ref, rm, critic, tok, qr, mask, logp = group_setup(
            checkpoints, kl_location="loss", kl_estimator="k3", kl_coef=cfg_kl_coef)
        with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
            for p in ref.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        exp = ppo.make_experience(policy, critic, ref, rm, qr, mask, logp, beta_in_exp, tok, cfg, d)
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        ppo.ppo_update(policy, None, torch.nn.ModuleDict({"policy": policy}), optimizer, [1.0], exp, 0, 1, cfg, d)
        return torch.cat([p.detach().flatten() for p in policy.parameters()])
    a = weights_after(0.5, cfg_kl_coef=0.0)
    b = weights_after(0.5, cfg_kl_coef=123.0)
    c = weights_after(0.0, cfg_kl_coef=0.5)
    assert torch.equal(a, b)  # cfg.kl_coef is not read by the update
    assert not torch.allclose(a, c)  # the beta handed in is


def test_grpo_main_runs_resumes_exactly_and_saves_no_critic(checkpoints, tmp_path):
    """ppo.main with a group estimator: samples_per_prompt rows per prompt, no critic saved, resume exact (the
    adaptive beta, which the loss-side KL now reads, is restored with the rest)."""
    from safetensors.torch import load_file

    def args(run_dir, *extra):
        return [f"--sft={checkpoints / 'sft'}", f"--reward_model={checkpoints / 'rm'}", f"--run_dir={run_dir}",
                "--advantage_estimator=grpo", "--samples_per_prompt=3", "--rollout_batch_size=4",
                "--micro_batch_size=6", "--num_minibatches=2", "--num_updates=4", "--response_length=6",
                "--eval_prompts=8", "--eval_every=2", "--save_every=100", "--adaptive_kl", "--kl_location=loss",
                "--kl_estimator=k3", "--kl_is_weight", "--loss_aggregation=seq_mean_token_mean",
                "--missing_eos_mode=none", *extra]
    ppo.main(args(tmp_path / "a"))
    ppo.main(args(tmp_path / "b", "--stop_after=2"))
    ppo.main(args(tmp_path / "b", "--resume"))
    assert not (tmp_path / "a" / "final" / "critic").exists()
    a = load_file(str(tmp_path / "a" / "final" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    episodes = [r["episode"] for r in rows if "episode" in r]
    assert episodes and episodes[-1] == 4 * 4 * 3  # updates x prompts x samples per prompt
    assert any("beta" in r and r["beta"] != 0.1 for r in rows)  # the adaptive beta moved


@pytest.mark.slow
def test_launch_grpo_and_rloo_modes(tmp_path):
    """`bash launch.sh grpo` then `rloo` (tiny sizes) train from the pipeline's SFT and RM and add report rows."""
    from test_pipeline import run_launch
    group = "--num_updates=2 --eval_every=2 --save_every=2 --micro_batch_size=16 --eval_prompts=32 --rollout_batch_size=8"
    for mode in ("grpo", "rloo"):
        out = run_launch(tmp_path, mode, extra_env={"GROUP_ARGS": group})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        runs = tmp_path / "runs"
        assert (runs / mode / "final" / "policy" / "model.safetensors").exists()
        assert not (runs / mode / "final" / "critic").exists()
        cfg = json.load(open(runs / mode / "final" / "run_config.json"))
        assert cfg["sft"] == str(runs / "sft" / "final") and cfg["advantage_estimator"] == mode
    report = json.load(open(tmp_path / "runs" / "report" / "report.json"))
    assert {"sft", "grpo", "rloo"} <= set(report["policies"])
