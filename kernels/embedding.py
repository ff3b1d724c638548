"""Embedding rows gathered from a table in pinned host memory, by the GPU itself (embeddings_on_host).

Reference: torch.index_select(table, 0, ids), i.e. F.embedding(ids, table).

A frozen embedding table need not sit in GPU memory (250 MiB at Llama-2-7B, 1 GiB at Llama-3-8B):
only the B*T rows a step looks up are ever read. Pinned (page-locked, registered) host memory is
mapped into the GPU's address space (unified virtual addressing), so a kernel can load from it
directly over PCIe: each program reads one looked-up row (C values, a few KB) and writes it to the
GPU. No copy of the ids to the host, so no wait for the GPU, and no work for the CPU: the lookup is
one kernel on the stream like any other (and a CUDA graph can capture it). 32 MiB of rows per 7B
micro-batch of 2 x 2048 is well under a millisecond of PCIe time.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _gather_rows_kernel(table_ptr, ids_ptr, out_ptr, vocab, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)                                                    # which looked-up row
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)                     # (BLOCK,)
    idx = tl.load(ids_ptr + row).to(tl.int64)                                 # its id in the table
    inside = (idx >= 0) & (idx < vocab)                                       # never read past the table
    values = tl.load(table_ptr + tl.where(inside, idx, 0) * C + cols, mask=cols < C)   # over PCIe when pinned
    values = tl.where(inside, values, tl.zeros_like(values))
    tl.store(out_ptr + row.to(tl.int64) * C + cols, values, mask=cols < C)


def gather_rows(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (N, C) = table[ids] for table (vocab, C) contiguous (pinned host memory, or the device's),
    ids (N,) integers on out's device. An id outside [0, vocab) gives a row of zeros (checking would
    read the ids back to the host; train.py checks the tokenizer against the vocabulary once)."""
    (vocab, C), n = table.shape, ids.numel()
    if n:
        _gather_rows_kernel[(n, triton.cdiv(C, BLOCK))](table, ids, out, vocab, C, BLOCK, num_warps=4)
    return out
