"""NF4 dequantization in Triton: packed 4-bit codes + (double-quantized) absmax -> bf16 / fp16.

Reference: qlora.nf4.dequantize_nf4 (pure PyTorch); dequantize_nf4_triton returns exactly
dequantize_nf4(packed, state).to(dtype). The two @triton.jit helpers below (`absmax_of_blocks`,
`dequantize_tile`) are shared with the dequant-matmul (matmul.py) and the decode GEMV (gemv.py).
"""

import math
import os

import torch
import triton
import triton.language as tl

from qlora.nf4 import QuantState

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Kernels run in Triton's CPU interpreter under TRITON_INTERPRET=1; two of its casts need help.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def absmax_of_blocks(block, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                     BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of the given block indices; undoes double quantization (paper section 3)."""
    if DOUBLE_QUANT:
        # absmax = code2[absmax_u8] * absmax2[block // 256] + offset, in fp32 like the reference.
        codes = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + codes) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        return scale + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def dequantize_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                    rows, k0, N, K,
                    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile W[rows, k0:k0 + BLOCK_K] of an NF4 weight [N, K] with K % BLOCKSIZE == 0.

    Rows and columns past the edge read as 0. K % BLOCKSIZE == 0 means no absmax block crosses a
    row, so the tile needs only BLOCK_K / G absmax values per row (G = min(BLOCKSIZE, BLOCK_K)).
    """
    HALF: tl.constexpr = BLOCK_K // 2
    G: tl.constexpr = BLOCKSIZE if BLOCKSIZE < BLOCK_K else BLOCK_K
    row_ok = rows < N                                                          # (BLOCK_N,)
    cols = k0 // 2 + tl.arange(0, HALF)                                        # (HALF,) byte column
    mask = row_ok[:, None] & (cols < K // 2)[None, :]                          # (BLOCK_N, HALF)
    byte = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (K // 2) + cols[None, :], mask=mask, other=0)
    # Element 2i sits in the high nibble, 2i+1 in the low one (bitsandbytes' order).
    q = tl.interleave(byte >> 4, byte & 0xF).to(tl.int32)                     # (BLOCK_N, BLOCK_K)
    values = tl.load(code_ptr + q)                                             # (BLOCK_N, BLOCK_K) fp32

    groups = k0 + tl.arange(0, BLOCK_K // G) * G                              # (BLOCK_K // G,) first column
    block = (rows[:, None].to(tl.int64) * K + groups[None, :]) // BLOCKSIZE    # (BLOCK_N, BLOCK_K // G)
    amask = row_ok[:, None] & (groups < K)[None, :]
    absmax = absmax_of_blocks(block, amask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                              BLOCKSIZE2, DOUBLE_QUANT)                        # (BLOCK_N, BLOCK_K // G)
    values = tl.reshape(values, (BLOCK_N, BLOCK_K // G, G)) * absmax[:, :, None]
    return tl.reshape(values, (BLOCK_N, BLOCK_K))


@triton.jit
def round_to(values, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even (like torch's .to())."""
    if INTERPRET and dtype == tl.bfloat16:
        # Triton's interpreter truncates fp32 -> bf16; round with integer ops there instead.
        bits = values.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)                # finite inputs only (no NaN/Inf here)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return values.to(dtype)


@triton.jit
def dot(a, b, acc):
    """acc + a @ b with fp32 accumulation (tl.dot)."""
    if INTERPRET and a.dtype == tl.bfloat16:
        # Triton's interpreter multiplies bf16 bit patterns as integers; bf16 -> fp32 is exact and
        # an fp32 product of two bf16 values is exact too, as on the tensor cores.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       BLOCK: tl.constexpr):
    # One program decodes BLOCK packed bytes = 2 * BLOCK values; 2 * BLOCK is a multiple of
    # BLOCKSIZE, so a program needs 2 * BLOCK / BLOCKSIZE absmax values and no per-value lookup.
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK)                                   # (BLOCK,)
    packed = tl.load(packed_ptr + byte, mask=byte < (n + 1) // 2, other=0)
    q = tl.interleave(packed >> 4, packed & 0xF).to(tl.int32)                 # (2 * BLOCK,) high nibble first
    values = tl.load(code_ptr + q)                                             # (2 * BLOCK,) fp32

    NB: tl.constexpr = 2 * BLOCK // BLOCKSIZE
    block = pid * NB + tl.arange(0, NB)                                        # (NB,)
    absmax = absmax_of_blocks(block, block < tl.cdiv(n, BLOCKSIZE), absmax_ptr, absmax2_ptr, code2_ptr,
                              offset_ptr, BLOCKSIZE2, DOUBLE_QUANT)            # (NB,) fp32
    values = tl.reshape(tl.reshape(values, (NB, BLOCKSIZE)) * absmax[:, None], (2 * BLOCK,))

    elem = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)                           # (2 * BLOCK,)
    tl.store(out_ptr + elem, round_to(values, out_ptr.dtype.element_ty), mask=elem < n)


def kernel_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """The pointer arguments every NF4 kernel takes, in order; unused double-quant slots get absmax."""
    if state.code.numel() != 16 or state.absmax.device != packed.device:
        raise ValueError("state must hold a 16-entry code book on the packed weight's device: use state.to(device)")
    if state.double_quant:
        return packed, state.absmax, state.code, state.absmax2, state.code2, state.offset
    return packed, state.absmax, state.code, state.absmax, state.absmax, state.absmax


def dequantize_nf4_triton(packed: torch.Tensor, state: QuantState, dtype: torch.dtype = torch.bfloat16,
                          block: int = 1024) -> torch.Tensor:
    """Packed NF4 [ceil(numel / 2)] uint8 + QuantState -> tensor of state.shape in fp16 or bf16."""
    n = math.prod(state.shape)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported by the kernel: use torch.float16 or torch.bfloat16")
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with {(n + 1) // 2} bytes for shape {tuple(state.shape)}, "
                         f"got {packed.dtype} with {packed.numel()}")
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    block = max(block, state.blocksize // 2)   # a program must cover whole absmax blocks
    grid = (triton.cdiv(n, 2 * block),)
    # enable_fp_fusion=False: the reference computes code2 * absmax2 + offset as a rounded multiply
    # then an add; a fused multiply-add would round once and could differ in the last bit.
    _dequantize_kernel[grid](*kernel_args(packed.reshape(-1), state), out, n, state.blocksize,
                             state.blocksize2, state.double_quant, block, num_warps=4, enable_fp_fusion=False)
    return out
