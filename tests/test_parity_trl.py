"""End-to-end parity with TRL's real `PPOTrainer` (trl 1.12.0, `trl/experimental/ppo/ppo_trainer.py`).

From identical initial weights (tiny random HF GPT-2s saved with `save_pretrained`, loaded into our `GPT`),
one PPO update on the same prompts, the same "sampled" responses (TRL's `batch_generation` is patched to
return them) and the same reward-model scores must give the same per-token rewards, values, advantages,
returns, per-step policy and value losses and updated policy and critic weights as TRL, with the `trl`
preset (`ppo.PRESETS["trl"]`). What is patched in TRL, and the setup conventions (pad id distinct from EOS,
T + 1e-7, sampling log-probs, the head bias), are in tests/trl_harness.py.

Two update layouts: 2 PPO epochs x 1 minibatch of 4, and 2 epochs x 2 minibatches of 2 (4 optimizer steps;
our update replays TRL's `np.random.permutation` so both visit the same minibatches). The second epoch runs
on moved weights, so ratios != 1 and both clip branches (policy and value) are exercised.

Tolerances (float32 on CPU), with the largest differences observed:
- rollout tensors (scores, log-probs, values, per-token rewards, returns, whitened advantages): atol 2e-6,
  rtol 1e-5. Observed: reference log-probs 9.5e-7 (|logp| up to ~10), advantages 3.7e-7, values and
  returns 2.1e-7, scores and rewards 9e-8. The one systematic difference is TRL's logits / (T + 1e-7) vs
  our / T (~1.4e-7 relative); whitening divides by the advantages' std, which amplifies it a little.
- per-step policy and value losses and clip fractions: atol 1e-6, rtol 1e-5 (observed <= 1e-7).
- weights after the update: atol 1e-5 absolute, i.e. 1% of one AdamW step (lr = 1e-3 here; each weight
  moves by ~lr per step, up to 4e-3 in all); observed <= 2.5e-6. Not tighter because Adam divides each
  gradient entry by its own RMS: where an entry's true gradient is ~0 (e.g. the attention key bias, which
  softmax ignores), float32 rounding in the gradient (~1e-9) becomes a step difference of up to
  lr * 1e-9 / eps. (With TRL's default eps 1e-8 that reaches 2e-4 on the key bias: another reason the
  test sets both sides to 1e-5.)

The overrides the main test applies on top of the preset (each a discrepancy of the preset, with its own
strict-xfail test below): TRL's update never clips gradients, keeps the lr constant within an update, and
its optimizer has no weight on a value-head bias. TRL's AdamW epsilon is set to our preset's 1e-5 (its
default, HF's 1e-8, also differs from the preset: xfail test below).

At the end: OpenRLHF's PolicyLoss, ValueLoss and compute_approx_kl against ours, skipped unless openrlhf is
installed (see the comment there for why only those, and why not verl).
"""

import pytest

pytest.importorskip("transformers", reason="transformers is needed for the HF GPT-2 models TRL trains")
pytest.importorskip("trl", reason="trl (requirements-dev.txt) is needed for parity with TRL's PPOTrainer")
pytest.importorskip("trl.experimental.ppo", reason="trl.experimental.ppo (trl >= 0.24) holds PPOTrainer")
pytest.importorskip("datasets", reason="TRL's PPOTrainer takes a datasets.Dataset")
pytest.importorskip("tokenizers", reason="the tiny word-level tokenizer is built with tokenizers")

import torch  # noqa: E402

import trl_harness as H  # noqa: E402

ROLLOUT_TOL = dict(atol=2e-6, rtol=1e-5)
LOSS_TOL = dict(atol=1e-6, rtol=1e-5)
WEIGHT_ATOL = 1e-5
ADAM_EPS = 1e-5  # our preset's (N+) value; TRL is configured with it (adam_epsilon is a TrainingArguments knob)

