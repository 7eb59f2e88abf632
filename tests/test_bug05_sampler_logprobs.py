"""Bug class 5: the sampler's log-probs differ from the trainer's (REFERENCES 5.2a row 5).

TRL #4159: at T = 0.6 the first-token IS ratio was 2.0, because the recorded log-probs were of the raw
logits (fixed by PR #4163). TRL #6789 / PR #7269: at top_p = 0.8 the ratio's mean was 0.896, the kept
mass, until the trainer renormalized over the same top-p set. prime-rl PR #697: temperature must scale the
logits, not the log-probs. Here:
- `generate(top_k, top_p)` truncates like HF transformers' warpers (checked against them);
- the recorded log-probs equal a full recompute with the same T, top-k and top-p, for each setting;
- a recompute over the full vocabulary is refused loudly by ppo.py when truncation is on;
- TIS (`ppo.truncated_is_weight`, `--tis_cap`) matches verl's token-level weights and weights the loss.
"""

import pytest
import torch

import data
import ppo
from framework_code import load_verl
from model import GPT, config_for, generate, sample_inverse_cdf, sampling_logits, token_logprobs
from runtime import Dist

SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8), (0.7, 0, 0.8),
            (0.7, 5, 0.8)]  # (temperature, top_k, top_p)


def test_sampling_logits_match_hf_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g) * 3
    logits[0, :4] = 5.0  # ties at the top-k boundary (HF keeps every token tied with the k-th)
    for T, k, p in SETTINGS + [(1.3, 1, 0.5), (1.0, 39, 0.99), (1.0, 0, 0.05)]:
        theirs = TemperatureLogitsWarper(T)(None, logits.clone())
        if k:
            theirs = TopKLogitsWarper(k)(None, theirs)
        if p < 1:
            theirs = TopPLogitsWarper(p)(None, theirs)
        ours = sampling_logits(logits, T, k, p)
        rows = slice(None) if p == 1 else slice(1, None)  # which of several tied tokens top-p cuts is arbitrary
        ours, theirs = ours[rows], theirs[rows]
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), (T, k, p)
        assert torch.allclose(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)], atol=1e-6), (T, k, p)


def test_truncated_sampler_draws_the_renormalized_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    target = torch.softmax(sampling_logits(logits, 0.7, 4, 0.9), -1)[0]  # top-4, then 0.9 of the mass
    assert (target == 0).sum() >= 2
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(sampling_logits(logits.expand(40000, -1), 0.7, 4, 0.9), -1)
    counts = torch.bincount(sample_inverse_cdf(probs, g), minlength=6).float() / 40000
    assert torch.all(counts[target == 0] == 0)
    assert (counts - target).abs().max() < 0.01, (counts, target)


def test_sampler_never_returns_a_removed_token_when_the_row_sums_short_of_one():
    """The float32 cumsum of a truncated row can end below 1; a draw above it must not land on a removed
    (zero-probability) token at the end of the vocabulary. A row summing to 0.5 makes that certain."""
    probs = torch.tensor([[0.25, 0.25, 0.0, 0.0]]).expand(2000, -1)
    tokens = sample_inverse_cdf(probs, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}


def _tiny_policy(seed=3, vocab=64):
    model = GPT(config_for("tiny", vocab_size=vocab)).eval()
    model.init_weights(seed=seed)
    with torch.no_grad():  # sharper than the N(0, 0.02) init, so top-p keeps a few tokens, not most
        model.transformer.wte.weight.mul_(5)
    return model


