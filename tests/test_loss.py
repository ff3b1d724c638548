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


def test_uneven_gradient_accumulation_equals_one_big_batch_float64():
    """Token-weighted accumulation (qlora.trainer.accumulate_gradients): micro-batches with 2, 1 and 3 rows of
    different answer lengths give the loss and LoRA gradients of one batch of all 6 rows (float64)."""
    from conftest import float64_lora_llama
    from qlora.data import Example, collate
    from qlora.trainer import accumulate_gradients

    model = float64_lora_llama("gqa")
    gen = torch.Generator().manual_seed(0)
    examples = []
    for prompt_len, answer_len in [(5, 2), (3, 9), (7, 1), (4, 14), (6, 3), (2, 5)]:
        ids = torch.randint(3, 128, (prompt_len + answer_len,), generator=gen).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:]))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(batch, num_items):
        hidden = model(batch["input_ids"], return_hidden=True)
        return causal_lm_loss(hidden, model.lm_head.weight, batch["labels"], num_items=num_items)

    def grads_after(micro_batches):
        for p in params:
            p.grad = None
        loss = accumulate_gradients(micro_batches, loss_of, lambda l: l.backward())
        return loss, [p.grad.clone() for p in params]

    split = [collate(examples[0:2], 0), collate(examples[2:3], 0), collate(examples[3:6], 0)]  # own lengths
    loss_ga, grads_ga = grads_after(split)
    loss_one, grads_one = grads_after([collate(examples, 0)])
    assert abs(loss_ga - loss_one) < 1e-12
    for g, r in zip(grads_ga, grads_one):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)

    # the old rule (mean of micro-batch means) gives another loss: the test can tell them apart
    means = [loss_of(b, None).item() for b in split]
    assert abs(sum(means) / 3 - loss_one) > 1e-3
