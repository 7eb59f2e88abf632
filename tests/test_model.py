"""model.py: logit parity with HF GPT-2 both ways, left padding, the KV cache, generation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from model import GPT, GPTConfig, KVCache, config_for, generate, token_logprobs

transformers = pytest.importorskip("transformers", reason="transformers (requirements-dev.txt) is needed for HF parity")

SMALL = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def hf_random_model(tmp_path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    # Random LayerNorm and bias values too, so a swapped or untransposed tensor cannot hide.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path / "hf")
    return hf


def left_padded_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # row 1 has 4 pad slots on the left, row 2 has 7
    mask[2, :7] = 0
    return ids, mask


def test_logits_match_hf(tmp_path):
    hf = hf_random_model(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    ids, _ = left_padded_batch()
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_left_padded_logits_match_hf(tmp_path):
    hf = hf_random_model(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path / "hf")).eval()
    ids, mask = left_padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        mine = ours(ids, attention_mask=mask)  # position ids derived from the mask by default
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max().item() <= 1e-5


def test_export_loads_in_hf(tmp_path):
    ours = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32))
    ours.init_weights(seed=3)
    ours.eval().save_pretrained(str(tmp_path / "ours"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ours")).eval()
    ids, _ = left_padded_batch()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_padded_equals_unpadded_logprobs():
    torch.manual_seed(0)
    model = GPT(config_for("tiny", vocab_size=50)).eval()
    model.init_weights(seed=0)
    seqs = [torch.randint(0, 50, (n,)) for n in (9, 5, 2)]
    T = 9
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):  # left-pad
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    with torch.no_grad():
        batched = token_logprobs(model(ids, attention_mask=mask)[:, :-1], ids[:, 1:], temperature=0.7)
        for i, s in enumerate(seqs):
            alone = token_logprobs(model(s[None])[:, :-1], s[None, 1:], temperature=0.7)[0]
            assert torch.allclose(batched[i, T - len(s):], alone, atol=1e-5), i


def test_position_ids_matter():
    """Guard for the test above: without mask-derived positions, left-padded rows change."""
    model = GPT(config_for("tiny", vocab_size=50)).eval()
    model.init_weights(seed=0)
    s = torch.randint(0, 50, (1, 4))
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), s], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(s)
        right = model(ids, attention_mask=mask)[:, 3:]
        wrong = model(ids, attention_mask=mask, position_ids=torch.arange(7)[None])[:, 3:]
    assert torch.allclose(alone, right, atol=1e-5)
    assert not torch.allclose(alone, wrong, atol=1e-3)


def test_kv_cache_matches_full_forward():
    model = GPT(config_for("tiny", vocab_size=50)).eval()
    model.init_weights(seed=1)
    ids, mask = torch.randint(0, 50, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache(model.config, 2, 10, "cpu", torch.float32)
        steps = [model(ids[:, :4], attention_mask=mask[:, :4], kv_cache=cache)]
        for t in range(4, 10):  # then one token at a time
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (incremental[real] - full[real]).abs().max().item() <= 1e-5


def reference_greedy(model, ids, mask, n, eos_id):
    """The obvious loop without a cache: argmax of a full forward each step."""
    out = []
    for row, m in zip(ids, mask):
        seq = row[m.bool()].tolist()
        new = []
        for _ in range(n):
            nxt = model(torch.tensor([seq]))[0, -1].argmax().item()
            seq.append(nxt)
            new.append(nxt)
            if nxt == eos_id:
                break
        out.append(new)
    return out


def test_greedy_generate_equals_reference_loop():
    model = GPT(config_for("tiny", vocab_size=50)).eval()
    model.init_weights(seed=2)
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    eos = 7
    with torch.no_grad():
        seqs, _ = generate(model, ids, mask, max_new_tokens=12, temperature=0, eos_id=eos, pad_id=0)
        expected = reference_greedy(model, ids, mask, 12, eos)
    for i, exp in enumerate(expected):
        got = seqs[i, 6:6 + len(exp)].tolist()
        assert got == exp
        assert (seqs[i, 6 + len(exp):] == 0).all()  # padded after EOS


def test_sampling_is_seeded_and_logprobs_match_recompute():
    model = GPT(config_for("tiny", vocab_size=50)).eval()
    model.init_weights(seed=3)
    ids = torch.randint(0, 50, (4, 5))
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[0, :2] = 0
    run = lambda s: generate(model, ids, mask, 8, temperature=0.7, generator=torch.Generator().manual_seed(s))
    a, lp_a = run(11)
    b, lp_b = run(11)
    c, _ = run(12)
    assert torch.equal(a, b) and torch.equal(lp_a, lp_b)
    assert not torch.equal(a, c)
    # The sampling log-probs equal a full recompute of the sequence (PPO's ratio-1 check, in small).
    full_mask = torch.cat([mask, torch.ones(4, a.size(1) - 5, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(a, attention_mask=full_mask)[:, 4:-1]
    recomputed = token_logprobs(logits, a[:, 5:], temperature=0.7)
    assert torch.allclose(recomputed, lp_a, atol=1e-5)


def test_no_cache_generate_equals_cached():
    model = GPT(config_for("tiny", vocab_size=50)).eval()
    model.init_weights(seed=4)
    ids = torch.randint(0, 50, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :3] = 0
    a, _ = generate(model, ids, mask, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b, _ = generate(model, ids, mask, 6, temperature=1.0, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a, b)


def test_scalar_head_and_wrong_checkpoint_message(tmp_path):
    model = GPT(config_for("tiny", vocab_size=50, scalar_head=True))
    model.init_weights(seed=0)
    std = model.score.weight.std().item()
    assert abs(std - 1 / (32 + 1) ** 0.5) < 0.08  # N(0, 1/sqrt(d+1)), OpenAI 2019
    ids = torch.randint(0, 50, (2, 6))
    logits, values = model(ids, head="both")
    assert logits.shape == (2, 6, 50) and values.shape == (2, 6)
    model.save_pretrained(str(tmp_path / "m"))
    bigger = GPT(config_for("tiny", vocab_size=50, n_embd=64))
    from safetensors.torch import load_file
    with pytest.raises(ValueError, match="wte.weight"):
        bigger.load_hf_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")), source="m")


def test_inverse_cdf_sampling_has_the_right_distribution():
    from model import sample_inverse_cdf
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_inverse_cdf(probs, g) for _ in range(20000)])  # (20000, 2)
    freq = torch.stack([(draws[:, 0] == i).float().mean() for i in range(4)])
    assert torch.allclose(freq, probs[0], atol=0.015)  # 3 standard errors at n = 20000
    assert (draws[:, 0] != 1).all() and (draws[:, 1] == 3).all()  # zero-probability tokens never drawn


@pytest.mark.parametrize("name", ["gpt2", "char"])
def test_saved_models_carry_a_tokenizer_hf_loads_with_the_same_ids(tmp_path, name):
    """AutoTokenizer.from_pretrained(final/policy) used to 'succeed' with a vocabulary of 1: no files were saved."""
    import data
    from transformers import AutoTokenizer
    tok = data.get_tokenizer(name)
    model = GPT(config_for("tiny", vocab_size=tok.vocab_size, tokenizer=name))
    model.init_weights(seed=0)
    model.save_pretrained(str(tmp_path / "policy"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "policy"))
    text = "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast." if name == "gpt2" else "abc=cba"
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eos_id
    assert hf(text).input_ids == tok.encode(text)
    assert hf.decode(tok.encode(text) + [tok.eos_id]) == tok.decode(tok.encode(text) + [tok.eos_id])
    assert GPT.from_pretrained(str(tmp_path / "policy")).config.tokenizer == name  # still our tokenizer
