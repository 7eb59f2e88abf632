"""Bug class 7: position ids, padding (REFERENCES 5.2a row 7).

TRL #469 and #6800: GPT-2 forwards under left padding without position_ids; nnsight #672: one pad shifts
GPT-2 small's next-token distribution by ~0.9 TV. A sequence's log-probs must be the same unpadded,
left-padded by k, or right-padded, for every model family model.py builds (FAMILIES; a new family adds a
line). Packing several sequences into one row is not implemented, so it is not in the matrix.
"""

import pytest
import torch

from model import GPT, config_for, generate, token_logprobs

FAMILIES = {
    "gpt2-tiny": lambda: GPT(config_for("tiny", vocab_size=50)),
    "gpt2-cpu-small": lambda: GPT(config_for("cpu-small", vocab_size=50)),
}
TOL = 1e-5  # fp32 on CPU; the masked and the fused attention kernels differ by float rounding only


def _model(family):
    model = FAMILIES[family]().eval()
    model.init_weights(seed=0)
    return model


def _logp(model, ids, mask):
    with torch.no_grad():
        return token_logprobs(model(ids, attention_mask=mask)[:, :-1], ids[:, 1:], temperature=0.7)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad", [1, 3, 7])
def test_left_and_right_padding_give_unpadded_logprobs(family, pad):
    model = _model(family)
    seq = torch.randint(1, 50, (1, 9), generator=torch.Generator().manual_seed(pad))
    plain = _logp(model, seq, torch.ones_like(seq))
    zeros = torch.zeros(1, pad, dtype=torch.long)
    left_ids, left_mask = torch.cat([zeros, seq], 1), torch.cat([zeros, torch.ones_like(seq)], 1)
    right_ids, right_mask = torch.cat([seq, zeros], 1), torch.cat([torch.ones_like(seq), zeros], 1)
    left = _logp(model, left_ids, left_mask)[:, pad:]
    right = _logp(model, right_ids, right_mask)[:, :8]
    assert (left - plain).abs().max() <= TOL, f"{family}: left padding by {pad} moved log-probs by {(left - plain).abs().max():.3g}"
    assert (right - plain).abs().max() <= TOL, f"{family}: right padding by {pad} moved log-probs by {(right - plain).abs().max():.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_padding_batch_and_cached_generation(family):
    """A left-padded batch of prompts of different lengths: the greedy continuation and its per-step logits
    (KV cache, mask-derived positions) equal each prompt generated alone."""
    model = _model(family)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 50, (n,), generator=g) for n in (6, 2, 4)]
    P = 6
    ids = torch.zeros(3, P, dtype=torch.long)
    mask = torch.zeros(3, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = p, 1
    batched, _ = generate(model, ids, mask, 6, temperature=0)
    for i, p in enumerate(prompts):
        alone, _ = generate(model, p[None], torch.ones(1, len(p), dtype=torch.long), 6, temperature=0)
        assert torch.equal(batched[i, P:], alone[0, len(p):]), (family, i)


@pytest.mark.parametrize("family", FAMILIES)
def test_guard_positions_must_come_from_the_mask(family):
    """Guard for the tests above: counting positions from the left edge (arange), as an HF GPT-2 forward
    without position_ids does, changes a left-padded row's log-probs by far more than TOL."""
    model = _model(family)
    seq = torch.randint(1, 50, (1, 9), generator=torch.Generator().manual_seed(0))
    plain = _logp(model, seq, torch.ones_like(seq))
    ids, mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1), torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(seq)], 1)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=torch.arange(12)[None])
    wrong = token_logprobs(logits[:, :-1], ids[:, 1:], 0.7)[:, 3:]
    assert (wrong - plain).abs().max() > 100 * TOL
