"""Per-rank code for tests/test_distributed.py, launched as

    torchrun --standalone --nproc_per_node=2 tests/dist_helpers.py SCENARIO[,SCENARIO...] OUT_DIR

Each scenario runs a tiny GPT under FSDP2 (runtime.shard_model, gloo on CPU; with DIST_HELPERS_DEVICE=cuda,
NCCL on one GPU per process, float32, as `bench.py gpu` runs sgd_step) and writes its result to
OUT_DIR/SCENARIO.rank{R}.pt with torch.save. The test computes the same thing in one process with the
functions below (world_size=1, shard_model a no-op) and compares.

Scenarios:
  sgd_step  loss of a fixed batch split across ranks (each rank its contiguous rows, normalized by the
            token count of the whole batch as sft.py does), one SGD step of lr 0.1, then the full weights
            (runtime.full_state_dict, all-gathered) and the world size. Rank 0 only writes.
  generate  greedy tokens of model.generate on left-padded prompts inside runtime.unsharded(model), from
            a tiny GPT trained for a few steps first (trained_model). Every rank writes, so the test
            can also check that the ranks agree.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch

import data
from model import GPT, config_for, generate
from runtime import Dist, all_reduce_sum, full_state_dict, init_distributed, run_main, shard_model, shutdown_distributed, unsharded
from sft import sft_loss

# Reverse-task demonstrations of different lengths, so the batch has right padding.
PAIRS = [("abc=", "cba"), ("hello=", "olleh"), ("mnop=", "ponm"), ("ab=", "ba"),
         ("kjihg=", "ghijk"), ("xyz=", "zyx"), ("qrstuv=", "vutsrq"), ("de=", "ed")]
PROMPTS = ["abc=", "hello=", "ponm=", "z="]  # different lengths: left padding in generate


def tiny_model(seed: int = 0) -> GPT:
    tok = data.get_tokenizer("char")
    model = GPT(config_for("tiny", vocab_size=tok.vocab_size, tokenizer="char"))
    model.init_weights(seed=seed)
    return model


def fixed_batch() -> dict:
    tok = data.get_tokenizer("char")
    stats = data.TruncationStats()
    return data.collate_sft([data.encode_pair(tok, p, r, 12, 16, stats) for p, r in PAIRS], tok.eos_id)


def sgd_step(d: Dist) -> dict:
    """One SGD step on this rank's rows of fixed_batch(); returns the global loss and the full weights."""
    model = shard_model(tiny_model().to(d.device), d, bf16=False)  # float32 on CUDA too: compared with one process
    batch = {k: v.to(d.device) for k, v in fixed_batch().items()}
    rows = batch["input_ids"].size(0) // d.world_size
    mine = {k: v[d.rank * rows:(d.rank + 1) * rows] for k, v in batch.items()}
    n_tokens = all_reduce_sum(mine["loss_mask"][:, 1:].sum().float(), d)
    logits = model(mine["input_ids"], attention_mask=mine["attention_mask"])
    loss_sum, _ = sft_loss(logits, mine["input_ids"], mine["loss_mask"])
    (loss_sum * d.world_size / n_tokens).backward()  # FSDP averages gradients over ranks, as in sft.py
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    loss = all_reduce_sum(loss_sum.detach(), d) / n_tokens
    return {"loss": loss, "weights": full_state_dict(model), "world_size": d.world_size}


def trained_model(steps: int = 60) -> GPT:
    """tiny_model after a few AdamW steps on fixed_batch(), in one process (deterministic on CPU, so
    every rank builds the same one): its greedy outputs vary with the prompt and have clear winners,
    unlike a random init's, which would pass a generation test even with the prompt ignored."""
    model = tiny_model(seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = fixed_batch()
    for _ in range(steps):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        loss_sum, count = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def greedy_tokens(d: Dist) -> dict:
    tok = data.get_tokenizer("char")
    model = shard_model(trained_model(), d).eval()
    ids, mask = data.pad_left([tok.encode(p) for p in PROMPTS], tok.eos_id)
    with unsharded(model):
        seqs, _ = generate(model, ids, mask, 10, temperature=0, eos_id=tok.eos_id, pad_id=tok.eos_id)
    return {"tokens": seqs}


SCENARIOS = {"sgd_step": sgd_step, "generate": greedy_tokens}


def main():
    names, out_dir = sys.argv[1].split(","), sys.argv[2]
    d = init_distributed(os.environ.get("DIST_HELPERS_DEVICE", "cpu"))  # "cuda": NCCL (bench.py gpu)
    for name in names:
        result = SCENARIOS[name](d)
        if d.is_main or name == "generate":
            torch.save(result, os.path.join(out_dir, f"{name}.rank{d.rank}.pt"))
    shutdown_distributed()


if __name__ == "__main__":
    run_main(main)
