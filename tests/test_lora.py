"""LoRA (model.LoRALinear) against PEFT's own code, and the invariants REFERENCES 6.2 asks for:

- a fresh adapter is a no-op; adapters switched off give the base model; merged == unmerged (float32);
- parity with PEFT: the same base weights and the same A, B (written by save_peft_adapter, read by
  peft.PeftModel.from_pretrained on the HF model) give the same logits and the same gradients of every A and B,
  on GPT-2 (Conv1D, fan_in_fan_out) and on the Llama family with fused q/k/v and gate/up partly adapted;
- the merged export loads in transformers with the same logits; the adapter round-trips.
"""

import os

import pytest
import torch

from model import GPT, BaseModel, load_peft_adapter, lora_disabled, merge_lora, save_peft_adapter, train_lora_only

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def no_torchao(monkeypatch):
    """PEFT 0.21 refuses torchao < 0.16 when it checks for quantized layers; torchtune 0.6.1 (tests/framework_code.py)
    needs torchao 0.11 installed. Nothing here is quantized, so PEFT is told torchao is absent."""
    import peft.tuners.lora.torchao
    import peft.utils.quantization_utils
    for module in (peft.tuners.lora.torchao, peft.utils.quantization_utils):
        monkeypatch.setattr(module, "is_torchao_available", lambda: False, raising=False)

VOCAB = 101


def hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif family == "llama":  # GQA (6 query heads, 2 kv), untied
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False)
    else:  # qwen2: q/k/v biases, tied
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                       num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=64,
                                       tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    dirs = {}
    for i, family in enumerate(("gpt2", "llama", "qwen2")):
        dirs[family] = str(tmp_path_factory.mktemp(family))
        hf_model(family, seed=i).save_pretrained(dirs[family])
    return dirs


def lora_model(directory, targets="all", rank=4, alpha=8.0, seed=0):
    """Ours with adapters whose B is drawn at random too (a fresh B = 0 would hide a wrong A or a wrong scale)."""
    torch.manual_seed(seed)
    model = GPT.from_pretrained(directory, lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def batch(T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, T), generator=g)


CASES = [("gpt2", "all"), ("llama", "q_proj,v_proj,up_proj,down_proj"), ("qwen2", "all")]


@pytest.mark.parametrize("family,targets", CASES)
def test_fresh_adapter_is_a_noop_and_disabled_is_the_base(base_dirs, family, targets):
    base = GPT.from_pretrained(base_dirs[family]).eval()
    fresh = GPT.from_pretrained(base_dirs[family], lora_rank=4, lora_targets=targets).eval()
    ids = batch()
    with torch.no_grad():
        expected = base(ids)
        assert torch.equal(fresh(ids), expected)  # B = 0 at init (PEFT, torchtune)
        trained = lora_model(base_dirs[family], targets).eval()
        assert (trained(ids) - expected).abs().max() > 1e-3  # the adapters do something...
        with lora_disabled(trained):
            assert torch.equal(trained(ids), expected)  # ...and nothing once switched off
        assert torch.equal(BaseModel(trained)(ids), expected)
        assert (trained(ids) - expected).abs().max() > 1e-3  # switched on again on exit
    assert list(BaseModel(trained).parameters()) == []  # the reference owns no weights: nothing to copy or offload


@pytest.mark.parametrize("family,targets", CASES)
def test_peft_parity_outputs_and_adapter_gradients(base_dirs, family, targets, tmp_path):
    """Same base, same A and B: PEFT's forward and ours agree, and so do the gradients of every A and B."""
    ours = lora_model(base_dirs[family], targets).eval()
    _, adapters = merge_lora(ours.state_dict(), ours.config)
    save_peft_adapter(str(tmp_path), ours.config, adapters)
    theirs = peft.PeftModel.from_pretrained(hf_model(family).from_pretrained(base_dirs[family], attn_implementation="eager"),
                                            str(tmp_path), is_trainable=True).eval()
    ids = batch()
    weights = torch.randn(2, 12, VOCAB, generator=torch.Generator().manual_seed(5))
    logits_ours, logits_theirs = ours(ids), theirs(input_ids=ids).logits
    torch.testing.assert_close(logits_ours, logits_theirs, atol=1e-5, rtol=1e-5)
    (logits_ours * weights).sum().backward()
    (logits_theirs * weights).sum().backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if "lora_" in n}
    assert grads_theirs and all(g is not None for g in grads_theirs.values())
    # Re-stack PEFT's per-projection gradients into our layout, through the same naming the adapter file uses.
    grads_theirs = {n.replace(".default.weight", ".weight"): g for n, g in grads_theirs.items()}
    adapters_grad = {n: p.grad for n, p in ours.named_parameters() if ".lora_" in n}
    save_peft_adapter(str(tmp_path / "grads"), ours.config, adapters_grad)
    from safetensors.torch import load_file
    ours_by_peft_name = load_file(str(tmp_path / "grads" / "adapter_model.safetensors"))
    assert set(ours_by_peft_name) == set(grads_theirs)
    for name, g in grads_theirs.items():
        # float32 sums in another order (and BLAS threading): the error is relative to the gradient's scale. 1e-4 of
        # it: two threads gave 1.0e-5 on Qwen2's k_proj; every bug this catches (scale, merge, adapters on/off) is >= 1e-1
        assert (ours_by_peft_name[name] - g).abs().max() <= 1e-4 * g.abs().max(), name


