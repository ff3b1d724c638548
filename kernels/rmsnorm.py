"""Fused RMSNorm in Triton, forward and backward: one pass over each row instead of ~7 kernels forward
and ~10 backward (the H100 profile of issue #8 put the unfused norms at 71 ms of a 557 ms step).

Reference: llama.model.RMSNorm.forward (as Hugging Face's LlamaRMSNorm):

    y = weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)

so the normalised row is rounded to x's dtype and then multiplied by the weight in the promoted
dtype of (weight, x): a bf16 x with an fp32 weight gives an fp32 y, with or without autocast (mul is
on no autocast list). The kernel does the same roundings; the only difference from the reference is
the order of the fp32 sum of squares. Backward works in fp32 from the saved x and the per-row rstd
and rounds grad_x once; autograd on the reference also rounds grad_y * weight to x's dtype on the
way, so the two gradients agree within a few roundings (tests/test_kernels_fused.py derives the bound).
"""

import torch
import triton
import triton.language as tl

from kernels.common import round_to, rounded

NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HIDDEN = 65536          # one row lives in registers: BLOCK = next_power_of_2(hidden)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    # One program normalises one row of x.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)                                                  # (BLOCK,)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)   # (BLOCK,)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)                       # () fp32; padding adds 0
    tl.store(rstd_ptr + row, rstd)
    # .to(x.dtype) before the weight, as the reference; then the product rounds to y's dtype.
    normed = rounded(x * rstd, x_ptr.dtype.element_ty)                          # (BLOCK,)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)             # (BLOCK,)
    tl.store(y_ptr + row * stride_y + cols, round_to(w * normed, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, stride_dy, stride_x, stride_dx,
                         M, N, rows_per_program, BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr):
    # With n = x * rstd and g = dy * w (the gradient reaching n):
    #   dx = rstd * (g - n * mean(g * n))        (rstd depends on x through mean(x^2))
    #   dw = sum over rows of dy * n             (n as the forward used it: rounded to x's dtype)
    # A program takes rows_per_program consecutive rows and sums its part of dw in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)                                                  # (BLOCK,)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)         # (BLOCK,)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(rows_per_program):
        row = pid.to(tl.int64) * rows_per_program + i
        mask = cols < tl.where(row < M, N, 0)                                   # rows past M: nothing
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)   # (BLOCK,)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)      # (BLOCK,)
        rstd = tl.load(rstd_ptr + row, mask=row < M, other=0.0)                 # () fp32
        n = x * rstd
        g = dy * w
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / N))                       # (BLOCK,)
        tl.store(dx_ptr + row * stride_dx + cols, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += dy * rounded(n, x_ptr.dtype.element_ty)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=cols < N)


def _settings(n: int) -> tuple[int, int]:
    """BLOCK and num_warps for rows of n values: more warps for longer rows keeps registers per thread low."""
    if n > MAX_HIDDEN:
        raise ValueError(f"hidden size {n} is larger than the fused RMSNorm's {MAX_HIDDEN}: use the reference")
    block = triton.next_power_of_2(n)
    return block, 16 if block >= 16384 else 8 if block >= 4096 else 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, hidden) with unit stride along hidden; copies only when a view cannot do it."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, N) fp16 / bf16 / fp32, weight (N,) -> y (M, N) in the promoted dtype, rstd (M,) fp32."""
    M, N = x.shape
    block, num_warps = _settings(N)
    y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        _rms_norm_fwd_kernel[(M,)](x, weight, y, rstd, x.stride(0), y.stride(0), N, eps, block, num_warps=num_warps)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dy, x (M, N), rstd (M,) -> dx (M, N) in x's dtype, and dw (N,) in weight's dtype if compute_dw."""
    M, N = x.shape
    block, num_warps = _settings(N)
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if not compute_dw:
        programs, dw_parts = M, dx          # one row per program; dw_ptr is never touched
    else:
        # A few programs per SM, each summing dw over its rows; the (programs, N) fp32 parts add up after.
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
        programs = max(1, min(M, 4 * sms))
        dw_parts = torch.empty((programs, N), dtype=torch.float32, device=x.device)
    if M > 0:
        rows_per_program = triton.cdiv(M, programs)
        _rms_norm_bwd_kernel[(programs,)](dy, x, weight, rstd, dx, dw_parts, dy.stride(0), x.stride(0), dx.stride(0),
                                          M, N, rows_per_program, block, compute_dw, num_warps=num_warps)
    if not compute_dw:
        return dx, None
    dw = dw_parts.sum(0) if M > 0 else torch.zeros(N, dtype=torch.float32, device=x.device)
    return dx, dw.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x; weight, eps) over the last dim. Saves x and rstd (M,) fp32; weight's gradient
    is computed only when weight requires one (QLoRA freezes it)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rows(x)                                                           # (M, N)
        y, rstd = rms_norm_forward(x2, weight, eps)                             # (M, N), (M,)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(_rows(dy), x2, weight, rstd, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., N) (fp16 / bf16 / fp32, on CUDA or interpreted) with weight (N,)."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if x.dtype not in NORM_DTYPES or weight.dtype not in NORM_DTYPES:
        raise ValueError(f"dtypes x {x.dtype}, weight {weight.dtype} are not supported by the kernel: "
                         f"use fp16, bf16 or fp32, or the reference llama.model.RMSNorm")
    return RMSNormFunction.apply(x, weight, eps)
