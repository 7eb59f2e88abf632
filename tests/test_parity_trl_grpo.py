"""End-to-end parity with TRL 1.12's real `GRPOTrainer` and `RLOOTrainer` (trl/trainer/grpo_trainer.py,
rloo_trainer.py): one update from the same tiny random HF GPT-2, on the same fixed completions with fixed
rewards, must give the same advantages, the same loss of each micro-batch and the same weights.

Setup (the models and the word-level tokenizer are tests/trl_harness.py's): 2 prompts x 4 generations = 8
completions of different lengths (EOS early, late, never), one optimizer step accumulated over 2 micro-batches of
4 (TRL: per_device_train_batch_size 4, gradient_accumulation_steps 2 = steps_per_generation), so the loss types
that normalize per micro-batch (bnpo) and over the whole batch (dapo) differ. TRL's reference model is loaded
with different weights than the policy, so the KL term has a gradient. Prompts have equal lengths: TRL's GRPO
forward passes no position_ids, so left padding would shift GPT-2's absolute positions (TRL #469, #6800).

What is patched in TRL, nothing of its math: `_generate_single_turn` returns the fixed completions (truncated
after EOS, as TRL's own generate path does); `shuffle_sequence_dict` is the identity (TRL shuffles the generation
batch before splitting it into micro-batches; ours is not shuffled either: torch.randperm is the identity here);
`_compute_loss` is wrapped to record its inputs and the loss it returns. Rewards come from a reward function that
looks the completion up in a table; ours from `ppo.reward_scores` patched to the same table.

Tolerances as tests/test_parity_trl.py: 1e-6 for advantages and losses, 1e-5 for weights (AdamW eps 1e-5 on both
sides; see that file for why not TRL's 1e-8).
"""

import os
import types

import pytest

pytest.importorskip("trl", reason="trl==1.12.0 (requirements-dev.txt) is needed for parity with GRPOTrainer")
pytest.importorskip("datasets", reason="TRL's trainers take a datasets.Dataset")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import ppo  # noqa: E402
import trl_harness as H  # noqa: E402
from model import GPT, to_hf_state_dict  # noqa: E402
from runtime import Dist  # noqa: E402

