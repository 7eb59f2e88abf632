"""Runs one PPO update through TRL's real `PPOTrainer` and through ours, from the same weights and rollout.

Used by tests/test_parity_trl.py (which documents the tolerances). TRL is imported and run, never copied:
the only things patched inside `trl.experimental.ppo.ppo_trainer` are

- `batch_generation`: returns fixed responses (so both sides see the same rollout) and, as the sampling
  logits, one forward pass of TRL's own policy on them divided by the generation temperature, which is
  what HF `generate`'s TemperatureLogitsWarper does to `output.scores`;
- `masked_whiten` and `accelerator.backward`: thin wrappers that pass through and snapshot `train()`'s
  local variables (rewards, values, returns, advantages, per-step losses), which TRL deletes at the end;
- `numpy.random.permutation` (only while TRL trains): recorded, so our update can visit the minibatches
  in TRL's order.

Convention differences between the two setups that are not bugs, handled here:

1. Padding. TRL's attention mask is `ids != pad_token_id`, so its pad id must differ from EOS (else the EOS
   would be masked). The vocabulary has a dedicated <pad> (id PAD) besides <eos> (id EOS); prompts are
   left-padded with it by TRL's collator and responses are padded with it after EOS. Our side gets the
   very same (B, P + N) tensor and `query_mask = query != PAD`; `make_experience` derives the response
   mask from the EOS position, which marks the same tokens as TRL's `!= pad`.
2. Temperature. TRL divides logits by `temperature + 1e-7`, we by `temperature`: relative differences of
   ~1.4e-7 in every log-prob (far inside the tolerances).
3. Sampling log-probs. Our `make_experience` receives TRL's own sampling log-probs (with TRL's 1.0 filler
   after EOS, which our action mask must zero) as `sample_logp`.
4. Heads. HF's `GPT2ForSequenceClassification.score` has no bias; ours has one. It is set to 0 on load and,
   for the critic, frozen (`requires_grad=False`, left out of the optimizer), which models TRL's head.
"""

import copy
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn

import ppo
from model import GPT
from runtime import Dist

# A word-level vocabulary: w0..w(V-3), then <eos>, then <pad> (distinct from EOS: convention 1).
VOCAB = 32
EOS, PAD = VOCAB - 2, VOCAB - 1
RESPONSE_LENGTH = 6
# Distinct prompts of different lengths (left padding differs per row); no EOS or PAD inside.
PROMPTS = [[3, 7, 1], [5, 9, 2, 11, 4], [8, 6], [12, 13, 14, 2]]
# The fixed "sampled" responses, one per prompt, covering every masking case:
RESPONSES = [
    [4, 9, EOS, PAD, PAD, PAD],  # EOS mid-way: score lands one slot after EOS (TRL actual_end = EOS + 1)
    [1, 2, 3, 4, 5, 6],  # never stopped: missing-EOS penalty, score on the last token
    [EOS, PAD, PAD, PAD, PAD, PAD],  # EOS first: a single action token
    [7, 8, 9, 10, 11, EOS],  # EOS on the last slot: the score slot is clamped to N - 1
]
TEMPERATURE = 0.7
LR = 1e-3
SEED = 0

# Two update layouts: (name, num_ppo_epochs, num_minibatches). Batch = len(PROMPTS), no gradient accumulation
# (TRL: per_device_train_batch_size = local_mini_batch_size, gradient_accumulation_steps = 1).
LAYOUTS = {"1minibatch": (2, 1), "2minibatches": (2, 2)}


# -----------------------------------------------------------------------------
# Shared initial weights and tokenizer


def build_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<eos>": EOS, "<pad>": PAD}
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                  unk_token="w0", padding_side="left")
    assert tok.eos_token_id == EOS and tok.pad_token_id == PAD
    return tok