def _generate_and_recompute(model, T, k, p, seed=0, B=6, P=5, N=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded prompt
    seq, recorded = generate(model, ids, mask, N, temperature=T, eos_id=0, pad_id=0, generator=g, top_k=k, top_p=p)
    response = seq[:, P:]
    valid = torch.ones_like(response, dtype=torch.bool)
    for i in range(B):  # up to and including the first EOS
        stops = (response[i] == 0).nonzero()
        if len(stops):
            valid[i, stops[0, 0] + 1:] = False
    full_mask = torch.cat([mask, valid.long()], 1)
    with torch.no_grad():
        logits = model(seq, attention_mask=full_mask)[:, P - 1:-1]
    return logits, response, recorded, valid


@pytest.mark.parametrize("T,k,p", SETTINGS)
def test_recorded_logprobs_are_of_the_sampled_distribution(T, k, p):
    model = _tiny_policy()
    logits, response, recorded, valid = _generate_and_recompute(model, T, k, p)
    recomputed = token_logprobs(logits, response, T, k, p)
    diff = ((recomputed - recorded) * valid).abs().max().item()
    assert diff < 1e-5, f"T={T} top_k={k} top_p={p}: recorded vs recomputed log-probs differ by {diff:.3g}"
    ppo.check_truncated_recompute(recorded, recomputed, valid)  # the correct recompute passes the check
    if k or p < 1:
        full = token_logprobs(logits, response, T)  # the bug: trainer renormalizes over the whole vocabulary
        ratio = torch.exp(full - recorded)[valid]
        assert ratio.mean() < 0.95, f"truncation must change the full-vocabulary ratio (mean {ratio.mean():.3f})"
        with pytest.raises(RuntimeError, match="full vocabulary"):
            ppo.check_truncated_recompute(recorded, full, valid)
    if T != 1.0:
        raw = token_logprobs(logits, response, 1.0, k, p)  # TRL #4159: log-probs of the raw logits
        assert ((raw - recorded) * valid).abs().max() > 1e-2


def test_sampled_tokens_outside_recomputed_support_fail_loudly():
    recorded = torch.tensor([[-0.5, -1.0]])
    with pytest.raises(RuntimeError, match="outside the recomputed"):
        ppo.check_truncated_recompute(recorded, torch.tensor([[-0.5, float("-inf")]]), torch.ones(1, 2, dtype=torch.bool))


# ---- ppo.py end to end: --top_k/--top_p reach rollout, recompute and update


def _ppo_first_update(checkpoints, monkeypatch=None, **overrides):
    cfg = ppo.Config(sft=str(checkpoints / "sft"), reward_model=str(checkpoints / "rm"), response_length=8,
                     temperature=0.7, num_ppo_epochs=1, rollout_batch_size=6, micro_batch_size=6, **overrides)
    ppo.validate(cfg)
    d = Dist()
    policy, ref, rm, critic = ppo.build_models(cfg, d)
    trainable = torch.nn.ModuleDict({"policy": policy, "critic": critic})
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-3)
    tok = data.get_tokenizer("char")
    ids, mask = data.pad_left([tok.encode(s) for s in ["ab=", "cdefgh=", "p=", "abcdefgh=", "mno=", "ij="]], tok.eos_id)
    qr, logp = generate(policy, ids, mask, cfg.response_length, temperature=cfg.temperature, eos_id=tok.eos_id,
                        pad_id=tok.eos_id, generator=torch.Generator().manual_seed(1), top_k=cfg.top_k, top_p=cfg.top_p)
    exp = ppo.make_experience(policy, critic, ref, rm, qr, mask, logp, cfg.kl_coef, tok, cfg, d)
    stats = ppo.ppo_update(policy, critic, trainable, optimizer, [1e-3, 1e-3], exp, 0, 10, cfg, d)
    return exp, stats


@pytest.mark.parametrize("old_logprobs", ["sampling", "recompute"])
def test_ppo_first_ratio_is_one_with_top_k_top_p(checkpoints, old_logprobs):
    exp, stats = _ppo_first_update(checkpoints, top_k=5, top_p=0.9, old_logprobs=old_logprobs)
    assert abs(stats["first_ratio"].item() - 1) < 1e-5, stats["first_ratio"]
    assert exp["mismatch_kl"].abs() < 1e-6


