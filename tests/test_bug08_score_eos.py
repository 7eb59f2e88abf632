"""Bug class 8: where the score is read and placed, and EOS handling (REFERENCES 5.2a row 8).

transformers #35352: GPT2ForSequenceClassification pools at the token before the first pad id; with
pad == eos (GPT-2, Llama-3.2 chat prompts) an EOS inside the prompt makes it read the prompt, not the
response. TRL #3750: the score lands one slot after EOS under TRL's convention. TRL #2012: replace vs
subtract for responses without EOS. This project pads with EOS everywhere, so every test here puts an EOS
id inside the prompt.
"""

import pytest
import torch

import data
import ppo
from model import GPT, config_for
from evaluate import last_token_index, sequence_rewards
from reward_model import collate_comparisons
from runtime import Dist

TOK = data.get_tokenizer("char")
EOS = TOK.eos_id


def test_reward_model_reads_the_response_end_not_the_first_eos():
    prompt_with_eos = TOK.encode("ab") + [EOS] + TOK.encode("c=")  # an EOS id inside the prompt
    items = [{"prompt": prompt_with_eos, "responses": [TOK.encode("xy") + [EOS], TOK.encode("z") + [EOS]]},
             {"prompt": TOK.encode("abcdef="), "responses": [TOK.encode("pqrs") + [EOS], TOK.encode("p") + [EOS]]}]
    batch = collate_comparisons(items, pad_id=EOS, K=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = torch.arange(ids.size(1)).float().expand_as(ids)  # a "reward model" whose score is its position
    read = sequence_rewards(positions, mask).long()
    lengths = torch.tensor([len(it["prompt"]) + len(it["responses"][k]) for k in range(2) for it in items])
    assert torch.equal(read, lengths - 1)  # the response's EOS, the last real token
    assert torch.all(ids[torch.arange(len(read)), read] == EOS)
    # The bug, for contrast: HF's pooling from input_ids (first pad id - 1) reads inside the prompt.
    hf_style = (ids == EOS).int().argmax(-1) - 1
    assert hf_style[0] == 1 and read[0] != hf_style[0]


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpts")
    for name, head, seed in (("sft/policy", False, 0), ("rm/reward", True, 1)):
        m = GPT(config_for("tiny", vocab_size=TOK.vocab_size, tokenizer="char", scalar_head=head))
        m.init_weights(seed=seed)
        m.save_pretrained(str(base / name))
    cfg = ppo.Config(sft=str(base / "sft"), reward_model=str(base / "rm"), response_length=6)
    return ppo.build_models(cfg, Dist()), base


def _experience(models, monkeypatch, **overrides):
    """A fixed rollout: prompts (left-padded with EOS) of which two contain an EOS id; responses that stop
    at different places, one never. The reward model is spied on: which index does it read?"""
    (policy, ref, rm, critic), base = models
    cfg = ppo.Config(sft=str(base / "sft"), reward_model=str(base / "rm"), response_length=6, **overrides)
    prompts = [TOK.encode("a") + [EOS] + TOK.encode("b="), TOK.encode("cdefg="), [EOS] + TOK.encode("h=")]
    responses = [TOK.encode("xy") + [EOS] + [EOS] * 3, TOK.encode("pqrstu"), [EOS] * 6]  # EOS at 2, none, at 0
    query, query_mask = data.pad_left(prompts, EOS)
    qr = torch.cat([query, torch.tensor(responses)], 1)
    read = {}
    real = ppo.reward_scores

    def spy(model, query_response, attention_mask):
        read["index"], read["mask"] = last_token_index(attention_mask), attention_mask.clone()
        return real(model, query_response, attention_mask)
    monkeypatch.setattr(ppo, "reward_scores", spy)
    exp = ppo.make_experience(policy, critic, ref, rm, qr, query_mask, torch.zeros(3, 6), 0.1, TOK, cfg, Dist())
    return exp, read, query.size(1), qr


@pytest.mark.parametrize("position,offset", [("eos", 0), ("after_eos", 1)])
def test_ppo_reads_the_response_eos_and_places_the_score(models, monkeypatch, position, offset):
    exp, read, P, qr = _experience(models, monkeypatch, score_position=position, missing_eos_mode="none")
    eos_index = torch.tensor([2, 5, 0])  # the response's own EOS (row 1: never stopped, its last token)
    assert read["index"].tolist() == (P + eos_index).tolist(), "the RM must read the response's end"
    assert torch.all(qr[[0, 2], read["index"][[0, 2]]] == EOS)
    assert read["mask"][0, :P].sum() == 4  # the prompt's EOS is a real token, not padding
    assert exp["ended"].tolist() == [True, False, True]
    # The score is added at exactly one slot: the EOS ("eos") or the one after it ("after_eos").
    score_part = exp["rewards"] - exp["non_score_reward"] * exp["value_mask"]
    expected = torch.clamp(eos_index + offset, max=5)
    for row in range(3):
        nonzero = (score_part[row].abs() > 0).nonzero().flatten().tolist()
        assert nonzero == [expected[row].item()], (row, nonzero)
        assert torch.allclose(score_part[row, expected[row]], exp["scores"][row])


@pytest.mark.parametrize("mode,expected", [("replace", lambda s: -1.0), ("subtract", lambda s: s - 1.0),
                                           ("none", lambda s: s)])
def test_truncated_response_gets_the_configured_penalty(models, monkeypatch, mode, expected):
    exp_none, _, _, _ = _experience(models, monkeypatch, missing_eos_mode="none")
    exp, _, _, _ = _experience(models, monkeypatch, missing_eos_mode=mode, missing_eos_penalty=-1.0)
    raw = exp_none["scores"]
    assert torch.allclose(exp["scores"][1], torch.tensor(expected(raw[1].item())))  # row 1 never stopped
    assert torch.equal(exp["scores"][[0, 2]], raw[[0, 2]])  # the others are untouched