def hf_config(family: str = "gpt2"):
    if family == "qwen2":  # TRL's own CI model family (tiny-Qwen2ForCausalLM-2.5), tiny and random, GQA 4/2
        from transformers import Qwen2Config
        return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                           initializer_range=0.1, tie_word_embeddings=True, bos_token_id=EOS, eos_token_id=EOS,
                           pad_token_id=PAD, num_labels=1, attn_implementation="eager")
    from transformers import GPT2Config
    # initializer_range 0.1 (HF default 0.02) so that logits, values and scores are O(1) and the update is
    # visible; dropout 0 everywhere (TRL disables it too); eager attention for plain, deterministic math.
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2, initializer_range=0.1,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                      bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, num_labels=1,
                      attn_implementation="eager")


def save_initial_models(root: str, family: str = "gpt2") -> dict:
    """Random tiny HF models (GPT-2, or Qwen2), saved with save_pretrained: policy, a reference that differs
    from it (so the KL term is not ~0), and reward and value models with different weights (so a mix-up would show)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    cfg = hf_config(family)
    torch.manual_seed(1)
    policy = AutoModelForCausalLM.from_config(cfg)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    torch.manual_seed(3)
    reward = AutoModelForSequenceClassification.from_config(cfg)
    torch.manual_seed(4)
    value = AutoModelForSequenceClassification.from_config(cfg)
    dirs = {}
    for name, m in [("policy", policy), ("ref", ref), ("reward", reward), ("value", value)]:
        dirs[name] = os.path.join(root, name)
        m.save_pretrained(dirs[name])
    return dirs


# -----------------------------------------------------------------------------
# TRL's side


def _snapshot(f_locals: dict, names) -> dict:
    return {k: (f_locals[k].detach().clone() if torch.is_tensor(f_locals[k]) else copy.deepcopy(f_locals[k]))
            for k in names if k in f_locals}


def run_trl(dirs: dict, workdir: str, layout: str, adam_epsilon: float | None = None) -> dict:
    """One update of TRL's PPOTrainer on PROMPTS/RESPONSES. Returns its internals, per-step losses,
    logged metrics and the final weights (HF names). adam_epsilon None = TRL's default (HF's 1e-8)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    epochs, num_mb = LAYOUTS[layout]
    B = len(PROMPTS)
    tok = build_tokenizer()
    load = lambda cls, name: cls.from_pretrained(dirs[name], attn_implementation="eager")  # noqa: E731
    policy, ref = load(AutoModelForCausalLM, "policy"), load(AutoModelForCausalLM, "ref")
    reward, value = load(AutoModelForSequenceClassification, "reward"), load(AutoModelForSequenceClassification, "value")
    args = PPOConfig(
        output_dir=workdir, report_to=[], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        seed=SEED, learning_rate=LR, per_device_train_batch_size=B, gradient_accumulation_steps=1,
        num_mini_batches=num_mb, num_ppo_epochs=epochs, total_episodes=B, local_rollout_forward_batch_size=B,
        response_length=RESPONSE_LENGTH, temperature=TEMPERATURE, stop_token="eos", missing_eos_penalty=1.0,
        kl_coef=0.05, kl_estimator="k1", num_sample_generations=0, save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0,
        **({} if adam_epsilon is None else {"adam_epsilon": adam_epsilon}))
    # TRL's local batch is per_device_train_batch_size x gradient_accumulation_steps = B; with
    # num_mini_batches=2 its micro-batch loop (stride B over a minibatch of B/2) runs once per minibatch,
    # so every minibatch is one optimizer step on B/2 sequences, as ours with micro_batch_size = B/2.

    with torch.random.fork_rng(devices=[]):  # PPOTrainer calls torch.manual_seed: keep the session's RNG
        return _train_trl(args, tok, policy, ref, reward, value, datasets.Dataset.from_dict({"input_ids": PROMPTS}),
                          PPOTrainer, trl_ppo)


