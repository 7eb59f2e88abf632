"""FSDP2 on the Llama family: 2 processes (torchrun, gloo on CPU) compute the forward and backward of a tiny
random Qwen3 (GQA, QK-norm, head_dim != width / heads) exactly as one process does.

This file is also the per-rank script: `torchrun --nproc_per_node=2 tests/test_distributed_families.py
MODEL_DIR OUT_DIR` shards the model with runtime.shard_model (every block, then the root), runs its rows
of a fixed right-padded batch, and writes the global loss and the full gradients (all-gathered) to
OUT_DIR/rank{R}.pt.
"""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch

from model import GPT
from runtime import Dist, all_reduce_sum, init_distributed, run_main, shard_model, shutdown_distributed
from sft import sft_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixed_batch(vocab: int):
    """8 rows of different lengths (right padding), loss on all real tokens but the first."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, 14), generator=g)
    lengths = torch.tensor([14, 9, 12, 5, 14, 7, 11, 3])
    mask = (torch.arange(14)[None] < lengths[:, None]).long()
    loss_mask = mask.clone()
    loss_mask[:, 0] = 0
    return ids, mask, loss_mask


def forward_backward(model_dir: str, d: Dist) -> dict:
    """This rank's rows through the (sharded) model; the loss is normalized by the whole batch's token count
    as sft.py does, so the gradients FSDP averages over ranks equal the one-process gradients."""
    model = shard_model(GPT.from_pretrained(model_dir), d)
    ids, mask, loss_mask = fixed_batch(model.config.vocab_size)
    rows = ids.size(0) // d.world_size
    mine = slice(d.rank * rows, (d.rank + 1) * rows)
    n_tokens = all_reduce_sum(loss_mask[mine][:, 1:].sum().float(), d)
    loss_sum, _ = sft_loss(model(ids[mine], attention_mask=mask[mine]), ids[mine], loss_mask[mine])
    (loss_sum * d.world_size / n_tokens).backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    from torch.distributed.fsdp import FSDPModule
    sharded = [isinstance(b, FSDPModule) for b in model.transformer.h] if d.distributed else []
    return {"loss": all_reduce_sum(loss_sum.detach(), d) / n_tokens, "grads": grads, "sharded_blocks": sharded}


def main():
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    d = init_distributed("cpu")
    result = forward_backward(model_dir, d)
    torch.save(result, os.path.join(out_dir, f"rank{d.rank}.pt"))
    shutdown_distributed()


if __name__ == "__main__":
    run_main(main)  # as the stages end under torchrun
else:
    import pytest
    import torch.distributed as dist

    transformers = pytest.importorskip("transformers", reason="transformers builds the random Qwen3")
    pytestmark = [
        pytest.mark.slow,
        pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                           reason="torch.distributed with the gloo backend is needed for multi-process tests on CPU"),
    ]

    def test_fsdp2_qwen3_forward_backward_matches_one_process(tmp_path):
        torch.manual_seed(0)
        cfg = transformers.Qwen3Config(vocab_size=67, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                                       num_attention_heads=3, num_key_value_heads=1, head_dim=20,
                                       max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=True)
        transformers.Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "qwen3")
        out = tmp_path / "out"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "tests/test_distributed_families.py", str(tmp_path / "qwen3"), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("WORLD_SIZE", None)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        ref = forward_backward(str(tmp_path / "qwen3"), Dist())
        assert ranks[0]["sharded_blocks"] == [True] * 3  # every block is its own FSDP unit, as for GPT-2
        for got in ranks:
            assert abs(got["loss"].item() - ref["loss"].item()) <= 1e-6
            assert got["grads"].keys() == ref["grads"].keys()
            for name, g in ref["grads"].items():
                # float32; only the order of the gradient reduction differs between 1 and 2 processes
                torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=1e-6, msg=name)
        assert all(g.abs().max() > 1e-4 for g in ref["grads"].values())  # every weight, QK-norm included, gets gradient
