"""Padding-free packing (data.pack_sft, GPT.forward(document_ids=...)), REFERENCES 6.3's required tests:

- packed loss and gradients equal the padded ones (float32), on GPT-2 and a Llama-family model (GQA, RoPE);
- changing one document leaves the logits of the other documents of its row unchanged (attention does not leak;
  positions restarting alone would not give this);
- positions restart at 0, an example's first token is never a target, the (sum, count) normalization is the padded
  batch's; sft.py --packing trains to the same losses as the padded run.
"""

import pytest
import torch

import data
import evaluate
from model import GPT, GPTConfig, config_for
from sft import sft_loss

V = 61


def model(family: str):
    if family == "gpt2":
        cfg = config_for("tiny", vocab_size=V)
    else:  # Llama family: RoPE, RMSNorm, SwiGLU, GQA
        cfg = GPTConfig(model_type="llama", vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                        intermediate_size=48, block_size=64, tie_word_embeddings=False)
    m = GPT(cfg)
    m.init_weights(seed=0)
    return m


def examples(seed=0, n=7):
    """(prompt, response) token lists of different lengths, some short enough to share a row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = (int(x) for x in torch.randint(1, 12, (2,), generator=g))
        out.append((torch.randint(1, V, (p,), generator=g).tolist(), torch.randint(1, V, (r,), generator=g).tolist()))
    return out


def loss_and_grads(m, batch):
    m.zero_grad()
    logits = m(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"),
               document_ids=batch.get("document_ids"))
    total, count = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    (total / count).backward()
    return total.item(), count.item(), {n: p.grad.clone() for n, p in m.named_parameters()}


def test_pack_sft_layout_by_hand():
    pairs = [([5, 6], [7]), ([8], [9, 10]), ([11, 12, 13], [14, 15])]  # lengths 3, 3, 5 -> rows [0, 1] and [2]
    b = data.pack_sft(pairs, pad_id=0, row_tokens=6)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 0]]
    assert b["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, -1]]  # the example's index
    # Targets: response tokens only; token 8 (the second example's first) is never one, although 7 precedes it.
    assert b["loss_mask"].tolist() == [[0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert b["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    padded = data.collate_sft(pairs, pad_id=0)
    assert b["loss_mask"].sum() == padded["loss_mask"].sum()  # the same target count: the same normalization


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_loss_and_gradients_equal_padded(family):
    pairs = examples()
    packed, padded = data.pack_sft(pairs, pad_id=0, row_tokens=40), data.collate_sft(pairs, pad_id=0)
    assert packed["input_ids"].size(0) < padded["input_ids"].size(0)  # it did pack
    m = model(family)
    s_pad, c_pad, g_pad = loss_and_grads(m, padded)
    s_pack, c_pack, g_pack = loss_and_grads(m, packed)
    assert c_pack == c_pad
    assert s_pack == pytest.approx(s_pad, rel=1e-6)
    for name, g in g_pad.items():
        assert (g_pack[name] - g).abs().max() <= 1e-6 * max(g.abs().max(), 1e-3), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_changing_one_document_leaves_the_others_in_its_row_unchanged(family):
    pairs = [([3, 4, 5], [6, 7]), ([8, 9], [10]), ([11, 12, 13, 14], [15, 16])]
    batch = data.pack_sft(pairs, pad_id=0, row_tokens=20)
    assert batch["input_ids"].size(0) == 1  # all three in one row
    m = model(family).eval()
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 5:8] = torch.tensor([40, 41, 42])  # the whole middle document
    with torch.no_grad():
        a, b = (m(x["input_ids"], position_ids=x["position_ids"], document_ids=x["document_ids"]) for x in (batch, changed))
    assert torch.equal(a[0, :5], b[0, :5])  # before it: causal anyway
    assert torch.equal(a[0, 8:], b[0, 8:])  # after it: only the document mask keeps it out
    assert not torch.allclose(a[0, 5:8], b[0, 5:8])
    # Each document's logits are those of the document alone in a batch of one.
    with torch.no_grad():
        alone = m(torch.tensor([pairs[2][0] + pairs[2][1]]))
    torch.testing.assert_close(a[0, 8:], alone[0], atol=1e-5, rtol=1e-5)


def test_sft_packing_trains_to_the_same_losses(tmp_path):
    from test_sft import metric_rows, run_sft
    run_sft(str(tmp_path / "padded"), max_steps=4, micro_batch_size=4)
    run_sft(str(tmp_path / "packed"), max_steps=4, micro_batch_size=4, packing=True)
    a, b = ([r["train/loss"] for r in metric_rows(str(tmp_path / run)) if "train/loss" in r] for run in ("padded", "packed"))
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dpo_packed_sequence_logps_and_gradients_equal_padded(family):
    """dpo.pair_logps on packed rows: the same per-sequence sums (and per-token averages, IPO) and gradients."""
    import dpo
    from runtime import Dist
    g = torch.Generator().manual_seed(3)
    triples = [(p, r, torch.randint(1, V, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist())
               for p, r in examples(seed=3, n=5)]
    m = model(family)
    for average in (False, True):
        out = {}
        for packed in (False, True):
            m.zero_grad()
            chosen, rejected = dpo.pair_logps(m, data.collate_pairs(triples, 0, packed=packed), Dist(), False, average)
            (chosen.sum() - 2 * rejected.sum()).backward()
            out[packed] = (chosen.detach(), rejected.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
        for a, b in zip(out[False][:2], out[True][:2]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-6)
        for name, grad in out[False][2].items():
            assert (out[True][2][name] - grad).abs().max() <= 1e-6 * max(grad.abs().max(), 1e-3), name


def test_dpo_packing_trains_to_the_same_losses(tmp_path):
    import dpo
    from test_dpo import metric_rows, tiny_args, tiny_sft
    sft = tiny_sft(tmp_path / "sft")
    for run, extra in (("padded", []), ("packed", ["--packing"])):
        dpo.main(tiny_args(sft, tmp_path / run, "--max_steps=3", *extra))
    a, b = ([r["train/loss"] for r in metric_rows(tmp_path / run) if "train/loss" in r] for run in ("padded", "packed"))
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("loss", ["last", "suffix"])
def test_reward_model_packed_rewards_and_gradients_equal_padded(family, loss):
    """reward_model.comparison_scores on packed rows: each sequence's scores by position, as padded, so the same
    rewards (at its own last token) and the same gradients of either loss."""
    import reward_model
    from runtime import Dist
    items = [{"prompt": p, "responses": [r, r[::-1] + [7]], "golds": None} for p, r in examples(seed=4, n=5)]
    m = model(family)
    m.score = torch.nn.Linear(m.config.n_embd, 1)  # a head, drawn at random
    cfg = reward_model.Config(loss_positions=loss)
    out = {}
    for packed in (False, True):
        m.zero_grad()
        batch = reward_model.collate_comparisons(items, 0, 2, packed=packed)
        scores, tokens = reward_model.comparison_scores(m, batch, Dist(), False)
        rewards = reward_model.comparison_rewards(m, batch, Dist(), False)
        torch.testing.assert_close(rewards, scores[..., -1])
        if not packed:  # the one read-out of a reward, at each sequence's last real token
            with torch.no_grad():
                scalars = m(batch["input_ids"], attention_mask=batch["attention_mask"], head="score")
            last = evaluate.sequence_rewards(scalars, batch["attention_mask"]).view(2, len(items)).T
            torch.testing.assert_close(rewards.detach(), last)
        reward_model.comparison_loss(rewards, batch["valid"], cfg, scores, tokens).backward()
        out[packed] = (scores.detach(), tokens, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-6)
    assert torch.equal(out[True][1], out[False][1])
    for name, grad in out[False][2].items():
        assert (out[True][2][name] - grad).abs().max() <= 1e-6 * max(grad.abs().max(), 1e-3), name
