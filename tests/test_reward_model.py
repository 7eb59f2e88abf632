"""reward_model.py: the losses against hand-worked values, the score read at the EOS under either padding,
parity with TRL's RewardTrainer, and end-to-end runs (normalization, resume exactness, real HH-RLHF data)."""

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

import data
import evaluate
import reward_model as rm
from model import GPT, config_for

ROOT = Path(__file__).resolve().parents[1]
HH_TEST = ROOT.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"


def softplus(x: float) -> float:
    """log(1 + e^x) = -log sigmoid(-x): the loss of one pair whose reward difference is -x."""
    return math.log1p(math.exp(x))


# -----------------------------------------------------------------------------
# Bradley-Terry


def test_bt_loss_is_log2_for_equal_rewards():
    r = torch.tensor([-3.0, 0.0, 0.7, 5.0])
    assert rm.bradley_terry_loss(r, r.clone()).item() == pytest.approx(math.log(2), abs=1e-7)


def test_bt_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.3, 1.0, -2.0], requires_grad=True)
    rm.bradley_terry_loss(chosen, rejected).backward()
    # d/dr_c of -log sigmoid(r_c - r_r) = -(1 - sigmoid(r_c - r_r)) < 0: descent raises r_c; r_r the opposite.
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    expected = -(1 - torch.sigmoid(chosen - rejected)).detach() / 3  # the mean over 3 pairs
    assert torch.allclose(chosen.grad, expected) and torch.allclose(rejected.grad, -expected)


def test_bt_margin_hand_worked():
    # r_c - r_r - margin = 1.5 - 1.0 - 1.0 = -0.5, so the loss is log(1 + e^0.5) = 0.97407698...
    loss = rm.bradley_terry_loss(torch.tensor([1.5]), torch.tensor([1.0]), margin=1.0)
    assert loss.item() == pytest.approx(softplus(0.5), abs=1e-6)
    assert softplus(0.5) == pytest.approx(0.9740769841801067)


def test_bt_is_finite_for_huge_differences():
    # log(sigmoid(-200)) is log(0) = -inf in float32; logsigmoid gives exactly -200.
    loss = rm.bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(200.0)
    assert torch.isinf(-torch.log(torch.sigmoid(torch.tensor(-200.0))))  # what the naive form would give


# -----------------------------------------------------------------------------
# K-wise (InstructGPT)


def test_kwise_with_k2_equals_pairwise():
    r = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    assert rm.kwise_loss(r).item() == pytest.approx(rm.bradley_terry_loss(r[:, 0], r[:, 1]).item(), abs=1e-6)


def test_kwise_k3_hand_worked():
    rewards = torch.tensor([[2.0, 1.0, 0.0],    # prompt 1, best first: pairs (2,1) (2,0) (1,0), differences 1, 2, 1
                            [0.0, 1.0, 2.0]])   # prompt 2, ranked against its rewards: differences -1, -2, -1
    prompt1 = (softplus(-1) + softplus(-2) + softplus(-1)) / 3  # (0.31326 + 0.12693 + 0.31326) / 3 = 0.25115
    prompt2 = (softplus(1) + softplus(2) + softplus(1)) / 3     # (1.31326 + 2.12693 + 1.31326) / 3 = 1.58448
    assert prompt1 == pytest.approx(0.2511504620264728)
    assert rm.kwise_loss(rewards).item() == pytest.approx((prompt1 + prompt2) / 2, abs=1e-6)


