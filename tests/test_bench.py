"""bench.py runs each measurement end to end at a toy size and writes its result lines. No timing is
asserted: timings belong to the machine (BENCHMARKS.md)."""

import json

import pytest

import bench

TOY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--vocab_size=64", "--block_size=64", "--repeats=1",
       "--warmup=1", "--threads=1", "--device=cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("command, extra", [
    ("train_step", ["--train_batch=2", "--train_seq_len=16"]),
    ("sft", ["--sft_batch=2", "--sft_prompt_len=6", "--sft_response_len=4"]),
    ("generate", ["--gen_batch=2", "--gen_prompt_len=4", "--gen_lengths=4,8", "--nocache_lengths=4"]),
    ("ppo_iteration", ["--ppo_batch=4", "--ppo_prompt_len=4", "--ppo_response_length=4", "--ppo_epochs=1",
                       "--ppo_updates=1"]),
    ("mfu", []),  # CPU: a line saying it was not measured
])
def test_command_writes_result_lines(tmp_path, command, extra):
    results = tmp_path / "results.jsonl"
    bench.main([command, *TOY, *extra, f"--results={results}"])
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert lines and all(line["bench"] == command for line in lines)
    assert all(len(line["loadavg_start"]) == 3 and line["env"]["torch"] for line in lines)
    if command in ("train_step", "sft"):  # same weights on both sides: the same initial loss
        assert lines[0]["initial_loss_absdiff"] < 1e-4
    if command == "ppo_iteration":
        assert {line["impl"] for line in lines} == {"ours", "trl"}


def test_ppo_model_bytes_counts_adamw_state():
    from model import config_for
    rows = {r["role"]: r for r in bench.ppo_model_bytes(config_for("tiny", vocab_size=64), cuda=False)}
    assert rows["policy"]["adamw_MiB"] == pytest.approx(2 * rows["policy"]["params_MiB"], rel=1e-3)  # exp_avg, exp_avg_sq
    assert rows["reference"]["grads_MiB"] == 0 and rows["reward"]["adamw_MiB"] == 0


@pytest.mark.slow  # compiles the decode step (~20 s on a 2-core CPU)
def test_generate_compiled_writes_result_lines(tmp_path):
    results = tmp_path / "results.jsonl"
    bench.main(["generate_compiled", *TOY, "--gen_batch=2", "--gen_prompt_len=4", "--gen_lengths=4",
                f"--results={results}"])
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert {line["impl"] for line in lines} == {"ours_kv", "ours_kv_compiled", "hf_generate"}
    assert all(line["bench"] == "generate_compiled" for line in lines)
    compiled = next(line for line in lines if line["impl"] == "ours_kv_compiled")
    assert compiled["same_tokens_as_eager"] is True and compiled["compile_s"] > 0


@pytest.mark.slow
def test_grpo_iteration_writes_result_lines(tmp_path):
    results = tmp_path / "results.jsonl"
    bench.main(["grpo_iteration", *TOY, "--ppo_batch=8", "--ppo_prompt_len=4", "--ppo_response_length=4",
                "--ppo_epochs=2", "--ppo_updates=1", f"--results={results}"])
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [line["impl"] for line in lines] == ["ours", "trl"]
    assert all(line["bench"] == "grpo_iteration" and line["rollout_s"] > 0 and line["update_s"] > 0 for line in lines)
    assert lines[0]["case"].endswith("2 prompts x G4 P4 N4 epochs2") and lines[1]["trl_setup_s"] > 0
