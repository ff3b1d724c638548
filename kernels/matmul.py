"""The training path: y = x @ W^T and grad_x = grad_y @ W for an NF4 weight W, many rows of x.

Reference: F.linear(x, dequantize_nf4(packed, state).to(x.dtype)) and grad_y @ that weight. Both
products dequantize W with the Triton kernel and hand the bf16 / fp16 copy to cuBLAS: with thousands
of rows the product is bound by compute, where cuBLAS is hard to beat, and dequantizing costs one
pass over W (0.5 byte read, 2 bytes written per weight). bench/kernels.py times the ratio to a bf16
matmul. The dequantized copy of W lives only for the duration of one product.

NF4Matmul wraps them as an autograd.Function for Linear4bit: the weight is frozen (QLoRA eq. 5-6:
gradients flow through W to the input, W itself gets none), so backward saves no activation and no
dequantized weight; it dequantizes W again from its 4-bit storage.
"""

import torch
import torch.nn.functional as F

from kernels.common import NF4State
from kernels.dequant import dequantize_nf4_triton
from kernels.gemv import gemv_nf4, gemv_supported


def matmul_nf4(x: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """x [..., in] (fp16 / bf16) @ W^T for the NF4 weight W [out, in] -> [..., out] in x's dtype."""
    return F.linear(x, dequantize_nf4_triton(packed, state, x.dtype))


def matmul_nf4_grad(grad_y: torch.Tensor, packed: torch.Tensor, state: NF4State,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """grad_y [..., out] (fp16 / bf16) @ W for the NF4 weight W [out, in] -> grad_x [..., in]; with
    `out` (2-D [M, in], grad_y 2-D [M, out]) the product is added into it in cuBLAS' epilogue."""
    w = dequantize_nf4_triton(packed, state, grad_y.dtype)
    return grad_y @ w if out is None else out.addmm_(grad_y, w)


def linear_nf4(x: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """x [..., in] @ W^T (+ bias) -> [..., out], no autograd node: NF4Matmul's forward, and what
    callers with their own backward (qlora.lora.LoRAFunction) run without a nested node."""
    x2 = x.reshape(-1, x.shape[-1])                                       # (M, in)
    # Decoding (a few rows): the GEMV reads the 4-bit weight once; otherwise dequant + cuBLAS.
    y = gemv_nf4(x2, packed, state) if gemv_supported(x2, state) else matmul_nf4(x2, packed, state)
    if bias is not None:
        y += bias.to(y.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])                             # (..., out)


class NF4Matmul(torch.autograd.Function):
    """y = x @ W^T (+ bias) for a frozen NF4 weight; backward returns grad_x (and grad_bias) only."""

    @staticmethod
    def forward(ctx, x, bias, packed, state):
        ctx.save_for_backward(packed)                                     # the 4-bit storage, not a copy
        ctx.state = state
        ctx.bias_dtype = None if bias is None else bias.dtype
        return linear_nf4(x, bias, packed, state)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_nf4_grad(grad_y, packed, ctx.state)           # (..., in)
        if ctx.needs_input_grad[1]:
            # Summed over every row in fp32, rounded once to the bias dtype.
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).float().sum(0).to(ctx.bias_dtype)   # (out,)
        return grad_x, grad_bias, None, None
