"""Attention over packed rows: each row attends only to itself (block-diagonal causal masks).

sample_packing puts several rows in one sequence. `segment_ids` (B, T) says which row each token
belongs to (padding gets an id of its own); token q may attend to token k iff
    segment_ids[b, q] == segment_ids[b, k]  and  k <= q,
so a packed batch computes exactly what its rows compute one by one (tests/test_packing.py), as
axolotl's multipack does with flash-attention's varlen kernel.

Two ways to apply that mask, one result:
* CUDA: FlexAttention (torch.nn.attention.flex_attention, compiled) with a BlockMask. The mask is
  evaluated per 128 x 128 tile and tiles outside every row's triangle are skipped, so a 2048-token
  sequence of ~80-token rows costs about the sum of the rows' squared lengths, not 2048^2.
* elsewhere (the CPU, the tests): the same mask as a dense boolean (B, 1, T, T) tensor through SDPA.
Model code builds the mask once per forward (document_mask) and hands it to every layer's attend().
"""

import functools

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:                                    # torch < 2.5: the dense path only
    BlockMask = create_block_mask = flex_attention = None


def use_flex(device: torch.device) -> bool:
    """FlexAttention where its compiled kernels train: CUDA (its CPU path has no backward)."""
    return flex_attention is not None and torch.device(device).type == "cuda"


def document_mask(segment_ids: torch.Tensor, flex: bool | None = None):
    """The block-diagonal causal mask of segment_ids (B, T): a BlockMask (flex) or a (B, 1, T, T) bool."""
    B, T = segment_ids.shape
    if flex is None:
        flex = use_flex(segment_ids.device)
    if flex:
        def same_row_causal(b, h, q, k):
            return (segment_ids[b, q] == segment_ids[b, k]) & (k <= q)
        return create_block_mask(same_row_causal, B, None, T, T, device=segment_ids.device)
    same_row = segment_ids[:, :, None] == segment_ids[:, None, :]                       # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()       # (T, T)
    return (same_row & causal)[:, None]                                                 # (B, 1, T, T)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, nh, T, hd), k and v (B, nkv, S, hd) -> (B, nh, T, hd).

    mask None: causal (S == T); a bool tensor broadcastable to (B, nh, T, S): True where a query may
    look; a BlockMask: the same through FlexAttention. Grouped-query attention when nkv < nh.
    """
    gqa = k.shape[1] != q.shape[1]
    if BlockMask is not None and isinstance(mask, BlockMask):
        flex = _compiled_flex() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, enable_gqa=gqa)                           # (B, nh, T, hd)
    # A branch, not is_causal=(T > 1): under torch.compile with dynamic shapes (a second sequence
    # length) T > 1 is a SymBool, which SDPA refuses (a graph break in every compiled block); an
    # `if` makes the compiler guard on it and pass a plain True.
    if mask is None and q.shape[2] > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, nh, T, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)      # (B, nh, T, hd)