def _train_trl(args, tok, policy, ref, reward, value, train, PPOTrainer, trl_ppo):
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=train, value_model=value)
    by_prompt = {tuple(p): r for p, r in zip(PROMPTS, RESPONSES)}
    cap = {"steps": [], "perms": [], "metrics": [], "gen_calls": 0}

    @torch.no_grad()
    def fixed_generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
        rows = [by_prompt[tuple(t for t in q.tolist() if t != pad_token_id)] for q in queries]
        query_responses = torch.cat([queries, torch.tensor(rows, dtype=queries.dtype)], 1)
        P = queries.shape[1]
        logits = trl_ppo.forward(model, query_responses, pad_token_id).logits[:, P - 1:-1]
        cap["gen_calls"] += 1
        cap["gen_temperature"] = generation_config.temperature
        return query_responses, logits / generation_config.temperature  # HF TemperatureLogitsWarper

    real_whiten = trl_ppo.masked_whiten

    def whiten_spy(values, mask, shift_mean=True):
        cap["rollout"] = _snapshot(sys._getframe(1).f_locals, [
            "queries", "query_responses", "responses", "logprobs", "ref_logprobs", "scores", "values", "rewards",
            "returns", "kl", "non_score_reward", "padding_mask", "padding_mask_p1", "sequence_lengths",
            "contain_eos_token"])
        cap["raw_advantages"] = values.detach().clone()
        return real_whiten(values, mask, shift_mean)

    accelerator = trainer.accelerator
    real_backward = accelerator.backward

    def backward_spy(loss, **kwargs):
        f = sys._getframe(1).f_locals
        cap["steps"].append(_snapshot(f, ["loss", "pg_loss", "vf_loss", "vf_clipfrac", "micro_batch_inds",
                                          "ppo_epoch_idx", "ratio", "new_logprobs", "vpred"]))
        if len(cap["steps"]) == 1:
            cap["advantages"] = f["advantages"].detach().clone()  # whitened and masked
        out = real_backward(loss, **kwargs)
        params = [p for p in trainer.model.parameters() if p.grad is not None]
        cap["steps"][-1]["grad_norm"] = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        return out

    real_permutation = np.random.permutation

    def permutation_spy(x):
        out = real_permutation(x)
        cap["perms"].append(np.array(out))
        return out

    real_log = trainer.log
    trainer.log = lambda logs, *a, **k: (cap["metrics"].append(dict(logs)), real_log(logs, *a, **k))[1]
    accelerator.backward = backward_spy
    saved = trl_ppo.batch_generation, trl_ppo.masked_whiten, np.random.permutation
    trl_ppo.batch_generation, trl_ppo.masked_whiten, np.random.permutation = fixed_generation, whiten_spy, permutation_spy
    np_state = np.random.get_state()
    np.random.seed(SEED)  # TRL's minibatch shuffles (recorded and replayed anyway; seeded for stable asserts)
    try:
        trainer.train()
    finally:
        np.random.set_state(np_state)
        trl_ppo.batch_generation, trl_ppo.masked_whiten, np.random.permutation = saved
        accelerator.backward = real_backward

    model = accelerator.unwrap_model(trainer.model)
    cap["policy_state"] = {k: v.detach().clone() for k, v in model.policy.state_dict().items()}
    cap["value_state"] = {k: v.detach().clone() for k, v in model.value_model.state_dict().items()}
    cap["adam"] = {k: v for k, v in trainer.optimizer.param_groups[0].items() if k in ("betas", "eps", "weight_decay")}
    return cap


# -----------------------------------------------------------------------------
# Our side


def our_config(layout: str, **overrides) -> ppo.Config:
    """The "trl" preset with this test's sizes; `overrides` are the knobs under test."""
    epochs, num_mb = LAYOUTS[layout]
    B = len(PROMPTS)
    return ppo.Config(**{**ppo.PRESETS["trl"], "rollout_batch_size": B, "num_minibatches": num_mb,
                         "micro_batch_size": B // num_mb, "num_ppo_epochs": epochs, "num_updates": 1, "lr": LR,
                         "temperature": TEMPERATURE, "response_length": RESPONSE_LENGTH, "seed": SEED,
                         "bf16": False, "device": "cpu", **overrides})


