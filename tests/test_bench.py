"""bench.py runs each measurement end to end at a toy size and writes its result lines. No timing is
asserted: timings belong to the machine (docs/benchmarks.md)."""

import dataclasses
import json

import pytest
import torch

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


# -----------------------------------------------------------------------------
# The memory plan (bench.py plan) against what the models hold and what autograd saves


@pytest.mark.parametrize("cuda", [False, True])
def test_plan_state_bytes_equal_ppo_model_bytes(cuda):
    """The plan's weights + gradients + AdamW bytes (from the configs, on the meta device, dtypes from
    runtime.precision) equal what ppo_model_bytes counts on real models after one AdamW step, exactly, for all
    four PPO models (CPU: everything float32; CUDA: frozen models bf16)."""
    from model import config_for
    from runtime import precision
    config = config_for("tiny", vocab_size=64)
    measured = {r["role"]: r for r in bench.ppo_model_bytes(config, cuda=cuda)}
    for role, trainable, scalar in bench.PLAN_METHODS["PPO"]:
        numel, tensors = bench.count_parameters(config, scalar)
        dtype = precision("cuda" if cuda else "cpu", False, True, trainable).weights
        plan = bench.model_state_bytes(numel, tensors, trainable, dtype)
        got = {k: measured[role][f"{k}_MiB"] * 2**20 for k in ("params", "grads", "adamw")}
        assert (plan["weights"], plan["grads"], plan["adamw"]) == (got["params"], got["grads"], got["adamw"]), role


def test_plan_shards_every_model_over_the_gpus():
    from model import config_for
    config = config_for("tiny", vocab_size=64)
    one, eight = (bench.memory_plan(config, "PPO", n, 2, 8, 4, 8) for n in (1, 8))
    for key in ("weights", "grads", "adamw"):
        assert eight[key] < one[key] / 7  # 1/8, plus AdamW's unsharded step scalars
    assert eight["activations"] == one["activations"]  # a micro-batch per GPU either way
    group = bench.memory_plan(config, "group", 1, 2, 8, 4, 8)
    assert one["grads"] - group["grads"] == 4 * bench.count_parameters(config, scalar_head=True)[0]  # no critic
    real, c = __import__("ppo").REAL_DATA, bench.Config()  # the plan's defaults are ppo.py's real-data profile
    assert (c.plan_micro_batch, c.plan_prompt_len, c.plan_response_len) == (
        real["micro_batch_size"], real["max_prompt_tokens"], real["response_length"])


TINY_FAMILIES = {
    "gpt2": dict(n_layer=3, n_head=4, n_embd=64, vocab_size=96, block_size=64),
    "qwen2": dict(model_type="qwen2", n_layer=3, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
                  vocab_size=96, qkv_bias=True, block_size=64),
    "qwen3": dict(model_type="qwen3", n_layer=3, n_head=4, n_kv_head=2, n_embd=64, head_dim=32, intermediate_size=96,
                  vocab_size=96, qk_norm=True, block_size=64),
}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("head", ["lm", "score"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_saved_tensors(family, head, checkpointing):
    """bench.activation_bytes against the bytes autograd really saves in one training forward of a bf16 GPT on CPU,
    as ppo_update runs it (response_logprobs for the policy, critic_values for the critic), no padding (SDPA's flash
    kernel). On CPU LayerNorm keeps its mean/rstd in bf16 (2 bytes; CUDA: float32), so norm_stat_bytes=2 here.
    With checkpointing the forward saves the block inputs and the head only; the one block that backward recomputes
    at a time comes on top later, so the saved bytes are the formula less one block (and less RoPE's cos/sin, which
    the checkpoints hold as arguments, out of the hook's sight). Measured: equal to the byte in all twelve cases."""
    import ppo
    from model import GPT, GPTConfig
    config = GPTConfig(**TINY_FAMILIES[family])
    model = GPT(dataclasses.replace(config, scalar_head=head == "score"))
    model.init_weights(seed=0)
    model.to(torch.bfloat16).train()
    model.gradient_checkpointing = checkpointing
    B, P, N = 3, 20, 12
    qr = torch.randint(0, config.vocab_size, (B, P + N), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(qr)
    if head == "lm":
        saved, _ = bench.saved_tensor_bytes(lambda: ppo.response_logprobs(model, qr, attn, P, 1.0), model)
    else:
        saved, _ = bench.saved_tensor_bytes(lambda: ppo.critic_values(model, qr, attn, P), model)
    formula = bench.activation_bytes(config, B, P + N, N, lm=head == "lm", checkpointing=checkpointing, act_bytes=2,
                                     norm_stat_bytes=2)
    if checkpointing:
        formula -= bench.block_saved_bytes(config, B * (P + N), act_bytes=2, norm_stat_bytes=2)
        if config.llama:  # RoPE's cos/sin reach each checkpoint as arguments: alive, but not saved through autograd
            formula -= 2 * B * (P + N) * config.head_dim * 2
    assert formula == saved, (formula, saved, formula / saved)


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    """`bench.py gpu --dry`: every part of the GPU check on CPU at toy sizes (torchrun with 2 gloo processes for the
    FSDP2 part, torch.compile with the aot_eager backend), one JSON with numbers in every section, all checks
    passed. Measured ~20 s on the 2-core CPU."""
    out = tmp_path / "gpu.json"
    bench.main(["gpu", "--dry", "--device=cpu", "--threads=1", f"--gpu_out={out}", f"--results={tmp_path / 'results.jsonl'}"])
    result = json.loads(out.read_text())
    assert result["dry"] and result["errors"] == []
    assert result["checks"] == {"first_ratio": True, "kv_cache": True, "fsdp": True}
    ratio = result["first_ratio"]
    for case in ("micro_batch_equal_rollout", "micro_batch_half"):
        assert ratio[case]["max_abs_ratio_minus_1"] == 0.0  # float32 on CPU: exact
    assert 0 < result["kv_cache"]["bfloat16"]["max_abs_logp_diff"] < 0.1  # bf16 on CPU: measured, not exact
    assert result["fsdp"]["world_size"] == 2 and result["fsdp"]["max_abs_weight_diff"] <= bench.FSDP_ATOL
    assert {row["impl"] for row in result["mfu"]} == {"eager", "torch.compile (aot_eager)"}
    assert all(row["tokens_per_s"] > 0 for row in result["mfu"])
    ppo_it = result["ppo_iteration"]
    for phase in ("rollout", "score", "update"):
        assert ppo_it["seconds"][phase] > 0 and ppo_it["peak_GiB"][phase] > 0
    assert ppo_it["plan_GiB"]["peak"] > 0
    assert {row["impl"] for row in result["rollout"]} == {"ours_kv", "hf_generate"}
    assert all(row["new_tokens_per_s"] > 0 for row in result["rollout"])
    assert {row["impl"] for row in result["rollout_compiled"]} == {"ours_kv", "ours_kv_compiled", "hf_generate"}
    assert all(row["same_tokens_as_eager"] for row in result["rollout_compiled"] if row["impl"] == "ours_kv_compiled")


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