def test_kwise_k4_hand_worked():
    # rewards [0.5, 1.5, -1, 0], best first. The C(4,2) = 6 pairs i < j and r_i - r_j:
    #   (0,1) -1.0   (0,2) 1.5   (0,3) 0.5   (1,2) 2.5   (1,3) 1.5   (2,3) -1.0
    # loss = mean of softplus(-(r_i - r_j)):
    #   softplus(1) + softplus(-1.5) + softplus(-0.5) + softplus(-2.5) + softplus(-1.5) + softplus(1), over 6
    #   = (1.31326 + 0.20141 + 0.47408 + 0.07889 + 0.20141 + 1.31326) / 6 = 0.59705
    expected = (softplus(1) + softplus(-1.5) + softplus(-0.5) + softplus(-2.5) + softplus(-1.5) + softplus(1)) / 6
    assert expected == pytest.approx(0.597053, abs=1e-6)
    assert rm.kwise_loss(torch.tensor([[0.5, 1.5, -1.0, 0.0]])).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("K", [3, 4, 7])
def test_kwise_divides_by_k_choose_2_once(K):
    """Equal rewards: every pair costs log 2, so the mean over pairs is log 2 whatever K. minChatGPT's
    KPairwiseLoss divides by C(K, 2) twice and would give log 2 / C(K, 2)."""
    loss = rm.kwise_loss(torch.zeros(5, K)).item()
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    assert loss != pytest.approx(math.log(2) / math.comb(K, 2), abs=1e-3)


def test_kwise_valid_mask_ignores_missing_responses():
    # Prompt 2 has two real responses; its third slot holds garbage that must not count.
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.5, -0.5, 1e4]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    prompt1 = (softplus(-1) + softplus(-2) + softplus(-1)) / 3
    prompt2 = softplus(-1.0)  # its only pair, r = 0.5 vs -0.5
    assert rm.kwise_loss(rewards, valid).item() == pytest.approx((prompt1 + prompt2) / 2, abs=1e-6)


# -----------------------------------------------------------------------------
# The divergent-suffix loss (DeepSpeed-Chat), --loss_positions=suffix


def test_divergent_suffix_loss_hand_worked():
    # One pair, positions 0-4. Tokens: chosen [5 6 7] (then -1: ended), rejected [5 6 8 9 4]. They first differ at
    # position 2 and the longer ends after position 4, so the loss averages positions 2, 3, 4. Past its end the
    # chosen sequence keeps its last score, 1.5 (comparison_scores repeats it).
    tokens = torch.tensor([[[5, 6, 7, -1, -1], [5, 6, 8, 9, 4]]])
    scores = torch.tensor([[[9.0, 9.0, 1.5, 1.5, 1.5], [-9.0, -9.0, 0.5, 2.5, 1.5]]])
    # differences at 2, 3, 4: 1.0, -1.0, 0.0 -> (softplus(-1) + softplus(1) + softplus(0)) / 3
    expected = (softplus(-1.0) + softplus(1.0) + math.log(2)) / 3  # (0.31326 + 1.31326 + 0.69315) / 3 = 0.77322
    assert expected == pytest.approx(0.773224, abs=1e-6)
    assert rm.divergent_suffix_loss(scores, tokens).item() == pytest.approx(expected, abs=1e-6)
    # positions 0-1 (the shared prompt, huge differences) are left out; a margin shifts every position's difference
    with_margin = (softplus(-0.5) + softplus(1.5) + softplus(0.5)) / 3
    assert rm.divergent_suffix_loss(scores, tokens, margin=0.5).item() == pytest.approx(with_margin, abs=1e-6)


def test_divergent_suffix_loss_with_one_score_per_sequence_is_the_last_token_loss():
    """The same score at every position: each pair's mean is its one difference, so pairs give Bradley-Terry and
    rankings (with a missing response) the K-wise loss, whatever the lengths and the divergence points."""
    gen = torch.Generator().manual_seed(0)
    for K, valid in ((2, None), (4, torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]]))):
        B, L = 3, 6
        rewards = torch.randn(B, K, generator=gen)
        tokens = torch.randint(0, 4, (B, K, L), generator=gen)
        tokens[:, :, 0] = 9  # a shared first token
        tokens[0, 1, 4:] = -1  # a shorter response
        scores = rewards[..., None].expand(B, K, L)
        expected = rm.bradley_terry_loss(rewards[:, 0], rewards[:, 1]) if K == 2 else rm.kwise_loss(rewards, valid)
        assert rm.divergent_suffix_loss(scores, tokens, valid).item() == pytest.approx(expected.item(), abs=1e-6)


