"""The alignment lab's math: ensemble reductions (Coste et al. 2023) on hand-worked values, the ensemble plumbing
(which checkpoints --reward_model names, bootstrap resamples, scoring with members), and Gao et al.'s RL form
fitted to synthetic curves with known coefficients."""

import json
import math

import pytest
import torch

import plots
from evaluate import reward_model_paths, reward_scores, score_samples
from ppo import ensemble_reward
from reward_model import bootstrap_indices


# -----------------------------------------------------------------------------
# Ensemble reductions


# Three members (rows), two responses (columns).
#   response 0: 1, 2, 3 -> mean 2, min 1, population variance ((1-2)^2 + 0 + (3-2)^2) / 3 = 2/3
#   response 1: 0, 0, 3 -> mean 1, min 0, population variance (1 + 1 + 4) / 3 = 2
SCORES = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]])


def test_mean_and_worst_case_by_hand():
    assert torch.equal(ensemble_reward(SCORES, "mean"), torch.tensor([2.0, 1.0]))
    assert torch.equal(ensemble_reward(SCORES, "min"), torch.tensor([1.0, 0.0]))


def test_uwo_by_hand_uses_population_variance():
    # lambda 0.5: 2 - 0.5 * 2/3 = 5/3; 1 - 0.5 * 2 = 0. With the unbiased variance it would be 1.5 and -0.5.
    torch.testing.assert_close(ensemble_reward(SCORES, "uwo", 0.5), torch.tensor([5.0 / 3.0, 0.0]))
    # lambda 0 is the mean; a larger lambda punishes the response the members disagree on more.
    assert torch.equal(ensemble_reward(SCORES, "uwo", 0.0), ensemble_reward(SCORES, "mean"))


def test_one_member_is_that_member_in_every_mode():
    one = torch.tensor([[0.3, -1.2, 2.0]])
    for mode in ("mean", "min", "uwo"):
        assert torch.equal(ensemble_reward(one, mode, 5.0), one[0])


def test_nonfinite_member_score_stays_nonfinite_and_bad_mode_is_refused():
    scores = torch.tensor([[1.0, float("nan")], [2.0, 0.0]])
    for mode in ("mean", "min", "uwo"):
        out = ensemble_reward(scores, mode, 1.0)
        assert math.isfinite(out[0].item()) and not math.isfinite(out[1].item()), mode  # make_experience masks it
    with pytest.raises(ValueError, match="unknown reward ensemble 'max'"):
        ensemble_reward(scores, "max")


def test_ppo_refuses_a_mistyped_ensemble_flag():
    import ppo
    cfg = ppo.Config(reward_ensemble="wco")
    with pytest.raises(SystemExit, match="--reward_ensemble='wco'"):
        ppo.validate(cfg)


# -----------------------------------------------------------------------------
# Ensemble plumbing


def test_reward_model_paths(tmp_path):
    run = tmp_path / "rm_ens"
    run.mkdir()
    (run / "ensemble.json").write_text(json.dumps({"members": [{"path": "member_0/final"}, {"path": "member_1/final"}]}))
    assert reward_model_paths(str(run)) == [str(run / "member_0/final"), str(run / "member_1/final")]
    assert reward_model_paths("a/final,b/final") == ["a/final", "b/final"]
    assert reward_model_paths("runs/rm/final") == ["runs/rm/final"]


def test_bootstrap_indices_are_seeded_resamples():
    a, b, c = bootstrap_indices(1000, 0), bootstrap_indices(1000, 0), bootstrap_indices(1000, 1)
    assert a == b and a != c
    assert all(0 <= i < 1000 for i in a) and len(a) == 1000
    # With replacement: about 1 - 1/e = 63.2% distinct (sd ~1.5% at n = 1000).
    assert 0.59 < len(set(a)) / 1000 < 0.67


def _tiny_rm(seed: int, gain: float, bias: float):
    from model import GPT, config_for
    torch.manual_seed(seed)
    m = GPT(config_for("tiny", vocab_size=20, scalar_head=True)).eval()
    m.config.reward_gain, m.config.reward_bias = gain, bias
    return m


