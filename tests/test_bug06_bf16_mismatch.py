"""Bug class 6: bf16 numerics between sampler and trainer (REFERENCES 5.2a row 6).

Qi et al. 2025 (OpenRLHF #1155): the sampler/trainer mismatch under bf16 biases RL, fp16 removes it;
sail-sg/Precision-RL #10: the mismatch KL grows from ~1e-3 to ~1 during training. ppo.py logs it each update
as `val/mismatch_kl` (`ppo.mismatch_kl`: per-token k3 of KL(sampler || trainer) on the sampled tokens,
verl's `rollout_corr/k3_kl`). The fp32 path must stay exact; bf16 is reported with a measured bound.
"""

import json
import math

import pytest
import torch

import data
import ppo
from model import GPT, config_for, generate, token_logprobs
from runtime import Dist


def test_mismatch_kl_hand_values():
    mask = torch.tensor([[True, True, False]])
    sample = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    recomputed = torch.log(torch.tensor([[0.25, 0.2, 0.1]]))  # token 0: trainer gives half; token 2 is masked
    # k3 with log-ratio x = log(0.5 / 0.25): exp(-x) - 1 + x = 0.5 - 1 + log 2; token 1 gives 0; mean over 2.
    expected = (0.5 - 1 + math.log(2)) / 2
    assert abs(ppo.mismatch_kl(sample, recomputed, mask).item() - expected) < 1e-6
    assert ppo.mismatch_kl(sample, sample, mask).item() == 0.0


def _experience(checkpoints, bf16):
    """Sampling and make_experience, both under CPU bf16 autocast when bf16 (as on a GPU run)."""
    cfg = ppo.Config(sft=str(checkpoints / "sft"), reward_model=str(checkpoints / "rm"), response_length=8,
                     temperature=0.7)
    d, tok = Dist(), data.get_tokenizer("char")
    policy, ref, rm, critic = ppo.build_models(cfg, d)
    ids, mask = data.pad_left([tok.encode(s) for s in ["ab=", "cdefgh=", "p=", "abcdefgh=", "mno=", "ij="]], tok.eos_id)
    cast = lambda d=None, enabled=True: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    with torch.no_grad(), cast():
        qr, logp = generate(policy, ids, mask, 8, temperature=0.7, eos_id=tok.eos_id, pad_id=tok.eos_id,
                            generator=torch.Generator().manual_seed(1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo, "autocast", cast)
        return ppo.make_experience(policy, critic, ref, rm, qr, mask, logp, cfg.kl_coef, tok, cfg, d)


def test_fp32_path_is_exact(checkpoints):
    exp = _experience(checkpoints, bf16=False)
    maxdiff = ((exp["recomputed_logp"] - exp["logp"]) * exp["action_mask"]).abs().max().item()
    assert maxdiff < 1e-5, maxdiff
    assert exp["mismatch_kl"].item() < 1e-10, exp["mismatch_kl"]


def test_bf16_mismatch_is_measured_and_bounded(checkpoints):
    exp = _experience(checkpoints, bf16=True)
    kl = exp["mismatch_kl"].item()
    print(f"bf16 sampler (KV cache) vs recompute: mismatch KL {kl:.3g} per token")
    assert 0 < kl < 1e-2  # measured 2-core CPU, tiny model: see the printed value


def test_bf16_vs_fp32_forward_mismatch_bound():
    """The same forward in bf16 autocast vs fp32 (log-softmax in fp32 both times): per-token mismatch KL."""
    model = GPT(config_for("cpu-small", vocab_size=50)).eval()
    model.init_weights(seed=0)
    ids = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = token_logprobs(model(ids)[:, :-1], ids[:, 1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = token_logprobs(model(ids)[:, :-1], ids[:, 1:])
    kl = ppo.mismatch_kl(fp32, bf16, torch.ones_like(fp32, dtype=torch.bool)).item()
    print(f"cpu-small, bf16 vs fp32 forward: mismatch KL {kl:.3g}, max |diff| {(fp32 - bf16).abs().max():.3g}")
    assert 0 < kl < 1e-3


def test_metric_is_logged(checkpoints, tmp_path):
    ppo.main([f"--sft={checkpoints / 'sft'}", f"--reward_model={checkpoints / 'rm'}", f"--run_dir={tmp_path}",
              "--num_updates=1", "--rollout_batch_size=8", "--micro_batch_size=8", "--response_length=6",
              "--eval_prompts=8", "--eval_every=100", "--log_every=1"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    logged = [r["val/mismatch_kl"] for r in rows if "val/mismatch_kl" in r]
    assert logged and 0 <= logged[0] < 1e-10  # the fp32 CPU run is exact