def test_loss_positions_suffix_on_the_toy_profile_last_on_real_data():
    from runtime import parse_config
    assert parse_config(rm.Config, [], {"real": rm.REAL_DATA}).loss_positions == "suffix"
    assert parse_config(rm.Config, ["--dataset=hh.jsonl"], {"real": rm.REAL_DATA}).loss_positions == "last"
    with pytest.raises(SystemExit, match="--loss_positions='first': choose last or suffix"):
        rm.main(["--loss_positions=first"])


def test_ranked_pair_differences_order():
    x = torch.tensor([[3.0, 1.0, 0.0]])
    assert rm.ranked_pair_differences(x, torch.ones(1, 3, dtype=torch.bool)).tolist() == [2.0, 3.0, 1.0]
    assert rm.ranked_pair_differences(x, torch.tensor([[True, False, True]])).tolist() == [3.0]


# -----------------------------------------------------------------------------
# The score is read at the EOS, whatever the padding


def test_last_token_index_both_paddings():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert evaluate.last_token_index(right).tolist() == [2, 4, 0]
    assert evaluate.last_token_index(left).tolist() == [4, 4, 4]


def tiny_reward_model(vocab_size=30, seed=0):
    model = GPT(config_for("tiny", vocab_size=vocab_size, scalar_head=True)).eval()
    model.init_weights(seed=seed)
    return model


def test_reward_is_the_same_for_left_and_right_padding():
    model = tiny_reward_model()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 29, (n,), generator=g).tolist() + [29] for n in (9, 4, 1, 6)]  # each ends in EOS 29
    with torch.no_grad():
        right_ids, right_mask = data.pad_right(seqs, pad_id=29)
        left_ids, left_mask = data.pad_left(seqs, pad_id=29)
        right = evaluate.sequence_rewards(model(right_ids, attention_mask=right_mask, head="score"), right_mask)
        left = evaluate.sequence_rewards(model(left_ids, attention_mask=left_mask, head="score"), left_mask)
        alone = torch.stack([model(torch.tensor([s]), head="score")[0, -1] for s in seqs])
    assert torch.allclose(right, left, atol=1e-5), (right, left)
    assert torch.allclose(right, alone, atol=1e-5)
    # Guard: reading the last column of the right-padded batch would be wrong for the shorter rows.
    with torch.no_grad():
        last_column = model(right_ids, attention_mask=right_mask, head="score")[:, -1]
    assert not torch.allclose(last_column[1:], alone[1:], atol=1e-3)


def test_collate_comparisons_k2_is_collate_pairs():
    items = [{"prompt": [1, 2], "responses": [[3, 9], [4, 5, 9]], "golds": None},
             {"prompt": [6], "responses": [[7, 8, 8, 9], [9]], "golds": None}]
    ours = rm.collate_comparisons(items, pad_id=9, K=2)
    theirs = data.collate_pairs([(it["prompt"], *it["responses"]) for it in items], pad_id=9)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["valid"].all()


def test_encode_ranked_drops_ties_made_by_truncation():
    tok = data.get_tokenizer("char")
    cfg = rm.Config(data_format="ranked", max_prompt_tokens=3, max_response_tokens=2)
    records = [{"prompt": "abcd=", "responses": ["ab", "abc", "ba", "abd"], "golds": [1.0, 0.5, 0.2, 0.1]},
               {"prompt": "ab=", "responses": ["aa", "aab"]}]  # cut to 2 tokens: "a" + "a" twice, a tie
    stats = data.TruncationStats()
    items = rm.encode_comparisons(records, tok, cfg, stats)
    # Record 1, cut to 2 tokens: "ab" -> a,b  "abc" -> a,b (tie with the best)  "ba" -> b,a  "abd" -> a,b (tie);
    # EOS is cut off every one of them (2 letters + EOS > 2 tokens).
    assert len(items) == 1
    assert items[0]["prompt"] == tok.encode("cd=")  # cut from the left
    assert items[0]["responses"] == [tok.encode("ab"), tok.encode("ba")]
    assert items[0]["golds"] == [1.0, 0.2]  # kept aligned with the responses
    assert stats.pairs_dropped_identical == 3  # ("ab","abc"), ("ab","abd"), and record 2's pair
    assert stats.prompts_truncated == 1 and stats.responses_truncated == 6  # "ab=" fits in 3 tokens