@pytest.mark.parametrize("family,targets", CASES)
def test_merged_export_loads_in_transformers_with_the_same_logits(base_dirs, family, targets, tmp_path):
    ours = lora_model(base_dirs[family], targets).eval()
    ids = batch()
    with torch.no_grad():
        before = ours(ids)
    ours.save_pretrained(str(tmp_path))  # merged model.safetensors + adapter/
    ours.save_pretrained(str(tmp_path))  # twice: an in-place merge would now be counted twice (PEFT PR #1355)
    with torch.no_grad():
        assert torch.equal(ours(ids), before)  # exporting left the model's base and adapters as they were
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=1e-5)
        # merged == unmerged in float32, and reloading the merged export with ours gives it too (no double merge)
        torch.testing.assert_close(GPT.from_pretrained(str(tmp_path))(ids), ours(ids), atol=1e-5, rtol=1e-5)
    back = load_peft_adapter(str(tmp_path / "adapter"), ours.config)
    for name, p in ours.named_parameters():
        if ".lora_" in name:
            assert torch.equal(back[name], p.detach())


def test_only_adapters_and_named_heads_train(base_dirs):
    model = GPT.from_pretrained(base_dirs["qwen2"], lora_rank=2, scalar_head=True)
    trained = train_lora_only(model, also=("score.",))
    assert trained and all(".lora_" in n or n.startswith("score.") for n in trained)
    assert {"score.weight", "score.bias"} <= set(trained)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    # rank 2 on q, k, v, o, gate, up, down of 2 layers: r * (in + out) per projection
    q, kv, C, inter = 48, 24, 48, 72
    assert n_lora == 2 * 2 * ((C + q) + 2 * (C + kv) + (q + C) + 2 * (C + inter) + (inter + C))


def test_bad_flags_name_the_flag(base_dirs):
    from types import SimpleNamespace

    from model import lora_flags
    with pytest.raises(ValueError, match="--lora_targets"):
        GPT.from_pretrained(base_dirs["llama"], lora_rank=2, lora_targets="c_attn")
    for rank, alpha, dropout in ((-1, 16.0, 0.0), (4, 0.0, 0.0), (4, 16.0, 1.0)):
        with pytest.raises(SystemExit, match="--lora_rank"):
            lora_flags(SimpleNamespace(lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout, lora_targets="all"))


# -----------------------------------------------------------------------------
# The stages with --lora_rank: exact resume, the reference is the base with adapters off, a head trained in full


