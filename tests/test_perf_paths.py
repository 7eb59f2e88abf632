"""The fast paths of issue #19 compute the same numbers as the slow ones they replace (fp32, CPU):

- GPT.forward(logits_from=k) equals the full forward's positions k.. for every head, GPT-2 and a Llama-family
  (Qwen3: GQA, QK-norm, untied) tiny model; so do ppo.response_logprobs / critic_values, evaluate.score_samples'
  KL, and the SFT loss with sft.loss_start, gradients included (1e-6);
- model.generate (preallocated sequence and mask, head on the last prompt position, stop checked every k tokens)
  returns the same tokens and log-probs as the implementation it replaced, copied below as `generate_before`,
  for fixed seeds, greedy and sampled, with top-k/top-p and early stops, whatever check_every;
- generate(compile_step=True) (a fixed-shape KV cache, the decode step through torch.compile) gives the same
  tokens as the eager path, greedy and seeded sampling, and log-probs to 1e-6; the step alone uncompiled too;
- runtime.adamw (fused on CPU) takes the same steps as torch's per-tensor AdamW to 1e-6 over 5 steps, for
  make_adamw and ppo.make_optimizer;
- make_experience(check_logprobs=False) skips only the diagnostic recompute: every training tensor is equal.
No timing is asserted here (docs/benchmarks.md has the timings).
"""

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import ppo
import runtime
import sft
from model import GPT, GPTConfig, KVCache, config_for, generate, sample_inverse_cdf, sampling_logits, token_logprobs
from runtime import Dist

VOCAB = 61


def tiny(family: str, scalar_head: bool = False, seed: int = 0) -> GPT:
    if family == "gpt2":
        config = config_for("tiny", vocab_size=VOCAB, scalar_head=scalar_head)
    else:  # Qwen3-style: GQA (6 query heads, 2 kv), head_dim apart from n_embd / n_head, QK-norm, untied head
        config = GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=6, n_kv_head=2, head_dim=8, n_embd=36,
                           intermediate_size=40, block_size=64, model_type="qwen3", qk_norm=True,
                           tie_word_embeddings=False, scalar_head=scalar_head)
    model = GPT(config)
    model.init_weights(seed=seed)
    return model


def left_padded(B=5, P=7, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (B, P + N), generator=g)
    mask = torch.ones(B, P + N, dtype=torch.long)
    for b in range(B):
        mask[b, :b % P] = 0  # row b has b % P pad slots on the left of its prompt
    return ids, mask, P


FAMILIES = ["gpt2", "qwen3"]


# ---- (1) the heads on the positions that are read


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["lm", "score", "both"])
def test_logits_from_equals_the_full_forward(family, head):
    model = tiny(family, scalar_head=head != "lm")
    ids, mask, P = left_padded()
    full = model(ids, attention_mask=mask, head=head)
    for k in (1, P - 1, ids.size(1) - 1, -1, -3):
        part = model(ids, attention_mask=mask, head=head, logits_from=k)
        pairs = zip(full, part) if head == "both" else [(full, part)]
        for f, p in pairs:
            assert p.shape[1] == f[:, k:].shape[1]
            torch.testing.assert_close(p, f[:, k:], atol=1e-6, rtol=0)