def test_normalization_gain_bias():
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population std sqrt(3.5)
    gain, bias = rm.normalization_gain_bias(raw, with_gain=False)
    assert (gain, bias) == (1.0, -3.0)
    gain, bias = rm.normalization_gain_bias(raw, with_gain=True)
    z = gain * raw + bias
    assert gain == pytest.approx(1 / math.sqrt(3.5))
    assert z.mean().item() == pytest.approx(0, abs=1e-6) and z.std(unbiased=False).item() == pytest.approx(1, abs=1e-6)


# -----------------------------------------------------------------------------
# Parity with TRL's RewardTrainer and HF's GPT2ForSequenceClassification


def test_bt_loss_and_accuracy_match_trl_reward_trainer(tmp_path):
    """TRL's own compute_loss (trl/trainer/reward_trainer.py, trl==1.12.0: L743-783) on a tiny
    GPT2ForSequenceClassification that holds our weights, fed by TRL's DataCollatorForPreference. Building a
    whole RewardTrainer needs a tokenizer and a datasets.Dataset; compute_loss only reads self.model.training,
    self.args.center_rewards_coefficient, self.accelerator.gather(_for_metrics) and self._metrics, so it is called
    unbound with a stand-in for self: the loss and metric lines that run are TRL's."""
    pytest.importorskip("transformers", reason="TRL parity needs transformers (requirements-dev.txt)")
    trl_reward = pytest.importorskip("trl.trainer.reward_trainer", reason="TRL parity needs trl==1.12.0 (requirements-dev.txt)")
    import transformers

    ours = tiny_reward_model(vocab_size=30, seed=4)
    with torch.no_grad():
        ours.score.bias.zero_()  # HF's score Linear has no bias
    ours.save_pretrained(str(tmp_path / "rm"))
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(
        str(tmp_path / "rm"), num_labels=1, pad_token_id=0).eval()  # pad 0: our sequences never contain 0

    g = torch.Generator().manual_seed(5)
    def seq(n):
        return torch.randint(1, 29, (n,), generator=g).tolist() + [29]  # ends in EOS 29, no 0 inside
    examples = [{"chosen_ids": seq(a), "rejected_ids": seq(b), "margin": m}
                for a, b, m in [(5, 3, 0.0), (2, 7, 0.5), (6, 6, -0.3), (1, 4, 1.0), (8, 2, 0.0)]]
    inputs = trl_reward.DataCollatorForPreference(pad_token_id=0)(examples)

    stand_in = SimpleNamespace(
        model=hf, args=SimpleNamespace(center_rewards_coefficient=None), _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x))
    with torch.no_grad():
        trl_loss, outputs = trl_reward.RewardTrainer.compute_loss(stand_in, hf, dict(inputs), return_outputs=True)
        scalars = ours(inputs["input_ids"], attention_mask=inputs["attention_mask"], head="score")
    mine = evaluate.sequence_rewards(scalars, inputs["attention_mask"])
    B = len(examples)
    assert torch.allclose(mine, outputs.logits.squeeze(-1), atol=1e-6)  # same reward, read at the same token
    chosen, rejected = mine[:B], mine[B:]
    assert rm.bradley_terry_loss(chosen, rejected, inputs["margin"]).item() == pytest.approx(trl_loss.item(), abs=1e-6)
    diffs = rm.ranked_pair_differences(torch.stack([chosen, rejected], 1), torch.ones(B, 2, dtype=torch.bool))
    assert (diffs > 0).float().mean().item() == pytest.approx(stand_in._metrics["eval"]["accuracy"][0])
    assert diffs.mean().item() == pytest.approx(stand_in._metrics["eval"]["margin"][0], abs=1e-6)


