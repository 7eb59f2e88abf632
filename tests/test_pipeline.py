"""launch.sh end to end at a tiny size: every stage's checkpoint is produced and consumed, the report's
numbers are present and finite, a failing stage names itself, and a re-run skips finished stages."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "SFT_ARGS": "--model_size=tiny --max_steps=30 --eval_every=30 --save_every=30 --max_train_examples=512 "
                "--eval_examples=32 --batch_size=16 --micro_batch_size=16",
    "RM_ARGS": "--max_steps=10 --eval_every=10 --save_every=10 --max_train_examples=256 --eval_examples=32 "
               "--batch_size=16 --micro_batch_size=16 --normalize_examples=32",
    "PPO_ARGS": "--num_updates=3 --eval_every=3 --save_every=3 --rollout_batch_size=16 --micro_batch_size=16 "
                "--eval_prompts=32",
    "DPO_ARGS": "--max_steps=4 --eval_every=4 --save_every=4 --max_train_examples=128 --eval_examples=32 "
                "--batch_size=16 --micro_batch_size=16",
}


def run_launch(tmp_path, *args, extra_env=None):
    env = {**os.environ, **TINY, "RUN_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run(["bash", str(ROOT / "launch.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    out = run_launch(tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = tmp_path / "runs"
    for stage, model in (("sft", "policy"), ("rm", "reward"), ("ppo", "policy"), ("ppo", "critic")):
        assert (runs / stage / "final" / model / "model.safetensors").exists(), (stage, model)
        assert (runs / stage / "DONE").exists()
    # Each stage consumed the previous one's checkpoint (recorded in its saved config).
    rm_cfg = json.load(open(runs / "rm" / "final" / "run_config.json"))
    ppo_cfg = json.load(open(runs / "ppo" / "final" / "run_config.json"))
    assert rm_cfg["sft"] == str(runs / "sft" / "final")
    assert ppo_cfg["sft"] == str(runs / "sft" / "final") and ppo_cfg["reward_model"] == str(runs / "rm" / "final")

    report = json.load(open(runs / "report" / "report.json"))
    assert set(report["policies"]) == {"sft", "ppo"}
    for row in report["policies"].values():
        for key in ("gold_reward", "learned_reward", "kl_to_reference", "response_length", "eos_fraction"):
            assert math.isfinite(row[key]), key
    assert "accuracy" in report["reward_model"] and math.isfinite(report["reward_model"]["accuracy"])
    assert set(report["stage_seconds"]) == {"sft", "rm", "ppo"}
    assert report["samples"] and "ppo" in report["samples"][0]["responses"]
    assert (runs / "report" / "report.md").read_text().startswith("# RLHF pipeline report")

    # Re-running skips every finished stage.
    again = run_launch(tmp_path)
    assert again.returncode == 0
    assert again.stdout.count("already done") == 3
    # ... but not one whose arguments changed: that is refused, naming both, unless REDO=1.
    changed = run_launch(tmp_path, extra_env={"PPO_ARGS": TINY["PPO_ARGS"] + " --kl_coef=0.2"})
    assert changed.returncode == 1 and "stage 'ppo' finished with other arguments" in changed.stderr
    assert "--kl_coef=0.2" in changed.stderr and (runs / "ppo" / "DONE").exists()


@pytest.mark.slow
def test_failing_stage_stops_pipeline_and_names_it(tmp_path):
    out = run_launch(tmp_path, extra_env={"RM_ARGS": TINY["RM_ARGS"] + " --no_such_flag=1"})
    assert out.returncode != 0
    assert "stage 'rm' failed" in out.stderr
    assert (tmp_path / "runs" / "sft" / "DONE").exists()  # kept for the re-run
    assert not (tmp_path / "runs" / "ppo").exists()


def test_mistyped_mode_is_refused_before_any_stage(tmp_path):
    out = run_launch(tmp_path, "dpp")
    assert out.returncode == 2 and "unknown mode 'dpp'" in out.stderr
    assert not (tmp_path / "runs" / "sft").exists()  # before: SFT and the RM trained first, then usage


HH_TEST = ROOT.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
LIMITS = "--max_prompt_tokens=48 --max_response_tokens=16"  # tiny's context is 64 tokens
HH_TINY = {
    "SFT_DATA": str(HH_TEST), "PREF_DATA": str(HH_TEST), "PROMPT_DATA": str(HH_TEST),
    "SFT_ARGS": f"--model_size=tiny --max_steps=20 --eval_every=20 --save_every=20 --eval_examples=32 --batch_size=16 "
                f"--micro_batch_size=16 --lr=2e-3 {LIMITS}",
    "RM_ARGS": f"--max_steps=10 --eval_every=10 --save_every=10 --eval_examples=64 --batch_size=16 --micro_batch_size=16 "
               f"--normalize_examples=256 {LIMITS}",
    "PPO_ARGS": "--num_updates=2 --eval_every=2 --save_every=2 --rollout_batch_size=16 --micro_batch_size=16 "
                "--eval_prompts=32 --max_prompt_tokens=48 --response_length=16",
    "DPO_ARGS": f"--max_steps=2 --eval_every=2 --save_every=2 --eval_examples=32 --batch_size=16 --micro_batch_size=16 "
                f"--eval_prompts=16 {LIMITS}",
}


@pytest.mark.slow
@pytest.mark.skipif(not HH_TEST.exists(), reason=f"{HH_TEST} is absent (the shared HH-RLHF test split)")
def test_hh_pipeline_holds_out_the_same_prompts_in_every_stage(tmp_path):
    """The real-data path end to end on HH-RLHF with the GPT-2 BPE. Before, SFT trained on the whole file while
    the RM and DPO held out records of it, and PPO and the report evaluated on training prompts."""
    for mode in ("dpo", "pipeline"):
        out = run_launch(tmp_path, mode, extra_env=HH_TINY)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = tmp_path / "runs"
    manifests = {stage: json.load(open(runs / stage / "prompts.json")) for stage in ("sft", "rm", "dpo", "ppo")}
    manifests["report"] = json.load(open(runs / "report" / "prompts.json"))
    trained = set().union(*(set(m["train"]) for m in manifests.values()))
    for stage, m in manifests.items():
        assert m["heldout"] and not set(m["heldout"]) & trained, f"{stage} evaluates on prompts some stage trained on"
    # The report scores with the limits the stages used, so the RM's normalization holds: the SFT policy's mean
    # learned reward is 0 up to sampling noise (it read 1.83 on 12-token prompts before).
    report = json.load(open(runs / "report" / "report.json"))
    sft = report["policies"]["sft"]
    assert abs(sft["learned_reward"]) < 3 * sft["learned_reward_se"] + 0.05, sft
    assert "prompts cut to 48 tokens, up to 16 new tokens" in out.stdout


@pytest.mark.slow
def test_ablate_ensemble_tiny_trains_loads_and_scores_with_two_members(tmp_path):
    """launch.sh ablate-ensemble with --ensemble_size=2 at tiny size: each member is a normal RM checkpoint that
    loads alone, member 0 is the single RM bit for bit (same flags, seed), PPO loads the ensemble from its run
    directory, and the report, its bars and the sqrt(KL) curves come out."""
    from safetensors.torch import load_file
    from model import GPT
    out = run_launch(tmp_path, "ablate-ensemble", extra_env={"ENSEMBLE_SIZE": "2", "ENSEMBLE_BETAS": "0"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = tmp_path / "runs"
    manifest = json.load(open(runs / "rm_ens" / "ensemble.json"))
    assert [m["path"] for m in manifest["members"]] == ["member_0/final", "member_1/final"]
    for m in manifest["members"]:
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["accuracy_gold"] <= 1
        assert GPT.from_pretrained(str(runs / "rm_ens" / m["path"] / "reward")).config.scalar_head
    assert "member 1 (seed 1): held-out accuracy" in out.stdout
    single = load_file(runs / "rm" / "final" / "reward" / "model.safetensors")
    members = [load_file(runs / "rm_ens" / f"member_{k}" / "final" / "reward" / "model.safetensors") for k in (0, 1)]
    assert all(torch.equal(single[k], members[0][k]) for k in single)
    assert not torch.equal(single["score.weight"], members[1]["score.weight"])
    cfg = json.load(open(runs / "ens_uwo_beta0" / "final" / "run_config.json"))
    assert cfg["reward_model"] == str(runs / "rm_ens") and cfg["reward_ensemble"] == "uwo"
    report = json.load(open(runs / "ablate_ensemble" / "report.json"))
    assert set(report["policies"]) == {"sft", "single@0", "mean@0", "min@0", "uwo@0"}
    for row in report["policies"].values():
        assert math.isfinite(row["gold_reward"]) and math.isfinite(row["learned_reward"])
    for png in ("bars.png", "gao.png"):
        assert (runs / "ablate_ensemble" / png).stat().st_size > 1000