def _response_logprobs_full(model, qr, mask, P, T, head="lm", top_k=0, top_p=1.0):
    """The pre-#19 response_logprobs: the heads on every position, then the prompt sliced off."""
    out = model(qr, attention_mask=mask, head=head)
    logits = (out[0] if head == "both" else out)[:, P - 1:-1]
    values = out[1][:, P - 1:-1].float() if head == "both" else None
    return token_logprobs(logits, qr[:, P:], T, top_k, top_p), values, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_response_logprobs_and_values_match_the_full_logit_path(family):
    model = tiny(family, scalar_head=True)
    ids, mask, P = left_padded()
    for head, T, k, p in (("lm", 1.0, 0, 1.0), ("both", 0.7, 5, 0.9)):
        ours = ppo.response_logprobs(model, ids, mask, P, T, head, k, p)
        before = _response_logprobs_full(model, ids, mask, P, T, head, k, p)
        finite = torch.isfinite(before[0])
        assert torch.equal(finite, torch.isfinite(ours[0]))
        torch.testing.assert_close(ours[0][finite], before[0][finite], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours[2], before[2], atol=1e-6, rtol=0)
        if head == "both":
            torch.testing.assert_close(ours[1], before[1], atol=1e-6, rtol=0)
    full_values = model(ids, attention_mask=mask, head="score")[:, P - 1:-1]
    torch.testing.assert_close(ppo.critic_values(model, ids, mask, P), full_values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_loss_from_the_first_target_matches_the_full_loss_and_gradients(family):
    pairs = [([3, 4, 5, 6, 7], [8, 9]), ([3, 4, 5], [10, 11, 12, 13]), ([1, 2, 3, 4, 5, 6, 7, 8], [9])]
    batch = data.collate_sft(pairs, pad_id=VOCAB - 1)
    first = sft.loss_start(batch["loss_mask"])
    assert first == 2  # the shortest prompt has 3 tokens: position 2 predicts the first response token
    losses, grads = [], []
    for logits_from in (0, first):
        model = tiny(family)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_from=logits_from)
        total, count = sft.sft_loss(logits, batch["input_ids"], batch["loss_mask"], logits_from)
        (total / count).backward()
        losses.append(((total / count).detach(), count))  # the mean token loss that is trained on
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[0][1] == losses[1][1] == 7
    torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-6, rtol=0)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0, msg=name)


def test_loss_start_with_train_on_prompt_keeps_every_position():
    batch = data.collate_sft([([3, 4, 5], [8, 9])], pad_id=0, train_on_prompt=True)
    assert sft.loss_start(batch["loss_mask"]) == 0


def test_score_samples_kl_matches_the_full_logit_path():
    policy, ref = tiny("gpt2", seed=0), tiny("gpt2", seed=1)
    tok = data.get_tokenizer("char")
    assert tok.vocab_size <= VOCAB
    g = torch.Generator().manual_seed(3)
    samples = [{"prompt_ids": torch.randint(0, 20, (p,), generator=g).tolist(),
                "response_ids": torch.randint(0, 20, (n,), generator=g).tolist()} for p, n in ((4, 3), (2, 6), (7, 1))]
    _, kls = evaluate.score_samples(samples, policy, ref, None, tok, 0.7, Dist(), bf16=False)
    for s, kl in zip(samples, kls):  # one sample alone, unpadded, the full logits
        qr = torch.tensor([s["prompt_ids"] + s["response_ids"]])
        P = len(s["prompt_ids"])
        lp = token_logprobs(policy(qr)[:, P - 1:-1], qr[:, P:], 0.7)
        lr = token_logprobs(ref(qr)[:, P - 1:-1], qr[:, P:], 0.7)
        assert abs((lp - lr).sum().item() - kl) < 1e-5


# ---- (2) generate: the same tokens and log-probs as the implementation it replaced


