"""model.py on the Llama family (Llama 3 with llama3 RoPE scaling, Qwen2, Qwen3) against HF transformers' own
modeling code, on tiny random models saved with save_pretrained:

- float32 logit parity (<= 1e-5), full and left-padded batches, both directions (HF -> ours, ours -> HF),
  single-file and sharded safetensors;
- KV-cache decoding equals the full forward at every step; cached and uncached greedy generation agree;
- log-probs do not depend on padding (unpadded, left-, right-padded), GPT-2 included (REFERENCES 5.2a #7);
- the reward/critic export loads in AutoModelForSequenceClassification and scores a padded batch as we do;
- gradient checkpointing gives the same gradients; RoPE config read in both HF formats.

The sizes are odd on purpose: 6 or 3 query heads (not a power of two), fewer kv heads (GQA), a Qwen3
head_dim of 20 on a width of 48 (not 48 / 3), untied embeddings for Llama, biases and norm gains drawn
at random so a swapped, untransposed or unused tensor cannot hide.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from model import GPT, GPTConfig, KVCache, generate, rope_from_hf, rope_inv_freq, save_hf, save_hf_sequence_classifier, token_logprobs

transformers = pytest.importorskip("transformers", reason="transformers (requirements-dev.txt) is needed for HF parity")

VOCAB = 101
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def hf_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                  max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-6)
    if family == "llama":  # Llama 3.2-style: llama3 RoPE scaling; untied here to test that path
        return transformers.LlamaConfig(**common, num_attention_heads=6, num_key_value_heads=2, rope_theta=500000.0,
                                        rope_scaling=dict(LLAMA3_SCALING), tie_word_embeddings=False)
    if family == "qwen2":  # q/k/v bias, tied
        return transformers.Qwen2Config(**common, num_attention_heads=6, num_key_value_heads=3, rope_theta=1e6,
                                        tie_word_embeddings=True)
    if family == "qwen3":  # QK-norm, head_dim 20 != 48 / 3, tied
        return transformers.Qwen3Config(**common, num_attention_heads=3, num_key_value_heads=1, head_dim=20,
                                        rope_theta=1e6, tie_word_embeddings=True)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "qwen3"]


def randomize_(model, seed):
    """Norm gains and biases away from their 1/0 init, so a missing or misplaced one changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.copy_(1.0 * ("bias" not in name) + 0.5 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> directory of a random HF *ForCausalLM saved with save_pretrained."""
    dirs = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(family))
        randomize_(hf, seed=i)
        dirs[family] = str(tmp_path_factory.mktemp(family))
        hf.save_pretrained(dirs[family])
    return dirs


def load_hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def left_padded_batch(seed=1, T=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :4] = 0  # row 1 has 4 pad slots on the left, row 2 has 7
    mask[2, :7] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(hf_dirs, family):
    hf, ours = load_hf(hf_dirs[family]), GPT.from_pretrained(hf_dirs[family]).eval()
    assert ours.config.model_type == family and type(hf).__name__.lower().startswith(family)
    ids, mask = left_padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs_full, mine_full = hf(ids).logits, ours(ids)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        mine = ours(ids, attention_mask=mask)  # position ids derived from the mask by default
    assert theirs_full.std() > 0.1  # logits far from 0: a 1e-5 bound means something
    assert (mine_full - theirs_full).abs().max().item() <= 1e-5
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_hf(tmp_path, hf_dirs, family):
    """Ours, initialized by our own init_weights, saved with save_pretrained: HF's Auto class picks the right
    *ForCausalLM and gives our logits. Sharded too (a 20 kB shard limit makes several files and an index)."""
    config = GPT.from_pretrained(hf_dirs[family]).config
    ours = GPT(config)
    ours.init_weights(seed=5)
    randomize_(ours, seed=6)
    ours.eval()
    ids, _ = left_padded_batch(seed=2)
    with torch.no_grad():
        mine = ours(ids)
    for name, shard in (("single", None), ("sharded", 20_000)):
        out = str(tmp_path / name)
        if shard is None:
            ours.save_pretrained(out)
        else:
            save_hf(out, ours.config, ours.state_dict(), max_shard_bytes=shard)
            files = os.listdir(out)
            assert "model.safetensors.index.json" in files and "model.safetensors" not in files
            assert sum(f.endswith(".safetensors") for f in files) > 2
        hf = load_hf(out)
        assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
        with torch.no_grad():
            assert (hf(ids).logits - mine).abs().max().item() <= 1e-5, name
            assert (GPT.from_pretrained(out).eval()(ids) - mine).abs().max().item() == 0.0, name  # round trip


def test_loads_hf_sharded_checkpoint(tmp_path, hf_dirs):
    """HF's own sharded layout (save_pretrained with a small max_shard_size) loads into ours."""
    hf = load_hf(hf_dirs["qwen3"])
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ids, _ = left_padded_batch(seed=3)
    with torch.no_grad():
        assert (GPT.from_pretrained(str(tmp_path)).eval()(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_llama3_rope_frequencies_match_hf(hf_dirs):
    """The llama3-scaled inverse frequencies equal HF's `_compute_llama3_parameters`, and differ from unscaled
    ones (so the parity test above would see a dropped scaling)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    ours = GPT.from_pretrained(hf_dirs["llama"]).config
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.AutoConfig.from_pretrained(hf_dirs["llama"]))
    assert torch.allclose(rope_inv_freq(ours), theirs, rtol=1e-6, atol=0)
    unscaled = rope_inv_freq(GPTConfig(**{**ours.__dict__, "rope_scaling": None}))
    assert not torch.allclose(unscaled, theirs)


def test_rope_config_read_in_both_formats(hf_dirs):
    """transformers 5 writes rope_parameters; transformers 4 and the published Llama 3.2 config.json have
    rope_theta + rope_scaling with "type"/"rope_type". Both give the same theta and scaling."""
    with open(os.path.join(hf_dirs["llama"], "config.json")) as f:
        v5 = json.load(f)
    old = {k: v for k, v in v5.items() if k != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling={"type": "llama3", **{k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}})
    expected = (500000.0, {k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"})
    assert rope_from_hf(v5) == expected and rope_from_hf(old) == expected
    assert rope_from_hf({"rope_theta": 1e6, "rope_scaling": None, "max_position_embeddings": 64}) == (1e6, None)
    with pytest.raises(ValueError, match="yarn"):
        rope_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "max_position_embeddings": 64})


def test_unsupported_config_is_a_clear_error(tmp_path, hf_dirs):
    with open(os.path.join(hf_dirs["qwen2"], "config.json")) as f:
        cfg = json.load(f)
    cfg["use_sliding_window"] = True
    os.makedirs(tmp_path / "m")
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="use_sliding_window=True is not implemented"):
        GPT.from_pretrained(str(tmp_path / "m"))


# -----------------------------------------------------------------------------
# KV cache, generation, padding: every family, GPT-2 included


def family_model(hf_dirs, family) -> GPT:
    if family == "gpt2":
        model = GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32))
        model.init_weights(seed=0)
        return model.eval()
    return GPT.from_pretrained(hf_dirs[family]).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_full_forward(hf_dirs, family):
    """Prefill a left-padded prompt, then feed one token at a time through the cache: the logits at every step
    equal the last row of a full forward over the whole sequence so far."""
    model = family_model(hf_dirs, family)
    ids, mask = left_padded_batch(seed=4, T=16)
    P = 8
    cache = KVCache(model.config, ids.size(0), ids.size(1), ids.device, torch.float32)
    with torch.no_grad():
        step_logits = [model(ids[:, :P], attention_mask=mask[:, :P], kv_cache=cache)[:, -1]]
        for t in range(P, ids.size(1)):
            step_logits.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache)[:, -1])
        for i, t in enumerate(range(P, ids.size(1) + 1)):
            full = model(ids[:, :t], attention_mask=mask[:, :t])[:, -1]
            assert (step_logits[i] - full).abs().max().item() <= 1e-5, f"step {t}"
    assert cache.k[0].shape[1] == model.config.n_kv_head  # GQA: only the kv heads are cached


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_and_without_cache_agree(hf_dirs, family):
    model = family_model(hf_dirs, family)
    ids, mask = left_padded_batch(seed=5, T=10)
    fast, fast_lp = generate(model, ids, mask, 8, temperature=0.0)
    slow, slow_lp = generate(model, ids, mask, 8, temperature=0.0, use_cache=False)
    assert torch.equal(fast, slow)
    g1, g2 = (torch.Generator().manual_seed(0) for _ in range(2))
    fast, fast_lp = generate(model, ids, mask, 8, temperature=0.9, generator=g1)
    slow, slow_lp = generate(model, ids, mask, 8, temperature=0.9, generator=g2, use_cache=False)
    assert torch.equal(fast, slow) and (fast_lp - slow_lp).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["gpt2", *FAMILIES])
def test_logprobs_independent_of_padding(hf_dirs, family):
    """A sequence's token log-probs are the same unpadded, left-padded by 5 and right-padded by 3
    (REFERENCES 5.2a #7). GPT-2's absolute positions make this a hard test; RoPE's are relative, so
    the RoPE families pass it only approximately even with arange positions; GPT-2 keeps the test honest."""
    model = family_model(hf_dirs, family)
    seq = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    pad = 0
    with torch.no_grad():
        ref = token_logprobs(model(seq)[:, :-1], seq[:, 1:])[0]
        left = torch.cat([torch.full((1, 5), pad), seq], 1)
        left_mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
        got_left = token_logprobs(model(left, attention_mask=left_mask)[:, :-1], left[:, 1:])[0, 5:]
        right = torch.cat([seq, torch.full((1, 3), pad)], 1)
        right_mask = torch.cat([torch.ones(1, 12, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], 1)
        got_right = token_logprobs(model(right, attention_mask=right_mask)[:, :-1], right[:, 1:])[0, :11]
    assert (got_left - ref).abs().max().item() <= 1e-5
    assert (got_right - ref).abs().max().item() <= 1e-5


def test_gradient_checkpointing_same_gradients(hf_dirs):
    model = GPT.from_pretrained(hf_dirs["qwen3"]).train()
    ids, mask = left_padded_batch(seed=7)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        logits = model(ids, attention_mask=mask)
        token_logprobs(logits[:, :-1], ids[:, 1:])[mask[:, 1:].bool()].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    assert grads[0]["transformer.h.0.attn.ln_q.weight"].abs().sum() > 0  # QK-norm is in the graph


# -----------------------------------------------------------------------------
# Reward model / critic export: AutoModelForSequenceClassification scores as we do


@pytest.mark.parametrize("family", ["gpt2", *FAMILIES])
def test_sequence_classifier_export_same_scores(tmp_path, hf_dirs, family):
    """Our reward (gain * score(h_last) + bias, score with its own bias) at the last real token of a
    right-padded batch equals HF's SequenceClassification logit + rlhf_reward_bias, padding with the exported
    pad_token_id; a left-padded batch too for the RoPE families (HF gives arange positions there, which
    RoPE tolerates and GPT-2 does not). The export also loads back into ours with the same rewards."""
    model = family_model(hf_dirs, family)
    model.config.scalar_head = True
    rm = GPT(model.config)
    rm.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.3)
        rm.score.bias.fill_(0.4)
    rm.config.reward_gain, rm.config.reward_bias = 1.7, -0.3
    rm.eval()
    pad_id = VOCAB - 1
    g = torch.Generator().manual_seed(8)
    lengths = [14, 9, 5]
    rows = [torch.randint(0, VOCAB - 1, (n,), generator=g) for n in lengths]  # never the pad id
    right = torch.full((3, 14), pad_id)
    for b, r in enumerate(rows):
        right[b, :len(r)] = r
    right_mask = (right != pad_id).long()
    with torch.no_grad():
        raw = rm(right, attention_mask=right_mask, head="score")
        last = right_mask.sum(1) - 1
        ours = rm.config.reward_gain * raw[torch.arange(3), last] + rm.config.reward_bias
    out = str(tmp_path / "rm")
    save_hf_sequence_classifier(out, rm.config, rm.state_dict(), pad_token_id=pad_id)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.num_labels == 1 and type(hf).__name__.endswith("ForSequenceClassification")
    with torch.no_grad():
        theirs = hf(right, attention_mask=right_mask).logits[:, 0] + cfg["rlhf_reward_bias"]
        assert (theirs - ours).abs().max().item() <= 1e-5
        if family != "gpt2":
            left = torch.stack([right[b].roll(14 - n) for b, n in enumerate(lengths)])
            theirs_left = hf(left, attention_mask=(left != pad_id).long()).logits[:, 0] + cfg["rlhf_reward_bias"]
            assert (theirs_left - ours).abs().max().item() <= 1e-5
        back = GPT.from_pretrained(out).eval()
        again = back.config.reward_gain * back(right, attention_mask=right_mask, head="score")[torch.arange(3), last]
        assert (again + back.config.reward_bias - ours).abs().max().item() <= 1e-5
