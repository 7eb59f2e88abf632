"""One PPO update with the "trl" preset on a tiny random Qwen2 (RoPE, RMSNorm, SwiGLU, GQA 4/2, q/k/v bias)
matches TRL's real PPOTrainer on the same weights, as tests/test_parity_trl.py does for GPT-2: the same
harness (tests/trl_harness.py, family="qwen2"), the same tolerances and overrides, imported from there.
TRL runs HF's Qwen2ForCausalLM / Qwen2ForSequenceClassification; ours runs model.py's Llama-family path.
"""

import pytest

pytest.importorskip("transformers", reason="transformers is needed for the HF Qwen2 models TRL trains")
pytest.importorskip("trl.experimental.ppo", reason="trl.experimental.ppo (trl >= 0.24) holds PPOTrainer")
pytest.importorskip("datasets", reason="TRL's PPOTrainer takes a datasets.Dataset")
pytest.importorskip("tokenizers", reason="the tiny word-level tokenizer is built with tokenizers")

import torch  # noqa: E402

import test_parity_trl as P  # noqa: E402  (its helpers and tolerances; a module attribute is not re-collected)
import trl_harness as H  # noqa: E402


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory):
    dirs = H.save_initial_models(str(tmp_path_factory.mktemp("qwen2_models")), family="qwen2")
    trl = H.run_trl(dirs, str(tmp_path_factory.mktemp("qwen2_trl")), "2minibatches", adam_epsilon=P.ADAM_EPS)
    cfg = H.our_config("2minibatches", **P.TRL_OVERRIDES, adam_eps=P.ADAM_EPS)
    return dirs, trl, H.run_ours(dirs, trl, cfg)


def test_qwen2_rollout_matches_trl(qwen2_run):
    _, trl, ours = qwen2_run
    exp, r = ours["exp"], trl["rollout"]
    assert torch.equal(exp["action_mask"], ~r["padding_mask"])
    a = exp["action_mask"]
    P.close(exp["scores"], r["scores"], "scores", **P.ROLLOUT_TOL)
    P.close(exp["recomputed_logp"], r["logprobs"] * a, "recomputed log-probs", **P.ROLLOUT_TOL)
    P.close(exp["ref_logp"], r["ref_logprobs"] * a, "reference log-probs", **P.ROLLOUT_TOL)
    P.close(exp["values"], r["values"], "values", **P.ROLLOUT_TOL)
    P.close(exp["rewards"], r["rewards"], "per-token rewards", **P.ROLLOUT_TOL)
    P.close(exp["advantages"], trl["advantages"], "whitened advantages", **P.ROLLOUT_TOL)
    assert r["non_score_reward"].abs().max() > 1e-3 and r["scores"].abs().max() > 1e-2  # not vacuous


def test_qwen2_update_matches_trl(qwen2_run):
    dirs, trl, ours = qwen2_run
    assert len(trl["steps"]) == len(ours["steps"]) == 4
    for i, (t, o) in enumerate(zip(trl["steps"], ours["steps"])):
        P.close(o["pg_loss"], t["pg_loss"], f"step {i} policy loss", **P.LOSS_TOL)
        P.close(o["vf_loss"], t["vf_loss"], f"step {i} value loss", **P.LOSS_TOL)
    P.assert_weights_match(trl["policy_state"], ours["policy_state"], "policy")
    P.assert_weights_match(trl["value_state"], ours["critic_state"], "critic")
    from transformers import AutoModelForCausalLM
    init = AutoModelForCausalLM.from_pretrained(dirs["policy"]).state_dict()
    moved = max((trl["policy_state"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 100 * P.WEIGHT_ATOL  # the update is visible