def test_score_samples_reduces_members_as_given():
    """evaluate.score_samples with a list of members: reduce sees (K, B) of each member's normalized score."""
    import data
    from runtime import Dist
    members = [_tiny_rm(0, 1.0, 0.0), _tiny_rm(1, 2.0, 0.5)]
    policy = _tiny_rm(2, 1.0, 0.0)
    tok = type("Tok", (), {"eos_id": 0})()
    samples = [{"prompt_ids": [3, 4, 5], "response_ids": [6, 7, 0]}, {"prompt_ids": [8], "response_ids": [9, 0]}]
    d = Dist()  # one CPU process
    qr, mask = data.pad_left([s["prompt_ids"] + s["response_ids"] for s in samples], 0)
    by_hand = torch.stack([reward_scores(m, qr, mask) for m in members])  # (2, B)
    for mode in ("mean", "min", "uwo"):
        learned, _ = score_samples(samples, policy, policy, members, tok, 1.0, d,
                                   reduce=lambda s: ensemble_reward(s, mode, 0.7))
        torch.testing.assert_close(torch.tensor(learned), ensemble_reward(by_hand, mode, 0.7))
    one, _ = score_samples(samples, policy, policy, members[1], tok, 1.0, d)
    torch.testing.assert_close(torch.tensor(one), by_hand[1])


# -----------------------------------------------------------------------------
# Gao et al.'s RL form


def test_gao_fit_recovers_known_coefficients_exactly_without_noise():
    d = torch.linspace(0.1, 4.0, 30)
    r = plots.gao_rl(d, 0.8, 0.5)
    alpha, beta = plots.gao_rl_fit(d, r)
    assert alpha == pytest.approx(0.8, abs=1e-9) and beta == pytest.approx(0.5, abs=1e-9)


def test_gao_fit_with_noise_and_a_point_at_zero():
    gen = torch.Generator().manual_seed(0)
    d = torch.cat([torch.zeros(1), torch.linspace(0.2, 3.0, 40)])
    r = plots.gao_rl(d, 0.3, 0.25) + 0.01 * torch.randn(41, generator=gen, dtype=torch.float64)
    alpha, beta = plots.gao_rl_fit(d, r)
    assert alpha == pytest.approx(0.3, abs=0.02) and beta == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ValueError, match="at least two points"):
        plots.gao_rl_fit(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5]))


def test_gao_peak_is_the_argmax_of_the_curve():
    alpha, beta = 0.3, 0.25  # d* = exp(0.3 / 0.25 - 1) = exp(0.2) = 1.2214, R* = 0.25 * 1.2214 = 0.30535
    d_star, r_star = plots.gao_peak(alpha, beta)
    assert d_star == pytest.approx(math.exp(0.2)) and r_star == pytest.approx(0.25 * math.exp(0.2))
    grid = torch.linspace(0.01, 5.0, 50001)
    curve = plots.gao_rl(grid, alpha, beta)
    assert grid[curve.argmax()].item() == pytest.approx(d_star, abs=1e-3)
    assert curve.max().item() == pytest.approx(r_star, abs=1e-7)
    assert plots.gao_peak(0.3, -0.1) is None  # the fit never turns down


def test_gao_analysis_on_a_synthetic_metrics_file(tmp_path):
    """From metrics.jsonl rows as ppo.py writes them: the gain over the step-0 gold is fitted against sqrt(KL)."""
    run = tmp_path / "ppo"
    run.mkdir()
    rows = []
    for step, d in enumerate([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]):
        gold = 0.5 + plots.gao_rl(torch.tensor([d]), 0.3, 0.25).item()
        rows.append({"step": step * 10, "eval/kl": d * d, "eval/gold_reward": gold, "eval/learned_reward": d})
        rows.append({"step": step * 10, "objective/kl": 1.0})  # training rows are ignored
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = plots.gao_analysis({"b": str(run)})["b"]
    assert out["gold0"] == pytest.approx(0.5)
    assert out["alpha"] == pytest.approx(0.3, abs=1e-6) and out["beta"] == pytest.approx(0.25, abs=1e-6)
    # d = 1.0 (step 20) and 1.5 (step 30) straddle d* = 1.22: R(1.0) = 0.300 > R(1.5) = 1.5 (0.3 - 0.25 log 1.5) = 0.298
    assert out["measured_peak"]["step"] == 20
    plots.plot_gao({"b": out}, str(tmp_path / "gao.png"))
    assert (tmp_path / "gao.png").stat().st_size > 1000


def test_mean_std_by_hand():
    assert plots.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert plots.mean_std([0.7]) == (0.7, 0.0)