# -----------------------------------------------------------------------------
# End to end on the default task (tiny model, a few steps)


def tiny_sft(path: Path, tokenizer: str = "char", seed: int = 0) -> str:
    tok = data.get_tokenizer(tokenizer)
    model = GPT(config_for("tiny", vocab_size=tok.vocab_size, tokenizer=tok.name))
    model.init_weights(seed=seed)
    model.save_pretrained(str(path / "policy"))
    return str(path)


def tiny_args(sft: str, run_dir: Path, *extra) -> list[str]:
    return [f"--sft={sft}", f"--run_dir={run_dir}", "--max_train_examples=64", "--batch_size=16",
            "--micro_batch_size=8", "--max_steps=4", "--warmup_steps=1", "--eval_every=2", "--eval_examples=32",
            "--normalize_examples=24", "--log_every=1", "--lr=1e-3", *extra]


@pytest.mark.parametrize("flag, suffix_calls", [([], 8), (["--loss_positions=last"], 0)])
def test_training_uses_the_loss_that_loss_positions_names(tmp_path, monkeypatch, flag, suffix_calls):
    """The loop hands comparison_loss the per-position scores, so the default trains on the divergent suffix (one
    call per micro-batch: 4 steps x 2 micro-batches) and --loss_positions=last never calls it; evaluation never does."""
    calls, suffix = [], rm.divergent_suffix_loss
    monkeypatch.setattr(rm, "divergent_suffix_loss", lambda *a, **k: calls.append(1) or suffix(*a, **k))
    sft = tiny_sft(tmp_path / "sft")
    rm.main(tiny_args(sft, tmp_path / "rm", *flag))
    assert len(calls) == suffix_calls


@pytest.mark.parametrize("extra", [[], ["--normalize_gain", "--normalize_on=references"],
                                   ["--data_format=ranked", "--k=4"]], ids=["samples", "references+gain", "ranked"])
def test_end_to_end_writes_a_normalized_reward_model(tmp_path, extra):
    sft = tiny_sft(tmp_path / "sft")
    rm.main(tiny_args(sft, tmp_path / "rm", *extra))
    with open(tmp_path / "rm/final/reward/config.json") as f:
        hf_cfg = json.load(f)
    assert hf_cfg["rlhf_scalar_head"] is True and hf_cfg["rlhf_reward_bias"] != 0.0
    assert (hf_cfg["rlhf_reward_gain"] != 1.0) == ("--normalize_gain" in extra)

    # What ppo.py computes (reward_scores: gain * raw + bias) has mean 0 on the normalization set.
    cfg = rm.parse_config(rm.Config, tiny_args(sft, tmp_path / "rm", *extra))
    d = rm.init_distributed("cpu")
    tok = data.get_tokenizer("char")
    reward = GPT.from_pretrained(str(tmp_path / "rm/final/reward"))
    assert reward.config.reward_bias == hf_cfg["rlhf_reward_bias"]
    norm_set = rm.normalization_set(cfg, tok, d)
    normalized = reward.config.reward_gain * rm.score_sequences(reward, norm_set, tok.eos_id, cfg, d) \
        + reward.config.reward_bias
    assert len(normalized) == 24
    # ppo.py's own read-out (evaluate.reward_scores) on the same sequences, left-padded as PPO pads prompts.
    ids, mask = data.pad_left([p + r for p, r in norm_set], tok.eos_id)
    with torch.no_grad():
        torch.testing.assert_close(evaluate.reward_scores(reward, ids, mask), normalized, atol=1e-5, rtol=0)
    assert normalized.mean().item() == pytest.approx(0.0, abs=1e-4)
    if "--normalize_gain" in extra:
        assert normalized.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)

    # The transformers export scores the same right-padded batch the same, up to its documented constant.
    from transformers import AutoModelForSequenceClassification
    hf_dir = tmp_path / "rm/final/reward_hf"
    hf = AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
    export_cfg = json.load(open(hf_dir / "config.json"))
    pad = export_cfg["pad_token_id"]
    assert pad != tok.eos_id and export_cfg["num_labels"] == 1
    ids, mask = data.pad_right([p + r for p, r in norm_set], pad)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits[:, 0] + export_cfg["rlhf_reward_bias"]
    torch.testing.assert_close(theirs, normalized, atol=1e-5, rtol=0)

    rows = [json.loads(line) for line in open(tmp_path / "rm/metrics.jsonl")]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval/accuracy_gold", "eval/pearson_gold", "eval/margin"} <= set(evals[-1])
    assert any("normalize/bias" in r for r in rows)