EOS, PAD = H.EOS, H.PAD
PROMPTS = [[3, 7, 1], [5, 9, 2]]
G = 4
L = 6  # max_completion_length = our response_length
COMPLETIONS = [  # per prompt, G completions (lists end at EOS, as TRL's generate path truncates them)
    [[4, 9, EOS], [1, 2, 3, 4, 5, 6], [EOS], [7, 8, 9, 10, 11, EOS]],
    [[6, EOS], [2, 2, EOS], [11, 12, 13, 14, 15, 16], [3, 4, EOS]],
]  # 16 and 14 tokens: the two micro-batches differ in size, so bnpo and dapo differ
REWARDS = [[0.7, -0.2, 0.35, 1.3], [0.1, 0.9, -1.1, 0.35]]
LR, ADAM_EPS = 1e-3, 1e-5
TOL = dict(atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return H.save_initial_models(str(tmp_path_factory.mktemp("trl_grpo_models")))


def reward_table():
    return {tuple(c): r for cs, rs in zip(COMPLETIONS, REWARDS) for c, r in zip(cs, rs)}


def run_trl(dirs, workdir, trainer_name, **config):
    """One optimizer step of TRL's GRPOTrainer or RLOOTrainer. Returns the recorded micro-batch inputs and losses
    and the policy's weights after the step."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from transformers import GPT2LMHeadModel
    import trl.trainer.grpo_trainer as grpo_module
    import trl.trainer.rloo_trainer as rloo_module
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    module, Trainer, Config = ((grpo_module, GRPOTrainer, GRPOConfig) if trainer_name == "grpo"
                               else (rloo_module, RLOOTrainer, RLOOConfig))
    tok = H.build_tokenizer()
    policy = GPT2LMHeadModel.from_pretrained(dirs["policy"], attn_implementation="eager")
    table = reward_table()

    def fixed_reward(prompts, completions, completion_ids, **kwargs):
        return [table[tuple(ids)] for ids in completion_ids]
    args = Config(output_dir=workdir, report_to=[], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                  seed=0, learning_rate=LR, adam_epsilon=ADAM_EPS, per_device_train_batch_size=G,
                  gradient_accumulation_steps=2, num_generations=G, max_completion_length=L, max_steps=1,
                  temperature=1.0, save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
                  shuffle_dataset=False, **config)
    prompts_text = [" ".join(f"w{i}" for i in p) for p in PROMPTS]
    train = datasets.Dataset.from_dict({"prompt": prompts_text})
    with torch.random.fork_rng(devices=[]):
        trainer = Trainer(model=policy, reward_funcs=fixed_reward, args=args, train_dataset=train, processing_class=tok)
        if getattr(trainer, "ref_model", None) is not None:  # a reference that differs from the policy
            ref = GPT2LMHeadModel.from_pretrained(dirs["ref"], attn_implementation="eager")
            trainer.ref_model.load_state_dict(ref.state_dict())
        by_prompt = {tuple(p): cs for p, cs in zip(PROMPTS, COMPLETIONS)}
        seen = {}

        def fixed_generation(self, prompt_ids, *a, **k):
            out = []
            for ids in prompt_ids:
                key = tuple(ids.tolist() if torch.is_tensor(ids) else ids)
                i = seen.get(key, 0)
                seen[key] = i + 1
                out.append(list(by_prompt[key][i % G]))
            return (out, None) if trainer_name == "grpo" else out
        trainer._generate_single_turn = types.MethodType(fixed_generation, trainer)
        cap = {"inputs": [], "losses": []}
        real_compute = trainer._compute_loss

        def compute_spy(model, inputs):
            loss = real_compute(model, inputs)
            cap["inputs"].append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inputs.items()})
            cap["losses"].append(loss.detach().clone())
            return loss
        trainer._compute_loss = compute_spy
        real_shuffle = module.shuffle_sequence_dict
        module.shuffle_sequence_dict = lambda d: d
        try:
            trainer.train()
        finally:
            module.shuffle_sequence_dict = real_shuffle
    model = trainer.accelerator.unwrap_model(trainer.model)
    cap["policy_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return cap


def run_ours(dirs, trl, cfg):
    """make_experience + ppo_update on TRL's micro-batches, concatenated in TRL's order (= group order here)."""
    d = Dist()
    policy, ref = GPT.from_pretrained(dirs["policy"]), GPT.from_pretrained(dirs["ref"])
    reward_model = GPT.from_pretrained(dirs["reward"], scalar_head=True)
    for m in (ref, reward_model):
        m.eval().requires_grad_(False)
    cat = lambda key: torch.cat([x[key] for x in trl["inputs"]])  # noqa: E731
    prompt_ids, completion_ids = cat("prompt_ids"), cat("completion_ids")
    query_response = torch.cat([prompt_ids, completion_ids], 1)
    query_mask = prompt_ids != PAD
    table = reward_table()
    fixed = torch.tensor([table[tuple(t for t in row.tolist() if t != PAD)] for row in completion_ids])
    tok = types.SimpleNamespace(eos_id=EOS)
    real_scores, real_randperm = ppo.reward_scores, torch.randperm
    recorded = []
    real_aggregate = ppo.aggregate

    def aggregate_spy(losses, mask, mode, **k):
        out = real_aggregate(losses, mask, mode, **k)
        recorded.append(out.detach().clone())
        return out
    ppo.reward_scores = lambda *a, **k: fixed.clone()
    ppo.aggregate, torch.randperm = aggregate_spy, lambda n, *a, **k: torch.arange(n)
    try:
        exp = ppo.make_experience(policy, None, ref, reward_model, query_response, query_mask,
                                  torch.zeros(completion_ids.shape), cfg.kl_coef, tok, cfg, d)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps,
                                      weight_decay=0.0)
        ppo.ppo_update(policy, None, nn.ModuleDict({"policy": policy}), optimizer, [cfg.lr], exp, 0, 1, cfg, d)
    finally:
        ppo.reward_scores, ppo.aggregate, torch.randperm = real_scores, real_aggregate, real_randperm
    return exp, recorded, to_hf_state_dict(policy.state_dict())


def our_config(preset, **overrides):
    return ppo.Config(**{**ppo.PRESETS[preset], "rollout_batch_size": len(PROMPTS), "samples_per_prompt": G,
                         "micro_batch_size": G, "num_minibatches": 1, "response_length": L, "lr": LR,
                         "adam_eps": ADAM_EPS, "bf16": False, "device": "cpu", "num_updates": 1, **overrides})


def compare(trl, exp, recorded, ours_state, initial, kl_in_loss, beta, accumulation, grad_scale=1.0):
    # Advantages: TRL's (B,) per completion vs ours on every valid token.
    trl_adv = torch.cat([x["advantages"] for x in trl["inputs"]])
    torch.testing.assert_close(exp["advantages"][:, 0], trl_adv.float(), **TOL)
    # The loss of each micro-batch: ours = (policy term + beta * KL term) / accumulation.
    per_micro = 2 if kl_in_loss else 1
    ours = [(recorded[i] + (beta * recorded[i + 1] if kl_in_loss else 0)) / accumulation
            for i in range(0, len(recorded), per_micro)]
    assert len(ours) == len(trl["losses"]) == 2
    for a, b in zip(ours, trl["losses"]):
        torch.testing.assert_close(a * grad_scale, b, **TOL)
    # Weights after the step: every parameter (HF names; TRL's tied lm_head.weight is our wte).
    assert set(ours_state) <= set(trl["policy_state"]) and len(ours_state) >= len(trl["policy_state"]) - 1
    for k, v in ours_state.items():
        torch.testing.assert_close(v, trl["policy_state"][k], atol=1e-5, rtol=0, msg=lambda m: f"{k}: {m}")
    assert max((trl["policy_state"][k] - initial[k]).abs().max().item() for k in ours_state) > 1e-4  # it moved


@pytest.fixture(scope="module")
def initial(dirs):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(dirs["policy"]).state_dict()


@pytest.mark.parametrize("loss_type,beta", [("dapo", 0.04), ("grpo", 0.0), ("bnpo", 0.0), ("dr_grpo", 0.04)])
def test_grpo_trainer_one_update(dirs, initial, tmp_path, loss_type, beta):
    trl = run_trl(dirs, str(tmp_path), "grpo", loss_type=loss_type, beta=beta, scale_rewards="group")
    cfg = our_config("trl_grpo", loss_aggregation=ppo.TRL_LOSS_TYPES[loss_type], kl_coef=beta)
    exp, recorded, state = run_ours(dirs, trl, cfg)
    accumulation = 2 if cfg.loss_aggregation == "token_mean" else 1
    compare(trl, exp, recorded, state, initial, kl_in_loss=True, beta=beta, accumulation=accumulation)


def test_grpo_trainer_scale_rewards_batch_and_none(dirs, initial, tmp_path):
    for scaling in ("batch", "none"):
        trl = run_trl(dirs, str(tmp_path / scaling), "grpo", loss_type="dapo", beta=0.0, scale_rewards=scaling)
        exp, recorded, state = run_ours(dirs, trl, our_config("trl_grpo", group_std_scaling=scaling))
        compare(trl, exp, recorded, state, initial, kl_in_loss=True, beta=0.0, accumulation=1)


def test_rloo_trainer_one_update(dirs, initial, tmp_path):
    trl = run_trl(dirs, str(tmp_path), "rloo", beta=0.05)
    exp, recorded, state = run_ours(dirs, trl, our_config("trl_rloo", kl_coef=0.05))
    # RLOOTrainer returns the unscaled mean over its micro-batch's sequences and lets the HF Trainer divide by
    # gradient accumulation (rloo_trainer.py L1739); ours is already that micro-batch's share: x 2 to compare.
    compare(trl, exp, recorded, state, initial, kl_in_loss=False, beta=0.05, accumulation=1, grad_scale=2.0)