@torch.no_grad()
def generate_before(model, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, eos_id=None,
                    stop_id=None, pad_id=0, generator=None, use_cache=True, top_k=0, top_p=1.0):
    """model.generate as of commit 4abf045 (before #19): full-length logits at prefill, torch.cat of the
    sequence and the mask per step, a host sync per token. Frozen here as the reference."""
    B, P = prompt_ids.shape
    device = prompt_ids.device
    cache = KVCache(model.config, B, P + max_new_tokens, device, torch.float32) if use_cache else None
    seq, mask = prompt_ids, prompt_mask.long()
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_logprobs = []
    step_input = seq
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(step_input, attention_mask=mask, kv_cache=cache)[:, -1, :]
        else:
            logits = model(seq, attention_mask=mask)[:, -1, :]
        logits = logits.float()
        if temperature == 0:
            token = logits.argmax(-1)
            logprob = torch.zeros(B, device=device)
        else:
            sampled = sampling_logits(logits, temperature, top_k, top_p)
            token = sample_inverse_cdf(F.softmax(sampled, dim=-1), generator)
            logprob = sampled.gather(-1, token[:, None])[:, 0] - torch.logsumexp(sampled, dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new_logprobs.append(torch.where(done, torch.zeros_like(logprob), logprob))
        for stop in (eos_id, stop_id):
            if stop is not None:
                done = done | (token == stop)
        seq = torch.cat([seq, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        step_input = token[:, None]
        if bool(done.all()):
            break
    return seq, torch.stack(new_logprobs, dim=1)


GEN_SETTINGS = [  # temperature, top_k, top_p, eos_id, stop_id, use_cache
    (0.0, 0, 1.0, None, None, True), (0.0, 0, 1.0, 5, None, True), (1.0, 0, 1.0, None, None, True),
    (0.7, 5, 0.9, None, None, True), (1.0, 0, 1.0, 3, 7, True), (1.0, 0, 1.0, 3, None, False),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", GEN_SETTINGS)
@pytest.mark.parametrize("check_every", [1, 8])
def test_generate_matches_the_implementation_it_replaced(family, setting, check_every):
    T, k, p, eos, stop, use_cache = setting
    model = tiny(family)
    ids, mask, P = left_padded(B=6, P=5, N=0, seed=1)
    for seed in range(2):
        kwargs = dict(temperature=T, eos_id=eos, stop_id=stop, pad_id=VOCAB - 1, use_cache=use_cache, top_k=k, top_p=p)
        seq_b, lp_b = generate_before(model, ids, mask, 12, generator=torch.Generator().manual_seed(seed), **kwargs)
        seq, lp = generate(model, ids, mask, 12, generator=torch.Generator().manual_seed(seed),
                           check_every=check_every, **kwargs)
        assert torch.equal(seq, seq_b), (seed, seq, seq_b)
        torch.testing.assert_close(lp, lp_b, atol=1e-6, rtol=0)


def test_generate_stops_early_at_the_same_length():
    """Every row ends at its first stop token: N is the step after which all rows had stopped, not the next
    multiple of check_every. The stop ids are picked from an unstopped run so that both rows stop by step 5."""
    model = tiny("gpt2")
    ids, mask, P = left_padded(B=2, P=5, N=0, seed=2)
    for T in (0.0, 1.0):
        free, _ = generate_before(model, ids, mask, 12, temperature=T, generator=torch.Generator().manual_seed(0))
        eos_id, stop_id = int(free[0, P + 2]), int(free[1, P + 4])
        kwargs = dict(temperature=T, eos_id=eos_id, stop_id=stop_id, pad_id=VOCAB - 1)
        seq_b, lp_b = generate_before(model, ids, mask, 12, generator=torch.Generator().manual_seed(0), **kwargs)
        assert seq_b.size(1) - P <= 5
        for check_every in (1, 3, 8, 16):
            seq, lp = generate(model, ids, mask, 12, generator=torch.Generator().manual_seed(0),
                               check_every=check_every, **kwargs)
            assert torch.equal(seq, seq_b), (T, check_every, seq, seq_b)
            torch.testing.assert_close(lp, lp_b, atol=1e-6, rtol=0)


# ---- (2b) the fixed-shape decode step, eager and compiled (generate(compile_step=True))


def _same_as_eager(model, settings, n=12):
    """generate(compile_step=True) against the eager KV-cache path: equal tokens, log-probs to 1e-6 (fp32)."""
    ids, mask, P = left_padded(B=6, P=5, N=0, seed=1)
    for T, k, p, eos, stop, _ in settings:
        kwargs = dict(temperature=T, eos_id=eos, stop_id=stop, pad_id=VOCAB - 1, top_k=k, top_p=p)
        for seed in range(2):
            seq_e, lp_e = generate(model, ids, mask, n, generator=torch.Generator().manual_seed(seed), **kwargs)
            seq_c, lp_c = generate(model, ids, mask, n, generator=torch.Generator().manual_seed(seed),
                                   compile_step=True, **kwargs)
            assert torch.equal(seq_c, seq_e), (T, k, p, eos, stop, seed, seq_c, seq_e)
            torch.testing.assert_close(lp_c, lp_e, atol=1e-6, rtol=0)


CACHED_SETTINGS = [s for s in GEN_SETTINGS if s[-1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_shape_decode_step_matches_eager(family, monkeypatch):
    """The fixed-shape step itself (full-length cache written at a tensor index, unwritten slots masked), run
    uncompiled: fast, and it isolates the masking and position logic from torch.compile."""
    import model as model_module
    monkeypatch.setattr(model_module, "compiled_decode_step", lambda device_type: model_module.decode_step)
    _same_as_eager(tiny(family).eval(), CACHED_SETTINGS)


@pytest.mark.slow  # torch.compile of the step: ~20 s per model family on a 2-core CPU
@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decode_step_matches_eager_and_compiles_once(family):
    """torch.compile(decode_step) (inductor, CPU): same tokens under greedy decoding and under a seeded sampler,
    log-probs to fp32 rounding. After the first call, no setting at the same shapes compiles again."""
    import torch._dynamo
    model = tiny(family).eval()
    _same_as_eager(model, CACHED_SETTINGS[:1])  # compiles here
    with torch._dynamo.config.patch(error_on_recompile=True):
        _same_as_eager(model, CACHED_SETTINGS[1:])
        _same_as_eager(model, CACHED_SETTINGS[:1], n=20)  # another length in the same cache bucket: the same graph


def test_ppo_compile_decode_reaches_generate(monkeypatch):
    """--compile_decode is passed to generate by ppo.rollout (the step uncompiled here, so the test is fast): the
    rollout is the eager one, and the fixed-shape step ran."""
    import model as model_module
    calls = []

    def uncompiled(device_type):
        calls.append(device_type)
        return model_module.decode_step

    monkeypatch.setattr(model_module, "compiled_decode_step", uncompiled)
    tok = data.get_tokenizer("char")
    policy = tiny("gpt2")
    ids, mask = data.pad_left([tok.encode(s) for s in ["ab=", "cdefgh=", "p="]], tok.eos_id)
    outs = [ppo.rollout(policy, ids, mask, 0, tok, ppo.Config(response_length=6, compile_decode=flag), Dist())
            for flag in (False, True)]
    assert calls == ["cpu"]
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-6, rtol=0)


def test_static_cache_len_buckets():
    from model import static_cache_len
    assert [static_cache_len(n) for n in (1, 64, 65, 128, 129, 528, 1024)] == [64, 64, 128, 128, 256, 1024, 1024]


def test_compile_step_needs_the_cache():
    ids, mask, _ = left_padded(B=2, P=5, N=0)
    with pytest.raises(ValueError, match="compile_step"):
        generate(tiny("gpt2"), ids, mask, 4, use_cache=False, compile_step=True)


# ---- (2b) each distinct prompt through the trunk once (--share_prompts)


def grouped(k=4, P=6, N=5, seed=0):
    """3 distinct left-padded prompts, each k times, rows shuffled (as a minibatch draws them); responses end at
    different lengths (right padding, mask 0)."""
    ids, mask, _ = left_padded(B=3, P=P, N=N, seed=seed)
    order = torch.randperm(3 * k, generator=torch.Generator().manual_seed(seed)) % 3
    ids, mask = ids[order].clone(), mask[order].clone()
    g = torch.Generator().manual_seed(seed + 1)
    ids[:, P:] = torch.randint(0, VOCAB - 1, (3 * k, N), generator=g)  # each sample its own response
    for b in range(3 * k if N else 0):
        mask[b, P + 1 + b % N:] = 0
    return ids, mask, P


def rows_through_first_block(model):
    """Record the (B, T) of every call of the first transformer block."""
    seen = []
    model.transformer.h[0].register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape[:2])))
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prompts_give_the_same_logprobs_and_gradients(family):
    ids, mask, P = grouped()
    results = []
    for share in (False, True):
        model = tiny(family)
        seen = rows_through_first_block(model)
        logp, _, logits = ppo.response_logprobs(model, ids, mask, P, 0.7, share_prompts=share)
        weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)  # a loss that reaches every response token
        (logp * weights * mask[:, P:]).sum().backward()
        results.append((logp.detach(), logits.detach(), {n: p.grad for n, p in model.named_parameters()}, seen))
    (lp0, lg0, g0, seen0), (lp1, lg1, g1, seen1) = results
    assert seen0 == [(12, ids.size(1))]
    assert seen1 == [(3, P), (12, ids.size(1) - P)]  # the prompt once per distinct prompt, then the responses
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(lg1, lg0, atol=1e-5, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_with_shared_prompts_samples_the_same(family, temperature):
    ids, mask, P = grouped(N=0)
    model = tiny(family)
    seen = rows_through_first_block(model)
    kwargs = dict(temperature=temperature, eos_id=3, pad_id=VOCAB - 1)
    seq0, lp0 = generate(model, ids, mask, 10, generator=torch.Generator().manual_seed(0), **kwargs)
    seen.clear()
    seq1, lp1 = generate(model, ids, mask, 10, generator=torch.Generator().manual_seed(0), share_prompts=True, **kwargs)
    assert seen[0] == (3, P)
    assert torch.equal(seq1, seq0)
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)


# ---- (3) fused AdamW


def _steps(model, optimizer, n=5):
    """n optimizer steps on the same seeded gradients for both sides. Not gradients of a loss: those would feed
    float rounding back (a GPT-2 key bias has a gradient of exactly 0 up to rounding noise, which Adam's
    normalization turns into an O(lr) step that differs between any two implementations)."""
    g = torch.Generator().manual_seed(0)
    for step in range(n):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** -(step % 3)  # scales 1, 0.1, 0.01
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_adamw_takes_the_same_steps(family):
    reference = tiny(family)
    loop = torch.optim.AdamW([{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), foreach=False)
    model = tiny(family)
    fused = runtime.make_adamw(model, lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] is True  # CPU has the fused kernel in this torch
    expected, got = _steps(reference, loop), _steps(model, fused)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)


def test_ppo_optimizer_is_fused_and_takes_the_same_steps():
    cfg = ppo.Config(lr=1e-2, adam_eps=1e-5)
    policy, critic = tiny("gpt2"), tiny("gpt2", scalar_head=True, seed=1)
    opt = ppo.make_optimizer(policy, critic, cfg)
    assert opt.defaults["fused"] is True
    ref_policy = tiny("gpt2")
    loop = torch.optim.AdamW(ref_policy.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-5, weight_decay=0.0,
                             foreach=False)
    expected, got = _steps(ref_policy, loop), _steps(policy, opt)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)