def same_files(a_dir, b_dir):
    from safetensors.torch import load_file
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(f"{a_dir}/{name}"), load_file(f"{b_dir}/{name}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (a_dir, name)


LORA = ["--lora_rank=4", "--lora_alpha=8"]


def test_sft_lora_trains_adapters_only_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file
    from test_sft import metric_rows, run_sft
    lora = dict(lora_rank=4, lora_alpha=8, lr=1e-2)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_sft(straight, max_steps=6, **lora)
    run_sft(split, max_steps=6, stop_after=3, **lora)
    run_sft(split, max_steps=6, resume=True, **lora)
    same_files(f"{straight}/final/policy", f"{split}/final/policy")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]
    assert strip(metric_rows(straight)) == strip(metric_rows(split))
    # Only adapters moved: the merged export minus the adapters' B A is the scratch init of the same seed.
    adapter = load_file(f"{straight}/final/policy/adapter/adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
    base = GPT.from_pretrained(f"{straight}/final/policy", lora_rank=0)
    import dataclasses
    init = GPT(dataclasses.replace(base.config, lora_rank=4, lora_alpha=8))  # the same draws as the run's init
    init.init_weights(seed=0)
    merged = base.state_dict()
    for k, v in init.state_dict().items():
        if ".lora_" not in k and not k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            assert torch.equal(merged[k], v), k  # embeddings, norms, biases untouched


def test_dpo_lora_reference_is_the_base_with_adapters_off(tmp_path):
    import dpo
    from test_dpo import metric_rows, tiny_args, tiny_sft
    sft = tiny_sft(tmp_path / "sft")
    dpo.main(tiny_args(sft, tmp_path / "straight", *LORA))
    dpo.main(tiny_args(sft, tmp_path / "split", *LORA, "--stop_after=4"))
    dpo.main(tiny_args(sft, tmp_path / "split", *LORA, "--resume"))
    same_files(tmp_path / "straight/final/policy", tmp_path / "split/final/policy")
    train = [r for r in metric_rows(tmp_path / "straight") if "train/loss" in r]
    # Step 1, before any update: B = 0, so policy == base == reference and the loss is exactly log 2.
    assert train[0]["train/loss"] == pytest.approx(0.6931471805599453, abs=1e-6) and train[0]["rewards/margins"] == 0.0
    assert train[-1]["rewards/margins"] > 0  # the adapters learned; the reference (the base) did not move with them


def test_reward_model_lora_trains_the_head_in_full(tmp_path):
    import reward_model
    from test_dpo import tiny_sft
    sft = tiny_sft(tmp_path / "sft")
    reward_model.main([f"--sft={sft}", f"--run_dir={tmp_path / 'rm'}", "--max_train_examples=48", "--batch_size=16",
                       "--micro_batch_size=8", "--max_steps=3", "--eval_examples=16", "--normalize_on=none",
                       "--device=cpu", "--lr=1e-2", *LORA])
    rm, trunk = GPT.from_pretrained(str(tmp_path / "rm/final/reward")), GPT.from_pretrained(sft + "/policy")
    assert rm.config.scalar_head and os.path.exists(tmp_path / "rm/final/reward/adapter/adapter_model.safetensors")
    ours = rm.state_dict()
    for k, v in trunk.state_dict().items():  # the frozen base: everything but the adapted projections is the SFT's
        if not k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            assert torch.equal(ours[k], v), k
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.weight"], trunk.state_dict()["transformer.h.0.attn.c_attn.weight"])


def test_ppo_lora_runs_with_a_shared_base_reference_and_resumes_exactly(checkpoints, tmp_path):
    import ppo
    from test_ppo import ppo_args
    short = [*LORA, "--num_updates=2", "--eval_every=100"]  # later flags win over ppo_args' own
    ppo.main(ppo_args(checkpoints, tmp_path / "a", *short))
    ppo.main(ppo_args(checkpoints, tmp_path / "b", *short, "--stop_after=1"))
    ppo.main(ppo_args(checkpoints, tmp_path / "b", *short, "--resume"))
    for model in ("policy", "critic"):
        same_files(tmp_path / "a/final" / model, tmp_path / "b/final" / model)
    import json
    rows = [json.loads(line) for line in open(tmp_path / "a/metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(v)) for r in rows for v in r.values() if isinstance(v, float))


@pytest.mark.slow
def test_dpo_lora_under_fsdp2_matches_one_process(tmp_path):
    """torchrun, 2 ranks, gloo: the policy is built on the meta device with its adapters, sharded, loaded shard by
    shard (runtime.load_model), frozen but for the adapters before fully_shard; the reference is its base with the
    adapters off, under FSDP2 too. The adapters and metrics equal one process's."""
    import subprocess
    import sys
    from pathlib import Path

    import dpo
    from safetensors.torch import load_file
    from test_dpo import metric_rows, tiny_args, tiny_sft
    root = Path(__file__).resolve().parents[1]
    sft = tiny_sft(tmp_path / "sft")
    one, two = tmp_path / "one", tmp_path / "two"
    dpo.main(tiny_args(sft, one, *LORA))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dpo.py",
           *tiny_args(sft, two, *LORA, "--micro_batch_size=4")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for key in ("train/loss", "rewards/margins", "grad_norm", "eval/loss", "eval/kl"):
        a, b = ([r[key] for r in metric_rows(run) if key in r] for run in (one, two))
        assert len(a) == len(b) > 0 and a == pytest.approx(b, rel=1e-4, abs=1e-6), key
    a, b = (load_file(str(run / "final/policy/adapter/adapter_model.safetensors")) for run in (one, two))
    assert a.keys() == b.keys()
    for key in a:  # AdamW over float32 reductions in another order (test_dpo.py's 1e-5)
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    assert any(v.abs().max() > 1e-3 for k, v in a.items() if "lora_B" in k)  # it trained


def test_memory_plan_with_lora_holds_no_reference_and_trains_adapters_only():
    """bench.py plan's LoRA rows, by hand on a tiny GPT-2: weights are the float32 bases plus adapters of the policy
    and critic and the bf16 reward model (no reference); gradients and AdamW are the adapters' and the value head's."""
    import bench
    from model import config_for
    config = config_for("tiny", vocab_size=64)  # 2 layers, width 32: per layer r (32 + 96) + r (32 + 32) + r (32 + 128) + r (128 + 32)
    r = 4
    adapters = 2 * r * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    base, head = bench.count_parameters(config)[0], 32 + 1
    plan = bench.memory_plan(config, "PPO", 1, 2, 8, 4, 8, lora_rank=r)
    assert plan["weights"] == 4 * (base + adapters) + 4 * (base + head + adapters) + 2 * (base + head)
    assert plan["grads"] == 4 * (2 * adapters + head)
    full = bench.memory_plan(config, "PPO", 1, 2, 8, 4, 8)
    assert full["weights"] - plan["weights"] == 2 * base - 8 * adapters  # the bf16 reference is gone
