"""Fused SwiGLU in Triton, forward and backward: silu(gate) * up in one pass instead of two kernels
forward and three backward (the H100 profile of issue #8: 18 ms of a 0.43 s step).

Reference: llama.model.MLP, F.silu(g) * u. Torch computes silu in fp32 and rounds it to g's dtype,
then rounds the product; its autograd saves silu(g), u and g and runs

    grad_u = dy * silu(g)                       (rounded)
    grad_s = dy * u                             (rounded: the gradient reaching silu's output)
    grad_g = grad_s * sig * (1 + g * (1 - sig)),  sig = sigmoid(g)   (fp32, rounded once)

The kernels make the same roundings from the saved g and u alone (silu is recomputed, which is cheaper
than storing it), so they differ from the reference only by how exp is evaluated in fp32.
"""

import torch
import triton
import triton.language as tl

from kernels.common import round_to, rounded

SWIGLU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)        # (BLOCK,)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    s = rounded(g / (1.0 + tl.exp(-g)), dtype)                                     # silu(g), as F.silu rounds it
    tl.store(y_ptr + offs, round_to(s * u, dtype), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)        # (BLOCK,)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dtype: tl.constexpr = dg_ptr.dtype.element_ty
    sig = 1.0 / (1.0 + tl.exp(-g))
    s = rounded(g * sig, dtype)                                                    # silu(g) as the forward rounded it
    grad_s = rounded(dy * u, dtype)
    tl.store(du_ptr + offs, round_to(dy * s, dtype), mask=mask)
    tl.store(dg_ptr + offs, round_to(grad_s * sig * (1.0 + g * (1.0 - sig)), dtype), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(g) * u elementwise; saves g and u only."""

    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        y = torch.empty_like(g)
        n = g.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](g, u, y, n, BLOCK, num_warps=4)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, g, u, dg, du, n, BLOCK, num_warps=4)
        return dg, du


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for g, u of one shape and dtype (fp16 / bf16 / fp32, on CUDA or interpreted)."""
    if g.shape != u.shape or g.dtype != u.dtype or g.dtype not in SWIGLU_DTYPES:
        raise ValueError(f"swiglu needs gate and up of one shape and dtype (fp16, bf16 or fp32), got "
                         f"{tuple(g.shape)} {g.dtype} and {tuple(u.shape)} {u.dtype}: use F.silu(g) * u")
    return SwiGLUFunction.apply(g, u)