def test_gao_fit_pools_seeds_each_over_its_own_start():
    """Three seeds on the same curve shape but different starting gold: pooling the gains over each seed's own
    step-0 gold recovers the coefficients exactly; the mean curve averages step by step."""
    alpha, beta = 0.3, 0.25
    curves = []
    for gold0, scale in ((0.4, 1.0), (0.5, 1.1), (0.6, 0.9)):  # seeds drift to different d at each step
        ds = [0.0] + [scale * 0.5 * k for k in range(1, 7)]
        curves.append([{"step": 10 * k, "d": d, "kl": d * d, "learned": d,
                        "gold": gold0 + plots.gao_rl(torch.tensor([d]), alpha, beta).item()} for k, d in enumerate(ds)])
    out = plots.gao_fit(curves)
    assert out["alpha"] == pytest.approx(alpha, abs=1e-6) and out["beta"] == pytest.approx(beta, abs=1e-6)
    assert out["gold0"] == pytest.approx(0.5) and out["num_runs"] == 3
    assert out["curve"][2]["d"] == pytest.approx((1.0 + 1.1 + 0.9) / 3)
    # A fit that used each point's gain over the pooled mean start instead would be off:
    wrong = plots.gao_rl_fit(torch.tensor([p["d"] for c in curves for p in c]),
                             torch.tensor([p["gold"] - 0.5 for c in curves for p in c]))
    assert abs(wrong[0] - alpha) > 1e-3


def test_seeds_pools_gao_curves(tmp_path):
    """plots.py seeds finds gao.json beside each seed's report and writes the pooled fit next to the mean table."""
    reports = []
    for seed, gold0 in enumerate((0.45, 0.55)):
        d_ = tmp_path / f"seed{seed}" / "ablate_kl"
        d_.mkdir(parents=True)
        rep = {"policies": {"beta=0": {"gold_reward": gold0 + 0.1, "learned_reward": 1.0, "kl_to_reference": 4.0}}}
        (d_ / "report.json").write_text(json.dumps(rep))
        curve = [{"step": 10 * k, "d": 0.5 * k, "kl": 0.25 * k * k, "learned": k,
                  "gold": gold0 + plots.gao_rl(torch.tensor([0.5 * k]), 0.3, 0.25).item()} for k in range(6)]
        (d_ / "gao.json").write_text(json.dumps({"beta=0": {"curve": curve}}))
        reports.append(str(d_ / "report.json"))
    plots.main(["seeds", f"--reports={','.join(reports)}", f"--out={tmp_path / 'seeds'}"])
    pooled = json.loads((tmp_path / "seeds" / "gao.json").read_text())["beta=0"]
    assert pooled["alpha"] == pytest.approx(0.3, abs=1e-6) and pooled["beta"] == pytest.approx(0.25, abs=1e-6)
    assert (tmp_path / "seeds" / "gao.png").stat().st_size > 1000


def test_write_gao_names_a_peak_beyond_the_data(tmp_path):
    """A near-zero fitted beta puts d* = exp(alpha / beta - 1) astronomically far (a real 3-seed run gave 1e30):
    the table says it lies beyond the measured d instead of printing it as a peak; one inside the data prints."""
    curve = [{"step": 10 * k, "d": 0.5 * k, "kl": 0.25 * k * k, "learned": 0.5 * k, "gold": 0.5 + 0.1 * k}
             for k in range(5)]  # measured d up to 2.0
    base = {"curve": curve, "gold0": 0.5, "rmse": 0.01, "measured_peak": {"d": 2.0, "gold": 0.9, "step": 40}}
    analysis = {"far": {**base, "alpha": 0.164, "beta": 0.002, "peak": plots.gao_peak(0.164, 0.002)},
                "near": {**base, "alpha": 0.3, "beta": 0.25, "peak": plots.gao_peak(0.3, 0.25)}}
    plots.write_gao(analysis, str(tmp_path))
    md = (tmp_path / "gao.md").read_text()
    far = next(line for line in md.splitlines() if line.startswith("| far |"))
    near = next(line for line in md.splitlines() if line.startswith("| near |"))
    assert "beyond the data (d* = " in far and "> 2.00)" in far
    assert "| 1.22 | 0.805 |" in near  # d* = exp(0.2), gold0 + beta d* = 0.5 + 0.305
