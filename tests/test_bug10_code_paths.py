"""Bug class 10: one loss, several code paths (REFERENCES 5.2a row 10).

Liger-Kernel #1082: the fused GRPO path gave ~100x the grad norm of the reference. ms-swift PR #10167:
Megatron DPO ignored loss_type, so IPO trained as sigmoid (loss 0.437 where IPO gives 1.0). Here:
- the losses ppo_update computes and logs, through its forward passes, equal `ppo.policy_loss` and
  `ppo.value_loss` applied to the same tensors, for each clip / dual-clip / aggregation setting, and each
  setting changes the value (none is silently ignored);
- dpo_loss gives the hand-worked value of each loss_type, and they differ.
The other paths are covered where they run: two FSDP processes vs one (tests/test_distributed.py,
test_ppo.py::test_two_processes_equal_one), a resumed run vs an uninterrupted one
(test_ppo.py::test_resume_is_exact), micro-batch splitting (test_bug04, and the group-methods suite).
"""

import math

import pytest
import torch

import data
import dpo
import ppo
from model import GPT, config_for, generate
from runtime import Dist, apply_preset
from tiny_checkpoints import save_tiny_policy_and_rm

VARIANTS = {
    "default": {},
    "cliprange 0.05": dict(cliprange=0.05),
    "dual clip 1.5": dict(dual_clip=1.5),
    "seq_mean_token_mean": dict(loss_aggregation="seq_mean_token_mean"),
    "value clip 0.01": dict(cliprange_value=0.01),
}


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    base = save_tiny_policy_and_rm(tmp_path_factory.mktemp("ckpts"))
    tok = data.get_tokenizer("char")
    cfg = ppo.Config(sft=str(base / "sft"), reward_model=str(base / "rm"), response_length=8, temperature=0.7,
                     old_logprobs="recompute")
    policy, ref, rm, critic = ppo.build_models(cfg, Dist())
    ids, mask = data.pad_left([tok.encode(s) for s in ["ab=", "cdefgh=", "p=", "abcdefgh=", "mno=", "ij="]], tok.eos_id)
    qr, logp = generate(policy, ids, mask, 8, temperature=0.7, eos_id=tok.eos_id, pad_id=tok.eos_id,
                        generator=torch.Generator().manual_seed(1))
    return base, (policy, ref, rm, critic), qr, mask, logp, tok


def _logged_and_pure(rollout, **overrides):
    base, (policy, ref, rm, critic), qr, mask, logp, tok = rollout
    cfg = ppo.Config(sft=str(base / "sft"), reward_model=str(base / "rm"), response_length=8, temperature=0.7,
                     old_logprobs="recompute", num_ppo_epochs=1, rollout_batch_size=6, micro_batch_size=6,
                     **overrides)
    d = Dist()
    exp = ppo.make_experience(policy, critic, ref, rm, qr, mask, logp, cfg.kl_coef, tok, cfg, d)
    # Old log-probs and values moved away from the current ones, so ratios leave 1 and every clip binds somewhere.
    g = torch.Generator().manual_seed(0)
    exp["logp"] = (exp["logp"] + 0.4 * torch.randn(exp["logp"].shape, generator=g)) * exp["action_mask"]
    exp["values"] = (exp["values"] + 0.3 * torch.randn(exp["values"].shape, generator=g)) * exp["value_mask"]
    trainable = torch.nn.ModuleDict({"policy": policy, "critic": critic})
    optimizer = torch.optim.SGD(trainable.parameters(), lr=0.0)  # the models stay as they are
    stats = ppo.ppo_update(policy, critic, trainable, optimizer, [0.0, 0.0], exp, 0, 10, cfg, d)
    # The pure functions on the same tensors: the new log-probs and values are the current models' (lr 0).
    new_values = ppo.critic_values(critic, exp["query_response"], exp["attention_mask"], exp["context_length"])
    pg, _ = ppo.policy_loss(exp["recomputed_logp"], exp["logp"], exp["advantages"], exp["action_mask"],
                            cfg.cliprange, cfg.dual_clip, cfg.loss_aggregation)
    vf, _ = ppo.value_loss(new_values * exp["value_mask"], exp["values"], exp["returns"], exp["value_mask"],
                           cfg.cliprange_value, cfg.loss_aggregation)
    return stats, pg, vf


def test_ppo_update_losses_equal_the_pure_functions(rollout):
    logged = {}
    for name, overrides in VARIANTS.items():
        stats, pg, vf = _logged_and_pure(rollout, **overrides)
        assert abs(stats["pg_loss"] - pg) < 1e-6, f"{name}: ppo_update's policy loss {stats['pg_loss']:.6f} vs {pg:.6f}"
        assert abs(stats["vf_loss"] - vf) < 1e-6, f"{name}: ppo_update's value loss {stats['vf_loss']:.6f} vs {vf:.6f}"
        logged[name] = (round(float(stats["pg_loss"]), 6), round(float(stats["vf_loss"]), 6))
    # Every setting reaches the loss: no two variants log the same pair of values.
    assert len(set(logged.values())) == len(logged), logged


def test_dpo_loss_types_hand_values():
    """At the reference (margin h = 0) with beta 0.5: sigmoid gives log 2, IPO (h - 1/(2 beta))^2 = 1."""
    zero = torch.zeros(3)
    sigmoid, _, _ = dpo.dpo_loss(zero, zero, zero, zero, beta=0.5, loss_type="sigmoid")
    ipo, _, _ = dpo.dpo_loss(zero, zero, zero, zero, beta=0.5, loss_type="ipo")
    assert torch.allclose(sigmoid, torch.full((3,), math.log(2)))
    assert torch.allclose(ipo, torch.ones(3))
    h = torch.tensor([0.3, -1.0, 2.0])  # chosen log-ratio h, rejected 0
    sig, _, _ = dpo.dpo_loss(h, zero, zero, zero, beta=0.5, loss_type="sigmoid")
    ipo, _, _ = dpo.dpo_loss(h, zero, zero, zero, beta=0.5, loss_type="ipo")
    assert torch.allclose(sig, -torch.nn.functional.logsigmoid(0.5 * h))
    assert torch.allclose(ipo, (h - 1.0) ** 2)


def test_ipo_average_flag_reaches_the_loss():
    """--ipo_average (TRL's IPO, --preset=trl) divides each log-prob by its response length before the loss;
    sums stay the default, and the sigmoid loss always sums."""
    from types import SimpleNamespace
    model = GPT(config_for("tiny", vocab_size=20)).eval()
    model.init_weights(seed=0)
    triples = [([1, 2, 3], [4, 5, 6, 7, 8], [9, 10]), ([11, 12], [13], [14, 15, 16])]
    batch = data.collate_pairs(triples, pad_id=0)
    with torch.no_grad():
        sums = dpo.pair_logps(model, batch, Dist(), bf16=False)
        avgs = dpo.pair_logps(model, batch, Dist(), bf16=False, average=True)
    lengths = (torch.tensor([5, 1]), torch.tensor([2, 3]))
    for s, a, n in zip(sums, avgs, lengths):
        assert torch.allclose(a, s / n, atol=1e-6)
    assert dpo.averaged_logps(SimpleNamespace(loss_type="ipo", ipo_average=True))
    assert not dpo.averaged_logps(SimpleNamespace(loss_type="sigmoid", ipo_average=True))
    assert not dpo.averaged_logps(dpo.Config(loss_type="ipo"))
    assert apply_preset(["--preset=trl"], dpo.PRESETS) == {"beta": 0.1, "ipo_average": True, "preset": "trl"}
