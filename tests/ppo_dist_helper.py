"""One PPO update on a fixed rollout, for tests/test_ppo.py: `python ppo_dist_helper.py CKPTS OUT` uses all
8 rollout rows in one process; under `torchrun --nproc_per_node=2` each rank takes 4 of them. Rank 0 saves
the updated policy and critic weights to OUT."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import data  # noqa: E402
import ppo  # noqa: E402
from model import generate  # noqa: E402
from runtime import full_state_dict, init_distributed, shard_model, shutdown_distributed, unsharded  # noqa: E402


def main(ckpts, out):
    d = init_distributed("cpu")
    # seq_mean_token_mean with equal micro-batches is independent of how rows are split into micro-batches,
    # and global whitening gives every rank the statistics of the whole rollout: 1 and 2 processes must agree.
    cfg = ppo.Config(sft=f"{ckpts}/sft", reward_model=f"{ckpts}/rm", response_length=6, temperature=0.7,
                     num_ppo_epochs=2, rollout_batch_size=8, micro_batch_size=4, lr=1e-3,
                     advantage_whitening="global", loss_aggregation="seq_mean_token_mean", old_logprobs="recompute")
    policy, ref, rm, critic = ppo.build_models(cfg, d)
    tok = data.get_tokenizer("char")
    prompts = ["ab=", "cdefgh=", "p=", "abcdefgh=", "mno=", "ij=", "klmnop=", "efg="]
    ids, mask = data.pad_left([tok.encode(p) for p in prompts], tok.eos_id)
    with unsharded(policy):  # build_models shards under torchrun; ppo.rollout samples from the whole model too
        qr, logp = generate(policy, ids, mask, cfg.response_length, temperature=cfg.temperature, eos_id=tok.eos_id,
                            pad_id=tok.eos_id, generator=torch.Generator().manual_seed(0))  # the same on every rank
    rows = slice(4 * d.rank, 4 * d.rank + 4) if d.distributed else slice(0, 8)
    trainable = torch.nn.ModuleDict({"policy": policy, "critic": critic})
    for m in (policy, critic, ref, rm):
        shard_model(m, d)
    optimizer = ppo.make_optimizer(policy, critic, cfg)
    exp = ppo.make_experience(policy, critic, ref, rm, qr[rows], mask[rows], logp[rows], cfg.kl_coef, tok, cfg, d)
    ppo.ppo_update(policy, critic, trainable, optimizer, [g["lr"] for g in optimizer.param_groups], exp, 0, 10,
                   cfg, d)
    weights = {f"policy.{k}": v for k, v in full_state_dict(policy).items()}
    weights.update({f"critic.{k}": v for k, v in full_state_dict(critic).items()})
    if d.rank == 0:
        torch.save(weights, out)
    shutdown_distributed()


if __name__ == "__main__":
    from runtime import run_main
    run_main(lambda: main(sys.argv[1], sys.argv[2]))
