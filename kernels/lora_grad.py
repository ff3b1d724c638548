"""The LoRA adapter's input gradient through dropout, added into the base's, in one Triton kernel.

With h = dropout(x) A^T (qlora.lora.LoRAFunction), the adapter's part of grad_x is

    grad_x += mask / (1 - p) * (grad_h @ A)        grad_h (M, r), A (r, in), mask (M, in) bool

Reference: grad_x.addcmul_(grad_h @ A, mask, value=1 / (1 - p)): a cuBLAS product that writes an
(M, in) tensor, then an elementwise kernel that reads it back with the mask and grad_x (slow in
PyTorch, which does not vectorize bool with bf16; 21 ms of the H100 step profile). Here the rank-r
product is computed per tile in registers (r is small) and never stored. It is rounded to grad_x's
dtype before the add, as the reference's product is, so the two differ only by the order of the
r-term sums.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET, round_to, rounded

LORA_GRAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _lora_dropout_grad_kernel(gx_ptr, gh_ptr, a_ptr, mask_ptr, M, N, R, stride_gx, stride_gh, stride_a,
                              stride_mask, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    # One program updates a (BLOCK_M, BLOCK_N) tile of grad_x.
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)        # (BLOCK_M,)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)                       # (BLOCK_N,)
    rk = tl.arange(0, BLOCK_R)                                                    # (BLOCK_R,)
    t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, R, BLOCK_R):                                                # r <= BLOCK_R: one step
        gh = tl.load(gh_ptr + rm[:, None] * stride_gh + (k + rk)[None, :],
                     mask=(rm[:, None] < M) & ((k + rk)[None, :] < R), other=0.0)        # (BLOCK_M, BLOCK_R)
        a = tl.load(a_ptr + (k + rk)[:, None] * stride_a + rn[None, :],
                    mask=((k + rk)[:, None] < R) & (rn[None, :] < N), other=0.0)         # (BLOCK_R, BLOCK_N)
        if INTERPRET and gh.dtype == tl.bfloat16:      # the interpreter's bf16 dot is wrong; the
            gh, a = gh.to(tl.float32), a.to(tl.float32)  # bf16 products are exact in fp32 anyway
        if IEEE or INTERPRET:                           # fp32: no TF32 rounding of the operands
            t += tl.dot(gh, a, input_precision="ieee")
        else:
            t += tl.dot(gh, a)                                                    # (BLOCK_M, BLOCK_N) fp32
    dtype: tl.constexpr = gx_ptr.dtype.element_ty
    t = rounded(t, dtype)                                # the reference's product is a tensor of dtype
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    keep = tl.load(mask_ptr + rm[:, None] * stride_mask + rn[None, :], mask=inside, other=0).to(tl.float32)
    gx_ptrs = gx_ptr + rm[:, None] * stride_gx + rn[None, :]
    gx = tl.load(gx_ptrs, mask=inside, other=0.0).to(tl.float32)
    tl.store(gx_ptrs, round_to(gx + scale * (t * keep), dtype), mask=inside)


def lora_dropout_grad_(grad_x: torch.Tensor, grad_h: torch.Tensor, a: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """grad_x (M, in) += scale * mask * (grad_h (M, r) @ a (r, in)), in place; one dtype for all three."""
    M, N = grad_x.shape
    R = a.shape[0]
    if grad_h.shape != (M, R) or a.shape != (R, N) or mask.shape != (M, N) or mask.dtype != torch.bool:
        raise ValueError(f"lora_dropout_grad_ needs grad_x (M, in), grad_h (M, r), a (r, in), bool mask (M, in); "
                         f"got {tuple(grad_x.shape)}, {tuple(grad_h.shape)}, {tuple(a.shape)}, "
                         f"{tuple(mask.shape)} {mask.dtype}")
    if not grad_x.dtype == grad_h.dtype == a.dtype or grad_x.dtype not in LORA_GRAD_DTYPES:
        raise ValueError(f"lora_dropout_grad_ needs one dtype (fp16, bf16 or fp32), got {grad_x.dtype}, "
                         f"{grad_h.dtype}, {a.dtype}: cast first")
    if any(t.stride(-1) != 1 for t in (grad_x, grad_h, a, mask)):
        raise ValueError("lora_dropout_grad_ needs unit stride along the last dim: pass contiguous tensors")
    if M and N:
        block_r = max(16, min(64, triton.next_power_of_2(R)))   # tl.dot needs K >= 16
        grid = (triton.cdiv(M, 64), triton.cdiv(N, 128))
        _lora_dropout_grad_kernel[grid](grad_x, grad_h, a, mask, M, N, R, grad_x.stride(0), grad_h.stride(0),
                                        a.stride(0), mask.stride(0), scale, 64, 128, block_r,
                                        grad_x.dtype == torch.float32, num_warps=4)
    return grad_x
