"""--bf16 on a CPU is opt-in (RLHF_CPU_BF16=1, runtime.cpu_bf16): without it the CPU stays float32 (the reference);
with it, frozen models get bf16 weights and trainable ones bf16 autocast, as on one CUDA process."""

import torch

import runtime
from runtime import Dist, Precision, autocast, precision


def test_cpu_stays_float32_without_the_opt_in(monkeypatch):
    monkeypatch.delenv("RLHF_CPU_BF16", raising=False)
    fp32 = Precision(torch.float32, None, None, False)
    assert precision("cpu", False, True, trainable=False) == fp32
    assert precision("cpu", False, True, trainable=True) == fp32
    with autocast(Dist(), True):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_cpu_bf16_opt_in_matches_the_cuda_decisions(monkeypatch):
    monkeypatch.setenv("RLHF_CPU_BF16", "1")
    monkeypatch.setattr(runtime, "_CPU_BF16_SAID", True)  # no stderr note in the test log
    for trainable in (False, True):
        assert precision("cpu", False, True, trainable) == precision("cuda", False, True, trainable)
    assert precision("cpu", False, False, trainable=True).weights == torch.float32  # --bf16=false still wins
    with autocast(Dist(), True):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(Dist(), False):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