def test_gradient_accumulation_does_not_change_the_update(tmp_path):
    """Batch 16 in one micro-batch or in four: the same loss, gradient norm and held-out loss at every step.
    (Weights are not compared: the key biases of attention get a zero gradient up to rounding, which Adam turns
    into lr-sized steps of either sign, harmless but different between the two runs.)"""
    sft = tiny_sft(tmp_path / "sft")
    runs = []
    for micro in (16, 4):
        run = tmp_path / f"micro{micro}"
        rm.main(tiny_args(sft, run, f"--micro_batch_size={micro}", "--max_steps=3", "--eval_every=1",
                          "--normalize_on=none"))
        rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
        runs.append([(r["step"], k, v) for r in rows for k, v in r.items()
                     if k in ("train/loss", "train/accuracy", "grad_norm", "eval/loss")])
    assert len(runs[0]) == 12
    for (step, key, a), (step2, key2, b) in zip(*runs):
        assert (step, key) == (step2, key2)
        assert a == pytest.approx(b, rel=1e-5), (step, key)


@pytest.mark.parametrize("flags,steps", [(["--max_steps=0"], 8), (["--max_steps=0", "--num_epochs=1"], 4),
                                         (["--max_steps=0", "--profile=real", "--max_prompt_tokens=12",
                                          "--max_response_tokens=16"], 4),
                                         (["--max_steps=5"], 5)])
def test_max_steps_zero_trains_num_epochs(tmp_path, flags, steps):
    """64 comparisons in batches of 16: 4 steps an epoch; the toy profile trains 2 epochs, the real profile 1."""
    sft = tiny_sft(tmp_path / "sft")
    rm.main(tiny_args(sft, tmp_path / "rm", "--eval_every=100", *flags))
    with open(tmp_path / "rm/metrics.jsonl") as f:
        assert max(json.loads(line)["step"] for line in f) == steps


def test_packing_is_on_for_the_toy_profile_only():
    """The built-in task trains packed (its padded batches are 30% padding); real data keeps padded batches."""
    from runtime import parse_config
    assert parse_config(rm.Config, [], {"real": rm.REAL_DATA}).packing
    assert not parse_config(rm.Config, ["--dataset=hh.jsonl"], {"real": rm.REAL_DATA}).packing


