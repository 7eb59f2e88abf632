"""ppo.py as a whole: the first PPO ratio is 1 (left padding, bf16), the score and the no-EOS penalty land
where they should, presets run and are overridable, resume is exact, and 2 processes equal 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import ppo
from model import generate
from runtime import Dist, apply_preset

ROOT = Path(__file__).resolve().parents[1]


def rollout(policy, tok, cfg, seed=1):  # seed 1: two of six responses stop at EOS (checked below)
    """Left-padded prompts of different lengths, sampled responses (some stop at EOS, some not)."""
    prompts = ["ab=", "cdefgh=", "p=", "abcdefgh=", "mno=", "ij="]
    ids, mask = data.pad_left([tok.encode(p) for p in prompts], tok.eos_id)
    qr, logp = generate(policy, ids, mask, cfg.response_length, temperature=cfg.temperature, eos_id=tok.eos_id,
                        pad_id=tok.eos_id, generator=torch.Generator().manual_seed(seed))
    return qr, mask, logp


def setup(checkpoints, **overrides):
    cfg = ppo.Config(sft=str(checkpoints / "sft"), reward_model=str(checkpoints / "rm"), response_length=8,
                     temperature=0.7, num_ppo_epochs=1, rollout_batch_size=6, micro_batch_size=6, lr=1e-3,
                     **overrides)
    d = Dist()
    policy, ref, rm, critic = ppo.build_models(cfg, d)
    trainable = torch.nn.ModuleDict({"policy": policy} | ({"critic": critic} if critic is not None else {}))
    optimizer = ppo.make_optimizer(policy, critic, cfg)
    return cfg, d, policy, ref, rm, critic, trainable, optimizer


def first_update_stats(checkpoints, bf16=False, **overrides):
    cfg, d, policy, ref, rm, critic, trainable, optimizer = setup(checkpoints, **overrides)
    tok = data.get_tokenizer("char")
    qr, mask, logp = rollout(policy, tok, cfg)
    bf16_cpu = lambda d, enabled=True: torch.autocast("cpu", dtype=torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        if bf16:  # bf16 autocast on CPU for every forward pass of make_experience and ppo_update
            mp.setattr(ppo, "autocast", bf16_cpu)
        exp = ppo.make_experience(policy, critic, ref, rm, qr, mask, logp, cfg.kl_coef, tok, cfg, d)
        stats = ppo.ppo_update(policy, critic, trainable, optimizer, [g["lr"] for g in optimizer.param_groups], exp, 0, 10, cfg, d)
    return exp, stats


def test_first_ratio_is_one_fp32_sampling_logprobs(checkpoints):
    # Old log-probs from generation (KV cache, one token at a time) vs the update's full forward:
    # the same math in a different order, so equal up to float32 rounding.
    exp, stats = first_update_stats(checkpoints, old_logprobs="sampling")
    assert exp["action_mask"].sum() < exp["action_mask"].numel()  # some responses stopped early
    assert abs(stats["first_ratio"].item() - 1) < 1e-5
    assert stats["approxkl"].item() < 1e-10
    assert (exp["recomputed_logp"] - exp["logp"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("bf16", [False, True])
def test_first_ratio_is_exactly_one_with_recomputed_logprobs(checkpoints, bf16):
    # Recomputing the old log-probs with the update's own forward makes the first ratio exactly 1,
    # in bf16 too (minimind #813: log-softmax inside autocast for one side only gave a 1e-2 bias).
    exp, stats = first_update_stats(checkpoints, bf16=bf16, old_logprobs="recompute")
    assert stats["first_ratio"].item() == 1.0
    assert stats["approxkl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0


def test_bf16_sampling_logprobs_differ_and_are_reported(checkpoints):
    """Under bf16 the sampling log-probs (here from float32 generation) and the update's bf16 recompute differ
    (TRL has the same issue); make_experience exposes both, and their gap is what ppo.main logs as
    val/logprob_recompute_maxdiff. In float32 the gap is rounding; in bf16 it is large enough to move the ratio."""
    fp32, _ = first_update_stats(checkpoints, old_logprobs="sampling")
    bf16, stats = first_update_stats(checkpoints, bf16=True, old_logprobs="sampling")
    maxdiff = lambda e: ((e["recomputed_logp"] - e["logp"]) * e["action_mask"]).abs().max().item()  # as ppo.main
    assert torch.equal(fp32["logp"], bf16["logp"])  # the same sampled log-probs: only the recompute changed
    assert maxdiff(fp32) < 1e-5  # measured 4.8e-7
    assert 1e-4 < maxdiff(bf16) < 5e-2  # measured 2.0e-3: bf16 rounding of the recompute, reported
    assert abs(stats["first_ratio"].item() - 1) > 1e-6  # measured 3.1e-5: the first ratio is no longer 1
    assert (bf16["recomputed_logp"][~bf16["action_mask"]] == 0).all()  # padding stays out of the logged gap


def test_score_on_eos_and_missing_eos_penalty(checkpoints):
    cfg, d, policy, ref, rm, critic, *_ = setup(checkpoints, missing_eos_penalty=-7.0, kl_coef=0.0)
    tok = data.get_tokenizer("char")
    prompt_ids, prompt_mask = data.pad_left([tok.encode("ab="), tok.encode("abc=")], tok.eos_id)
    eos, a = tok.eos_id, tok.encode("a")[0]
    responses = torch.tensor([[a, a, eos, eos], [a, a, a, a]])  # row 0 stops at index 2, row 1 never stops
    qr = torch.cat([prompt_ids, responses], 1)
    exp = ppo.make_experience(policy, critic, ref, rm, qr, prompt_mask, torch.zeros(2, 4), 0.0, tok, cfg, d)
    assert exp["action_mask"].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert exp["ended"].tolist() == [True, False]
    assert exp["scores"][1].item() == -7.0  # replaced, the default convention
    assert exp["scores"][0].item() != -7.0
    # With beta = 0 the per-token reward is the score alone, on the EOS token (index 2) / the last token.
    expected = torch.zeros(2, 4)
    expected[0, 2], expected[1, 3] = exp["scores"][0], -7.0
    assert torch.equal(exp["rewards"], expected)

    cfg.score_position = "after_eos"  # TRL / N+: one slot later, inside the value mask only
    exp = ppo.make_experience(policy, critic, ref, rm, qr, prompt_mask, torch.zeros(2, 4), 0.0, tok, cfg, d)
    assert exp["rewards"][0, 3] == exp["scores"][0] and exp["value_mask"][0].tolist() == [True] * 4


def test_presets_fill_every_knob_and_flags_override():
    for name, preset in ppo.PRESETS.items():
        cfg = ppo.parse_config(ppo.Config, ["--lr=0.123"], **dict(preset, preset=name))
        ppo.validate(cfg)
        assert cfg.lr == 0.123  # the explicit flag wins
        for key, value in preset.items():
            if key != "lr":
                assert getattr(cfg, key) == value, (name, key)
    with pytest.raises(SystemExit, match="unknown preset"):
        apply_preset(["--preset=nope"], ppo.PRESETS)
    with pytest.raises(SystemExit, match="kl_location"):
        ppo.validate(ppo.Config(kl_location="rewards"))


def test_docs_preset_table_matches_code():
    doc = (ROOT / "docs" / "conventions.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[2:-1]]
            for line in doc.splitlines() if line.startswith("| `") and line.count("|") == len(ppo.PRESETS) + 3}
    defaults = ppo.Config()
    assert rows, "docs/conventions.md has no preset table"
    for key, cells in rows.items():
        expected = [str(getattr(defaults, key))] + [str(p.get(key, getattr(defaults, key))) for p in ppo.PRESETS.values()]
        assert cells == expected, key


def test_two_ppo_epochs_on_the_toy_profile_four_on_real_data():
    """The built-in task takes 2 epochs per rollout (docs/lab.md: as much gold as 4, at lower KL, in about two
    thirds of the time); real data keeps TRL's 4 (ppo_config.py), as docs/real-model.md's runs used; explicit
    flags still win."""
    from runtime import parse_config
    assert parse_config(ppo.Config, [], {"real": ppo.REAL_DATA}).num_ppo_epochs == 2
    assert parse_config(ppo.Config, ["--dataset=hh.jsonl"], {"real": ppo.REAL_DATA}).num_ppo_epochs == 4
    explicit = parse_config(ppo.Config, ["--dataset=hh.jsonl", "--num_ppo_epochs=1"], {"real": ppo.REAL_DATA})
    assert explicit.num_ppo_epochs == 1


@pytest.mark.parametrize("preset", sorted(ppo.PRESETS))
def test_each_preset_runs_one_update(checkpoints, tmp_path, preset):
    ppo.main([f"--preset={preset}", f"--sft={checkpoints / 'sft'}", f"--reward_model={checkpoints / 'rm'}",
              f"--run_dir={tmp_path / preset}", "--num_updates=1", "--rollout_batch_size=8", "--micro_batch_size=8",
              "--num_minibatches=1", "--response_length=6", "--eval_prompts=8", "--eval_every=1"])
    rows = [json.loads(line) for line in open(tmp_path / preset / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(v)) for r in rows for k, v in r.items() if isinstance(v, float))
    assert (tmp_path / preset / "final" / "policy" / "model.safetensors").exists()


def ppo_args(checkpoints, run_dir, *extra):
    return [f"--sft={checkpoints / 'sft'}", f"--reward_model={checkpoints / 'rm'}", f"--run_dir={run_dir}",
            "--num_updates=4", "--rollout_batch_size=8", "--micro_batch_size=4", "--response_length=6",
            "--eval_prompts=8", "--eval_every=2", "--save_every=100", "--adaptive_kl", "--ptx_coef=0.1", *extra]


def test_resume_is_exact(checkpoints, tmp_path):
    ppo.main(ppo_args(checkpoints, tmp_path / "a"))
    ppo.main(ppo_args(checkpoints, tmp_path / "b", "--stop_after=2"))
    ppo.main(ppo_args(checkpoints, tmp_path / "b", "--resume"))
    for model in ("policy", "critic"):
        a = load_file(str(tmp_path / "a" / "final" / model / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / "final" / model / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), model
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in open(path)]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")


@pytest.mark.slow
def test_two_processes_equal_one(checkpoints, tmp_path):
    """The same fixed rollout: 2 ranks x 4 rows under FSDP2 (gloo) vs 1 process x 8 rows (2 micro-batches)."""
    helper, env = str(ROOT / "tests" / "ppo_dist_helper.py"), {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, helper, str(checkpoints), str(tmp_path / "one.pt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", helper, str(checkpoints),
                          str(tmp_path / "two.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    start = {f"policy.{k}": v for k, v in load_file(str(checkpoints / "sft" / "policy" / "model.safetensors")).items()}
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved < 2e-5, moved  # AdamW on float32 reductions in another order; see tests/test_distributed.py
    assert any(not torch.allclose(a["policy.transformer.wte.weight"], start["policy.transformer.wte.weight"]) for _ in [0])