# ---- (4) the diagnostic recompute


@pytest.mark.parametrize("critic", ["reward", "shared"])
def test_skipping_the_diagnostic_recompute_changes_no_training_tensor(checkpoints, critic):
    cfg = ppo.Config(sft=str(checkpoints / "sft"), reward_model=str(checkpoints / "rm"), response_length=8,
                     temperature=0.7, rollout_batch_size=6, critic=critic, old_logprobs="sampling")
    d, tok = Dist(), data.get_tokenizer("char")
    policy, ref, rm, critic_model = ppo.build_models(cfg, d)
    ids, mask = data.pad_left([tok.encode(s) for s in ["ab=", "cdefgh=", "p=", "abcdefgh=", "mno=", "ij="]], tok.eos_id)
    qr, logp = generate(policy, ids, mask, 8, temperature=0.7, eos_id=tok.eos_id, pad_id=tok.eos_id,
                        generator=torch.Generator().manual_seed(1))
    full = ppo.make_experience(policy, critic_model, ref, rm, qr, mask, logp, cfg.kl_coef, tok, cfg, d)
    lean = ppo.make_experience(policy, critic_model, ref, rm, qr, mask, logp, cfg.kl_coef, tok, cfg, d,
                               check_logprobs=False)
    for key, value in full.items():
        if key in ("recomputed_logp", "mismatch_kl") and critic == "reward":
            assert lean[key] is None  # skipped: a critic of its own gives the values
        elif torch.is_tensor(value):
            torch.testing.assert_close(lean[key], value, atol=0, rtol=0, msg=key)
    if critic == "shared":  # one pass gives log-probs and values: the recompute is free and always runs
        assert lean["recomputed_logp"] is not None


def test_logged_rows_keep_the_recompute_diagnostics(checkpoints, tmp_path):
    import json
    ppo.main([f"--sft={checkpoints / 'sft'}", f"--reward_model={checkpoints / 'rm'}", f"--run_dir={tmp_path}",
              "--num_updates=3", "--rollout_batch_size=8", "--micro_batch_size=8", "--response_length=6",
              "--eval_prompts=8", "--eval_every=100", "--log_every=1", "--logprob_check_every=2", "--critic=reward"])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"objective/kl"' in line]
    have = ["val/logprob_recompute_maxdiff" in r for r in rows]
    assert have == [True, False, True], have  # updates 0 and 2 of 3
    assert all(r["val/logprob_recompute_maxdiff"] < 1e-5 for r in rows if "val/logprob_recompute_maxdiff" in r)