def test_resume_is_exact(tmp_path):
    sft = tiny_sft(tmp_path / "sft")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rm.main(tiny_args(sft, straight, "--max_steps=6", "--max_train_examples=48"))  # 3 steps/epoch: crosses an epoch
    rm.main(tiny_args(sft, resumed, "--max_steps=6", "--max_train_examples=48", "--stop_after=4"))
    assert not (resumed / "final").exists()
    rm.main(tiny_args(sft, resumed, "--max_steps=6", "--max_train_examples=48", "--resume"))
    a = load_file(str(straight / "final/reward/model.safetensors"))
    b = load_file(str(resumed / "final/reward/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("rlhf_reward_gain", "rlhf_reward_bias"):
        assert (json.load(open(straight / "final/reward/config.json"))[name]
                == json.load(open(resumed / "final/reward/config.json"))[name])


# -----------------------------------------------------------------------------
# Real data: Anthropic HH-RLHF as published


@pytest.mark.skipif(not HH_TEST.exists(), reason=f"{HH_TEST} is absent (see ../shared/data/README.md)")
def test_hh_rlhf_ties_after_truncation_are_dropped_and_counted(tmp_path, capsys):
    tok = data.get_tokenizer("gpt2")
    records = data.load_records(str(HH_TEST), "preference", max_records=400, seed=0)
    cfg = rm.Config(max_prompt_tokens=16, max_response_tokens=3)
    stats = data.TruncationStats()
    items = rm.encode_comparisons(records, tok, cfg, stats)
    assert stats.pairs_dropped_identical > 0  # e.g. two answers that both start " I'm sorry"
    assert len(items) == len(records) - stats.pairs_dropped_identical
    assert all(it["responses"][0] != it["responses"][1] for it in items)
    assert all(len(it["prompt"]) <= 16 and all(len(r) <= 3 for r in it["responses"]) for it in items)
    assert stats.prompts_truncated > 0 and stats.responses_truncated > 0

    # The whole stage runs on it, the tokenizer coming from the SFT checkpoint, with a held-out part of the file.
    sft = tiny_sft(tmp_path / "sft", tokenizer="gpt2")
    rm.main([f"--sft={sft}", f"--run_dir={tmp_path / 'rm'}", f"--dataset={HH_TEST}", "--max_train_examples=32",
             "--batch_size=16", "--max_steps=2", "--eval_examples=16", "--max_prompt_tokens=24",
             "--max_response_tokens=3", "--normalize_on=references", "--normalize_examples=8"])
    out = capsys.readouterr().out
    assert re.search(r"rm: \d+ train / \d+ held-out comparisons .* dropped \d+ pairs identical after truncation", out)
    assert json.load(open(tmp_path / "rm/final/reward/config.json"))["rlhf_tokenizer"] == "gpt2"


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo, FSDP2, accumulation 2 per rank) takes the same steps as one process
    with the whole batch in one micro-batch: the global batch and the loss normalization do not depend on either."""
    import subprocess
    import sys
    sft = tiny_sft(tmp_path / "sft")
    common = ["--device=cpu", "--max_steps=3", "--eval_every=3", "--normalize_gain"]
    rm.main(tiny_args(sft, tmp_path / "one", *common, "--micro_batch_size=16"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(ROOT / "reward_model.py"),
                    *tiny_args(sft, tmp_path / "two", *common, "--micro_batch_size=4")], check=True, env=env, cwd=ROOT,
                   timeout=300)
    rows = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("one", "two")]
    keys = ("train/loss", "train/accuracy", "grad_norm", "eval/loss", "eval/accuracy", "normalize/gain", "normalize/bias")
    pairs = [(a[k], b[k]) for a, b in zip(*rows) for k in keys if k in a]
    assert len(rows[0]) == len(rows[1]) and len(pairs) == 3 * 3 + 2 + 2
    for a, b in pairs:
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5)  # float sums in another order, amplified by Adam


def test_length_baselines_hand_worked():
    # chosen first: shorter in 2 pairs, longer in 1, tied in 1 (half right for both) -> 2.5/4 and 1.5/4
    lengths = [(3, 5), (1, 6), (4, 2), (2, 2)]
    items = [{"responses": [[0] * a, [0] * b]} for a, b in lengths]
    got = rm.length_baselines(items, torch.ones(4, 2, dtype=torch.bool))
    assert got == {"eval/acc_shorter_wins": 0.625, "eval/acc_longer_wins": 0.375}