def test_ppo_refuses_a_full_vocabulary_recompute(checkpoints, monkeypatch):
    """Break the recompute on purpose (token_logprobs ignoring top_k/top_p): make_experience must refuse."""
    full_vocab = lambda logits, tokens, temperature=1.0, top_k=0, top_p=1.0: token_logprobs(logits, tokens, temperature)  # noqa: E731
    monkeypatch.setattr(ppo, "token_logprobs", full_vocab)
    with pytest.raises(RuntimeError, match="full vocabulary"):
        _ppo_first_update(checkpoints, top_k=5, old_logprobs="recompute")


def test_flag_validation():
    for bad in (dict(top_p=0.0), dict(top_k=-1), dict(tis_cap=2.0), dict(top_k=5, divide_logits_by_temperature=False)):
        with pytest.raises(SystemExit):
            ppo.validate(ppo.Config(**bad))
    ppo.validate(ppo.Config(tis_cap=2.0, old_logprobs="recompute", top_k=5, top_p=0.9))


# ---- TIS


def test_tis_weight_hand_values_and_verl():
    old = torch.log(torch.tensor([[0.3, 0.5, 0.9, 0.2]]))
    sample = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.4]]))  # ratios 3, 1, 3, 0.5
    w = ppo.truncated_is_weight(old, sample, 2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0, 2.0, 0.5]]), atol=1e-6)
    verl = load_verl()
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights
    g = torch.Generator().manual_seed(0)
    old, sample = -torch.rand(5, 9, generator=g) * 3, -torch.rand(5, 9, generator=g) * 3
    mask = torch.rand(5, 9, generator=g) > 0.2
    theirs, _ = compute_rollout_correction_weights(old - sample, mask.float(), rollout_is="token", rollout_is_threshold=2.0)
    assert verl is not None and torch.allclose(ppo.truncated_is_weight(old, sample, 2.0) * mask, theirs, atol=1e-6)


def test_tis_weights_each_tokens_policy_loss():
    """Scaling A by the (positive) weight, as ppo_update does, equals weighting each token's clipped loss."""
    g = torch.Generator().manual_seed(1)
    new, old = -torch.rand(3, 6, generator=g), -torch.rand(3, 6, generator=g)
    adv, mask = torch.randn(3, 6, generator=g), torch.rand(3, 6, generator=g) > 0.2
    w = ppo.truncated_is_weight(old, old + 0.5 * torch.randn(3, 6, generator=g), 2.0)
    ratio = torch.exp(new - old)
    per_token = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    expected = (w * per_token * mask).sum() / mask.sum()
    loss, _ = ppo.policy_loss(new, old, adv * w, mask, 0.2)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_ppo_applies_tis_only_with_recompute(checkpoints, monkeypatch):
    """Make the sampling log-probs differ from the recompute (as bf16 would): the weights become
    min(exp(recomputed - sampling), cap), the policy loss changes, and the mismatch KL is logged > 0."""
    real_generate, recorded = generate, {}

    def shifted(*args, **kwargs):  # lower each sampling log-prob by 0 to 1 nats
        seq, logp = real_generate(*args, **kwargs)
        recorded["logp"] = logp - torch.rand(logp.shape, generator=torch.Generator().manual_seed(0)) * (logp != 0)
        return seq, recorded["logp"]
    monkeypatch.setattr(__import__(__name__), "generate", shifted)
    exp_tis, stats_tis = _ppo_first_update(checkpoints, old_logprobs="recompute", tis_cap=2.0)
    exp_off, stats_off = _ppo_first_update(checkpoints, old_logprobs="recompute")
    m = exp_tis["action_mask"]
    expected = torch.exp(exp_tis["recomputed_logp"] - recorded["logp"]).clamp(max=2.0)
    assert torch.allclose(exp_tis["tis_weight"][m], expected[m], atol=1e-5)
    assert (expected[m] == 2.0).any() and (expected[m] < 2.0).any()
    assert torch.all(exp_off["tis_weight"][m] == 1)
    assert exp_tis["mismatch_kl"] > 1e-2
    assert abs(stats_tis["pg_loss"] - stats_off["pg_loss"]) > 1e-3, (stats_tis["pg_loss"], stats_off["pg_loss"])
