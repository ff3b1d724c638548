"""NF4 dequantization in Triton: packed 4-bit codes + (double-quantized) absmax -> bf16 / fp16.

Reference: qlora.nf4.dequantize_nf4 (pure PyTorch). Both compute code[q] * absmax in fp32; the kernel
rounds that once to `dtype`, so it returns exactly dequantize_nf4(packed, state).to(dtype) whenever
the reference rounds once too: state.dtype is fp32 or `dtype`. (From an fp16 weight to bf16 the
reference rounds twice, through fp16.) The @triton.jit helper `decode_absmax` and `kernel_args` are
shared with the decode GEMV (gemv.py).
"""

import math

import torch
import triton
import triton.language as tl

from kernels.common import NF4State, round_to

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def decode_absmax(raw, block, mask, absmax2_ptr, code2_ptr, offset_ptr,
                  BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of `block` from raw = absmax[block]: the value itself, or with double quantization
    its 8-bit code, decoded as code2[raw] * absmax2[block // 256] + offset (paper section 3)."""
    if DOUBLE_QUANT:
        scale = tl.load(code2_ptr + raw.to(tl.int32)) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        return scale + tl.load(offset_ptr)      # a separate add, as in the reference (no fused multiply-add)
    else:
        return raw


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n, n_bytes,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       BLOCK: tl.constexpr):
    # One program decodes BLOCK packed bytes = 2 * BLOCK values; 2 * BLOCK is a multiple of
    # BLOCKSIZE, so a program needs 2 * BLOCK / BLOCKSIZE absmax values and no per-value lookup.
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK)                                   # (BLOCK,)
    packed = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
    q = tl.interleave(packed >> 4, packed & 0xF).to(tl.int32)                 # (2 * BLOCK,) high nibble first
    values = tl.load(code_ptr + q)                                             # (2 * BLOCK,) fp32

    NB: tl.constexpr = 2 * BLOCK // BLOCKSIZE
    block = pid * NB + tl.arange(0, NB)                                        # (NB,)
    ok = block < tl.cdiv(n, BLOCKSIZE)
    absmax = decode_absmax(tl.load(absmax_ptr + block, mask=ok, other=0), block, ok, absmax2_ptr, code2_ptr,
                           offset_ptr, BLOCKSIZE2, DOUBLE_QUANT)               # (NB,) fp32
    values = tl.reshape(tl.reshape(values, (NB, BLOCKSIZE)) * absmax[:, None], (2 * BLOCK,))

    elem = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)                           # (2 * BLOCK,)
    tl.store(out_ptr + elem, round_to(values, out_ptr.dtype.element_ty), mask=elem < n)


def kernel_args(packed: torch.Tensor, state: NF4State) -> tuple:
    """The pointer arguments every NF4 kernel takes, in order; unused double-quant slots get absmax."""
    n = math.prod(state.shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with {(n + 1) // 2} bytes for shape {tuple(state.shape)}, "
                         f"got {packed.dtype} with {packed.numel()}")
    if state.code.numel() != 16 or state.absmax.device != packed.device:
        raise ValueError("state must hold a 16-entry code book on the packed weight's device: use state.to(device)")
    if state.double_quant:
        return packed, state.absmax, state.code, state.absmax2, state.code2, state.offset
    return packed, state.absmax, state.code, state.absmax, state.absmax, state.absmax


def dequantize_nf4_triton(packed: torch.Tensor, state: NF4State, dtype: torch.dtype = torch.bfloat16,
                          block: int = 1024) -> torch.Tensor:
    """Packed NF4 [ceil(numel / 2)] uint8 + QuantState -> tensor of state.shape in fp16 or bf16."""
    n = math.prod(state.shape)
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported by the kernel: use torch.float16 or torch.bfloat16")
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    block = max(block, state.blocksize // 2)   # a program must cover whole absmax blocks
    grid = (triton.cdiv(n, 2 * block),)
    # enable_fp_fusion=False: the reference computes code2 * absmax2 + offset as a rounded multiply
    # then an add; a fused multiply-add would round once and could differ in the last bit.
    _dequantize_kernel[grid](*kernel_args(packed.reshape(-1), state), out, n, (n + 1) // 2, state.blocksize,
                             state.blocksize2, state.double_quant, block, num_warps=4, enable_fp_fusion=False)
    return out
