"""Packing keeps rows apart: a packed batch gives each row the loss, hidden states and LoRA gradients
it has when run alone (float64, Llama 2 and GQA configs, Falcon-7B's multi-query and Falcon-40B's
grouped-query layouts). References: the rows one by one through the
same model (plain causal attention, positions 0..n-1), and SDPA with a dense mask for FlexAttention."""

import pytest
import torch

from conftest import float64_lora_falcon, float64_lora_llama
from qlora.attention import attend, document_mask, flex_attention
from qlora.data import IGNORE_INDEX, Example, collate, pack
from qlora.loss import causal_lm_loss

LENGTHS = [(3, 4), (6, 2), (2, 9), (5, 5), (4, 1), (7, 3), (2, 2)]   # (prompt, answer) tokens per row


def rows(seed: int = 0) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n_prompt, n_answer in LENGTHS:
        ids = torch.randint(3, 128, (n_prompt + n_answer,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]))
    return out


def test_pack_keeps_whole_rows_within_sequence_len_and_masks_each_first_label():
    examples = rows()
    packed = pack(examples, 16)
    assert all(len(p.input_ids) <= 16 and sum(p.seq_lens) == len(p.input_ids) for p in packed)
    # every row appears exactly once, whole, and the sequences are few (lengths sum to 51: >= 4)
    pieces = []
    for p in packed:
        start = 0
        for n in p.seq_lens:
            pieces.append((tuple(p.input_ids[start:start + n]), tuple(p.labels[start:start + n])))
            start += n
    want = [(tuple(e.input_ids), tuple([IGNORE_INDEX] + e.labels[1:])) for e in examples]
    assert sorted(pieces) == sorted(want)
    assert len(packed) == 4
    batch = collate(packed, pad_id=0, pad_to=16)
    first = packed[0]
    assert batch["position_ids"][0].tolist()[:len(first.input_ids)] == \
        [i for n in first.seq_lens for i in range(n)]
    with pytest.raises(ValueError, match="sequence_len"):
        pack(examples, 8)


@pytest.mark.parametrize("arch, variant", [("llama", "mha"), ("llama", "gqa"), ("falcon", "7b"), ("falcon", "40b")])
def test_packed_batch_equals_rows_one_by_one_float64(arch, variant):
    model = (float64_lora_llama if arch == "llama" else float64_lora_falcon)(variant)
    examples = rows()
    params = [p for p in model.parameters() if p.requires_grad]
    n_items = sum(sum(l != IGNORE_INDEX for l in e.labels[1:]) for e in examples)

    def grads(loss):
        return torch.autograd.grad(loss, params)

    # rows one by one: plain causal attention from position 0
    alone_losses, alone_hidden, total = [], [], 0
    for e in examples:
        b = collate([e], 0)
        h = model(b["input_ids"], return_hidden=True)
        alone_hidden.append(h[0])
        loss = causal_lm_loss(h, model.lm_head.weight, b["labels"], num_items=n_items)
        alone_losses.append(loss)
        total = total + loss
    alone_grads = grads(total)

    # packed: 4 sequences of <= 16 tokens, padded to 16
    packed = pack(examples, 16)
    b = collate(packed, 0, pad_to=16)
    h = model(b["input_ids"], return_hidden=True, position_ids=b["position_ids"], segment_ids=b["segment_ids"])
    packed_loss = causal_lm_loss(h, model.lm_head.weight, b["labels"], num_items=n_items)
    packed_grads = grads(packed_loss)

    # per row: find it in the packed batch and compare hidden states and its loss
    by_ids = {tuple(e.input_ids): i for i, e in enumerate(examples)}
    found = 0
    for s, p in enumerate(packed):
        start = 0
        for n in p.seq_lens:
            i = by_ids[tuple(p.input_ids[start:start + n])]
            torch.testing.assert_close(h[s, start:start + n], alone_hidden[i], rtol=1e-10, atol=1e-12)
            row_loss = causal_lm_loss(h[s:s + 1, start:start + n], model.lm_head.weight,
                                      b["labels"][s:s + 1, start:start + n], num_items=n_items)
            torch.testing.assert_close(row_loss, alone_losses[i].detach(), rtol=1e-10, atol=1e-12)
            start, found = start + n, found + 1
    assert found == len(examples)
    torch.testing.assert_close(packed_loss, total.detach(), rtol=1e-10, atol=1e-12)
    for g, r in zip(packed_grads, alone_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)

    # without the mask and positions (plain concatenation) the rows leak into each other
    leaky = model(b["input_ids"], return_hidden=True)
    assert not torch.allclose(leaky, h)


@pytest.mark.skipif(flex_attention is None, reason="this torch has no FlexAttention")
def test_flex_block_mask_gives_the_dense_mask_result():
    """The CUDA path (FlexAttention + BlockMask) against the CPU path (SDPA + dense mask), forward:
    FlexAttention's CPU path has no backward."""
    torch.manual_seed(0)
    B, nh, nkv, T, hd = 2, 4, 2, 48, 16
    segment_ids = torch.tensor([[0] * 5 + [1] * 20 + [2] * 13 + [3] * 10,
                                [0] * 31 + [1] * 17])
    q = torch.randn(B, nh, T, hd)
    k, v = torch.randn(B, nkv, T, hd), torch.randn(B, nkv, T, hd)
    dense = attend(q, k, v, document_mask(segment_ids, flex=False))
    flex = attend(q, k, v, document_mask(segment_ids, flex=True))
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    # the mask is the block-diagonal causal one: row 1 of sequence 0 starts fresh at token 5
    ref = attend(q[:1, :, 5:25], k[:1, :, 5:25], v[:1, :, 5:25])
    torch.testing.assert_close(dense[:1, :, 5:25], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_with_per_row_positions_equals_the_reference(dtype):
    """The packed path's RoPE kernel call (one row of B*T positions) against llama.model.apply_rope
    with (B, T, hd) tables; odd T, GQA head counts. Runs the Triton kernel (TRITON_INTERPRET=1 on the CPU)."""
    from kernels.common import INTERPRET
    from llama.model import apply_rope, apply_rope_fused, rope_cos_sin

    q = torch.randn(2, 4, 7, 16).to(dtype)
    if not (q.is_cuda or INTERPRET):
        pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")
    k = torch.randn(2, 2, 7, 16).to(dtype)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 0]])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    cos, sin = rope_cos_sin(inv_freq, positions, dtype)                        # (B, T, hd)
    fq, fk = apply_rope_fused(q, k, cos, sin)
    torch.testing.assert_close(fq, apply_rope(q, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(fk, apply_rope(k, cos, sin), rtol=0, atol=0)