# What TRL's PPOTrainer does that the "trl" preset does not set (see the xfail tests for each):
TRL_OVERRIDES = dict(
    grad_clip=0.0,  # PPOTrainer.train() calls optimizer.step() with no clip_grad_norm_ (max_grad_norm unused)
    lr_schedule="constant",  # TRL steps its linear scheduler once per update; within update 1 lr is constant
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return H.save_initial_models(str(tmp_path_factory.mktemp("trl_parity_models")))


@pytest.fixture(scope="module")
def trl_run(dirs, tmp_path_factory):
    """TRL runs, cached per (layout, adam_epsilon): each costs a few seconds."""
    cache = {}

    def get(layout, adam_epsilon=ADAM_EPS):
        if (layout, adam_epsilon) not in cache:
            out = str(tmp_path_factory.mktemp(f"trl_out_{layout}"))
            cache[layout, adam_epsilon] = H.run_trl(dirs, out, layout, adam_epsilon=adam_epsilon)
        return cache[layout, adam_epsilon]
    return get


def close(actual, expected, what, **tol):
    torch.testing.assert_close(actual.float(), expected.float(), msg=lambda m: f"{what}: {m}", **tol)


def assert_weights_match(trl_state, our_state, what, atol=WEIGHT_ATOL):
    """Our HF-named state (model.to_hf_state_dict) against TRL's model's, key for key."""
    ours = {k: v for k, v in our_state.items() if k != "score.bias"}
    theirs = {k: v for k, v in trl_state.items() if k != "lm_head.weight"}  # tied to wte in both
    assert set(ours) == set(theirs), f"{what}: keys differ: {set(ours) ^ set(theirs)}"
    worst = max(((ours[k] - theirs[k]).abs().max().item(), k) for k in ours)
    assert worst[0] <= atol, f"{what}: max |ours - TRL| = {worst[0]:.3g} in {worst[1]} (atol {atol})"


@pytest.mark.parametrize("layout", list(H.LAYOUTS))
def test_rollout_matches_trl(layout, dirs, trl_run):
    """Steps 2-4: masks, scores (missing-EOS penalty), log-probs, values, per-token rewards, returns and
    whitened advantages, on every position of the (B, N) tensors (padding included: both sides zero it)."""
    trl = trl_run(layout)
    cfg = H.our_config(layout, **TRL_OVERRIDES, adam_eps=ADAM_EPS)
    exp = H.run_ours(dirs, trl, cfg)["exp"]
    r = trl["rollout"]
    assert trl["gen_calls"] == 1 and abs(trl["gen_temperature"] - (H.TEMPERATURE + 1e-7)) < 1e-12
    # The fixture covers: EOS mid-way, no EOS (penalized), EOS first, EOS on the last slot.
    assert r["contain_eos_token"].tolist() == [H.EOS in H.RESPONSES[H.PROMPTS.index(
        [t for t in q.tolist() if t != H.PAD])] for q in r["queries"]]
    assert not r["contain_eos_token"].all() and r["contain_eos_token"].any()
    assert torch.equal(exp["action_mask"], ~r["padding_mask"])  # TRL: tokens up to and with EOS
    assert torch.equal(exp["value_mask"], ~r["padding_mask_p1"])  # ... and one more for the critic
    assert torch.equal(exp["ended"], r["contain_eos_token"])
    a = exp["action_mask"]
    close(exp["scores"], r["scores"], "scores", **ROLLOUT_TOL)
    close(exp["logp"], r["logprobs"] * a, "sampling log-probs (TRL's 1.0 filler zeroed)", **ROLLOUT_TOL)
    close(exp["recomputed_logp"], r["logprobs"] * a, "recomputed log-probs", **ROLLOUT_TOL)
    close(exp["ref_logp"], r["ref_logprobs"] * a, "reference log-probs", **ROLLOUT_TOL)
    close(exp["values"], r["values"], "values", **ROLLOUT_TOL)
    close(exp["non_score_reward"], r["non_score_reward"], "-beta * KL", **ROLLOUT_TOL)
    close(exp["rewards"], r["rewards"], "per-token rewards", **ROLLOUT_TOL)
    close(exp["returns"], r["returns"], "returns", **ROLLOUT_TOL)
    close(exp["advantages"], trl["advantages"], "whitened advantages", **ROLLOUT_TOL)
    # Not vacuous: the KL term and the penalty are present, and the score sits after EOS (or clamped).
    assert r["non_score_reward"].abs().max() > 1e-3
    assert (r["scores"] < -0.5).any()


@pytest.mark.parametrize("layout", list(H.LAYOUTS))
def test_update_matches_trl(layout, dirs, trl_run):
    """Step 5: every optimizer step's policy and value loss and clip fractions, TRL's logged averages, and
    the policy and critic weights after the update."""
    trl = trl_run(layout)
    cfg = H.our_config(layout, **TRL_OVERRIDES, adam_eps=ADAM_EPS)
    ours = H.run_ours(dirs, trl, cfg)
    epochs, num_mb = H.LAYOUTS[layout]
    assert len(trl["steps"]) == len(ours["steps"]) == epochs * num_mb
    for i, (t, o) in enumerate(zip(trl["steps"], ours["steps"])):
        close(o["pg_loss"], t["pg_loss"], f"step {i} policy loss", **LOSS_TOL)
        close(o["vf_loss"], t["vf_loss"], f"step {i} value loss", **LOSS_TOL)
        # A clip fraction counts tokens: a value within float32 rounding of the clip boundary (the two sides sum
        # in different orders; BLAS threading changes it) may land on either side, so one token may differ.
        close(o["vf_clipfrac"], t["vf_clipfrac"], f"step {i} value clipfrac", atol=1 / o["vf_tokens"] + 1e-6, rtol=0)
    m, s = trl["metrics"][0], ours["stats"]
    for trl_key, our_key in [("loss/policy_avg", "pg_loss"), ("loss/value_avg", "vf_loss"),
                             ("policy/clipfrac_avg", "clipfrac"), ("val/clipfrac_avg", "vf_clipfrac")]:
        # the logged average of the per-step clip fractions: one token of one step may differ (see above)
        tol = dict(atol=sum(1 / o["vf_tokens"] for o in ours["steps"]) / len(ours["steps"]) + 1e-6, rtol=0) \
            if "clipfrac" in trl_key else LOSS_TOL
        close(s[our_key], torch.tensor(m[trl_key]), trl_key, **tol)
    # Not vacuous: later steps clip (policy and value), and TRL's gradient norm exceeds 1 (so the
    # grad-clip xfail below is a real difference), and TRL's lr stayed at its base value in this update.
    assert m["policy/clipfrac_avg"] > 0 and m["val/clipfrac_avg"] > 0
    assert max(t["grad_norm"] for t in trl["steps"]) > 1.0
    assert m["lr"] == pytest.approx(H.LR)
    assert trl["adam"] == {"betas": (0.9, 0.999), "eps": ADAM_EPS, "weight_decay": 0.0}  # as ppo.main's AdamW

    assert_weights_match(trl["policy_state"], ours["policy_state"], "policy")
    assert_weights_match(trl["value_state"], ours["critic_state"], "critic")
    assert ours["critic_state"]["score.bias"].abs().max() == 0  # frozen at 0, as TRL's bias-free head
    # The update is visible: weights moved by ~lr per step, three orders above the tolerance.
    from transformers import GPT2LMHeadModel
    init = GPT2LMHeadModel.from_pretrained(dirs["policy"]).state_dict()
    moved = max((trl["policy_state"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 100 * WEIGHT_ATOL


# -----------------------------------------------------------------------------
# Discrepancies this file found against TRL. Fixed ones are plain tests now (grad clipping, lr annealed per
# update, AdamW epsilon in the preset, zero bias for HF score heads); strict xfails are the ones left.


def test_trl_preset_grad_clip(dirs, trl_run):
    trl = trl_run("1minibatch")
    overrides = {k: v for k, v in TRL_OVERRIDES.items() if k != "grad_clip"}
    ours = H.run_ours(dirs, trl, H.our_config("1minibatch", **overrides, adam_eps=ADAM_EPS))
    assert_weights_match(trl["policy_state"], ours["policy_state"], "policy")


def test_trl_preset_lr_schedule(dirs, trl_run):
    trl = trl_run("1minibatch")
    overrides = {k: v for k, v in TRL_OVERRIDES.items() if k != "lr_schedule"}
    ours = H.run_ours(dirs, trl, H.our_config("1minibatch", **overrides, adam_eps=ADAM_EPS))
    assert_weights_match(trl["policy_state"], ours["policy_state"], "policy")


def test_trl_preset_adam_eps():
    from trl.experimental.ppo import PPOConfig
    import ppo
    ours = ppo.Config(**ppo.PRESETS["trl"]).adam_eps
    assert ours == PPOConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False).adam_epsilon


@pytest.mark.xfail(strict=True, reason=(
    "our scalar head is nn.Linear(n_embd, 1) with a trainable bias; HF GPT2ForSequenceClassification's "
    "(TRL's value model) has none, so from the 2nd optimizer step our values shift by ~lr. No knob to "
    "drop it; fix: GPTConfig.score_bias=False for HF-loaded heads / the trl preset"))
def test_critic_score_bias_trainable(dirs, trl_run):
    trl = trl_run("1minibatch")
    cfg = H.our_config("1minibatch", **TRL_OVERRIDES, adam_eps=ADAM_EPS)
    ours = H.run_ours(dirs, trl, cfg, freeze_critic_bias=False)
    for i, (t, o) in enumerate(zip(trl["steps"], ours["steps"])):
        close(o["vf_loss"], t["vf_loss"], f"step {i} value loss", **LOSS_TOL)
    assert_weights_match(trl["value_state"], ours["critic_state"], "critic")


def test_hf_score_head_loads_with_zero_bias(dirs):
    from transformers import GPT2ForSequenceClassification
    from model import GPT
    hf = GPT2ForSequenceClassification.from_pretrained(dirs["reward"], attn_implementation="eager").eval()
    ours = GPT.from_pretrained(dirs["reward"], scalar_head=True).eval()
    ids = torch.tensor([H.PROMPTS[1] + H.RESPONSES[0][:3]])
    with torch.no_grad():
        expected = hf.score(hf.transformer(ids).last_hidden_state).squeeze(-1)
        close(ours(ids, head="score"), expected, "per-position scores", atol=1e-5, rtol=1e-5)


@pytest.mark.xfail(strict=True, reason=(
    "logged-metric definitions: TRL averages policy/approxkl_avg, val/ratio and policy/entropy_avg over all "
    "N response slots, padding included (pad slots count approxkl 0, ratio 1, and the entropy of pad logits); "
    "ppo_update averages over the action mask. Training is unaffected; curves overlay only without padding"))
def test_logged_metric_definitions(dirs, trl_run):
    trl = trl_run("1minibatch")
    ours = H.run_ours(dirs, trl, H.our_config("1minibatch", **TRL_OVERRIDES, adam_eps=ADAM_EPS))
    m, s = trl["metrics"][0], ours["stats"]
    for trl_key, our_key in [("policy/approxkl_avg", "approxkl"), ("val/ratio", "ratio"),
                             ("policy/entropy_avg", "entropy")]:
        close(s[our_key], torch.tensor(m[trl_key]), trl_key, **LOSS_TOL)


# -----------------------------------------------------------------------------
# OpenRLHF's loss functions (openrlhf/models/loss.py, models/utils.py; 0.11.2), loaded by path as
# tests/framework_code.py loads them for the other OpenRLHF parity tests (its GAE: tests/test_parity_openrlhf.py).


@pytest.fixture(scope="module")
def openrlhf():
    from framework_code import load_openrlhf_experience_maker
    return load_openrlhf_experience_maker()  # .loss, .utils; fails instead of skipping under RLHF_REQUIRE_PARITY


def _random_batch(seed=0, B=4, N=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, N, generator=g) * 3
    old = logp + 0.3 * torch.randn(B, N, generator=g)  # ratios well outside [0.8, 1.2] too
    adv = torch.randn(B, N, generator=g)
    mask = torch.arange(N)[None, :] < torch.tensor([7, 3, 1, 5])[:, None]
    return logp, old, adv, mask


@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_policy_loss_matches_openrlhf(openrlhf, dual_clip):
    import ppo
    logp, old, adv, mask = _random_batch()
    ours, stats = ppo.policy_loss(logp, old, adv, mask, cliprange=0.2, dual_clip=dual_clip)
    theirs, clip_ratio, *_ = openrlhf.loss.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.2,
                                                      dual_clip=dual_clip or None)(logp, old, adv, mask.float())
    close(ours, theirs, "policy loss", atol=1e-6, rtol=1e-6)
    close(stats["clipfrac"], clip_ratio, "clip fraction", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("clip", [0.2, 0.5, 0.0])
def test_value_loss_matches_openrlhf(openrlhf, clip):
    import ppo
    values, old, returns, mask = _random_batch(1)
    ours, _ = ppo.value_loss(values, old, returns, mask, cliprange_value=clip)
    theirs = openrlhf.loss.ValueLoss(clip_eps=clip or None)(values, old, returns, mask.float())
    close(ours, theirs, "value loss", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_matches_openrlhf(openrlhf, estimator):
    import ppo
    logp, ref, _, _ = _random_batch(2)
    ref = ref * 5  # some |log ratio| large enough for the +-10 clamp (OpenRLHF always clamps at 10)
    ours = ppo.kl_penalty(logp, ref, estimator, clamp=10.0)
    theirs = openrlhf.utils.compute_approx_kl(logp, ref, kl_estimator=estimator)
    close(ours, theirs, f"{estimator} KL", atol=1e-6, rtol=1e-6)
