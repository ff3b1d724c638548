"""Chunked next-token loss vs F.cross_entropy on the full logits, in float64."""

import pytest
import torch
import torch.nn.functional as F

from qlora.loss import IGNORE_INDEX, causal_lm_loss


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_full_cross_entropy(chunk_size):
    torch.manual_seed(chunk_size)
    B, T, C, V = 3, 11, 16, 50
    hidden = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, C, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 7:] = IGNORE_INDEX

    loss = causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, (hidden, weight))

    logits = hidden @ weight.t()                                   # (B, T, V)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    # the chunks compute logits in float32 (as training does), so compare at float32 precision
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_no_labelled_position_gives_zero_loss():
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    loss = causal_lm_loss(hidden, torch.randn(9, 4), torch.full((1, 5), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0
