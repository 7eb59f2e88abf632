"""Group methods in ppo.py (GRPO, Dr. GRPO, RLOO, REINFORCE++), against hand-worked values.

Parity with verl's and TRL's own code is in tests/test_parity_verl_group.py and tests/test_parity_trl_grpo.py;
the bug classes of issue #16 that these methods raise are in tests/test_bug0*.py.
"""

import math

import pytest
import torch

import ppo


def right_padded_mask(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


# -----------------------------------------------------------------------------
# The bug: an empty response under seq_mean_token_mean


def test_empty_response_does_not_poison_seq_mean_token_mean_gradient():
    """A response whose action mask is all False (its reward model score was non-finite, make_experience clears
    it) must be left out of the loss and of the gradient; before the fix its per-sequence mean was 0/0 = NaN,
    and although indexing dropped it from the loss *value*, backward multiplied that NaN into every gradient."""
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], requires_grad=True)
    mask = right_padded_mask([2, 0, 3], 3)  # row 1 is empty
    loss = ppo.aggregate(losses, mask, "seq_mean_token_mean")
    loss.backward()
    # Hand-worked: mean of the two non-empty rows' means: ((1 + 2) / 2 + (7 + 8 + 9) / 3) / 2 = (1.5 + 8) / 2.
    assert loss.item() == pytest.approx(4.75)
    assert torch.isfinite(losses.grad).all(), losses.grad
    # d loss / d l_bt = 1 / (B_valid * L_b) on valid tokens: 1/4 for row 0, 1/6 for row 2, 0 elsewhere.
    expected = torch.tensor([[0.25, 0.25, 0.0], [0.0, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]])
    torch.testing.assert_close(losses.grad, expected)