def load_ours(dirs: dict, freeze_critic_bias: bool = True):
    policy = GPT.from_pretrained(dirs["policy"])
    ref = GPT.from_pretrained(dirs["ref"])
    reward_model = GPT.from_pretrained(dirs["reward"], scalar_head=True)
    critic = GPT.from_pretrained(dirs["value"], scalar_head=True)
    for m in (reward_model, critic):  # convention 4: HF's score head has no bias
        with torch.no_grad():
            m.score.bias.zero_()
        m.config.reward_gain, m.config.reward_bias = 1.0, 0.0
    if freeze_critic_bias:
        critic.score.bias.requires_grad_(False)
    for m in (ref, reward_model):
        m.eval().requires_grad_(False)
    return policy, ref, reward_model, critic


def run_ours(dirs: dict, trl: dict, cfg: ppo.Config, freeze_critic_bias: bool = True, models=None) -> dict:
    """make_experience + ppo_update on TRL's rollout tensors, minibatches in TRL's order."""
    d = Dist()
    policy, ref, reward_model, critic = models or load_ours(dirs, freeze_critic_bias)
    tok = types.SimpleNamespace(eos_id=EOS)
    roll = trl["rollout"]
    queries, query_response = roll["queries"], roll["query_responses"]
    query_mask = queries != PAD  # convention 1
    exp = ppo.make_experience(policy, critic, ref, reward_model, query_response, query_mask, roll["logprobs"],
                              cfg.kl_coef, tok, cfg, d)

    # The optimizer as ppo.main builds it: one AdamW over policy and critic (TRL: one over its wrapper).
    trainable = nn.ModuleDict({"policy": policy, "critic": critic})
    optimizer = ppo.make_optimizer(policy, critic, cfg)  # a frozen critic bias gets no grad: AdamW skips it
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    total_steps = cfg.num_updates * cfg.num_ppo_epochs * cfg.num_minibatches  # as ppo.main

    steps = []
    real_policy_loss, real_value_loss, real_randperm = ppo.policy_loss, ppo.value_loss, torch.randperm
    perms = iter(trl["perms"])

    def policy_loss_spy(*a, **k):
        loss, stats = real_policy_loss(*a, **k)
        steps.append({"pg_loss": loss.detach().clone(), "clipfrac": stats["clipfrac"]})
        return loss, stats

    def value_loss_spy(*a, **k):
        loss, clipfrac = real_value_loss(*a, **k)
        mask = k["mask"] if "mask" in k else a[3]
        steps[-1].update(vf_loss=loss.detach().clone(), vf_clipfrac=clipfrac, vf_tokens=int(mask.sum()))
        return loss, clipfrac

    def randperm_from_trl(n, *a, **k):  # replay TRL's np.random.permutation draws (one per PPO epoch)
        perm = next(perms)
        assert len(perm) == n
        return torch.as_tensor(perm, dtype=torch.long)

    ppo.policy_loss, ppo.value_loss, torch.randperm = policy_loss_spy, value_loss_spy, randperm_from_trl
    try:
        stats = ppo.ppo_update(policy, critic, trainable, optimizer, base_lrs, exp, 0, total_steps, cfg, d)
    finally:
        ppo.policy_loss, ppo.value_loss, torch.randperm = real_policy_loss, real_value_loss, real_randperm
    from model import to_hf_state_dict
    return {"exp": exp, "stats": stats, "steps": steps,
            "policy_state": to_hf_state_dict(policy.state_dict(), policy.config),
            "critic_state": to_hf_state_dict(critic.state_dict(), critic.config)}
