"""Fused rotary embeddings in Triton for q and k together, forward and backward: one kernel instead of
a neg, a cat, two muls and an add per tensor (the H100 profile of issue #8: 50 ms of a 557 ms step).

Reference: llama.model.apply_rope, Hugging Face's rotate_half layout, where dim i pairs with dim
i + hd/2. With x = [x1, x2] (halves) and cos = [c1, c2], sin = [s1, s2]:

    forward   out = x * cos + [-x2, x1] * sin   = [x1 c1 - x2 s1,  x2 c2 + x1 s2]
    backward  dx  = g * cos + R^T (g * sin)     = [g1 c1 + g2 s2,  g2 c2 - g1 s1]

since rotate_half is the linear map R[x1, x2] = [-x2, x1], whose transpose is R^T[y1, y2] = [y2, -y1]
(the rotation by -theta). Each product and the sum round to the tensor's dtype exactly where the
reference's separate ops round, so both directions equal the reference (and its autograd) bit for bit.
"""

import torch
import triton
import triton.language as tl

from kernels.common import rounded

ROPE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, b, t, H, sx_b, sx_h, sx_t, so_b, so_h, so_t, c1, c2, s1, s2, HALF,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    """Rotate all H heads of x[b, :, t, :] into out[b, :, t, :] by the cos/sin halves of position t."""
    h = tl.arange(0, BLOCK_H)[:, None]                                          # (BLOCK_H, 1)
    d = tl.arange(0, BLOCK_D)[None, :]                                          # (1, BLOCK_D)
    mask = (h < H) & (d < HALF)                                                 # (BLOCK_H, BLOCK_D)
    x = x_ptr + b * sx_b + t * sx_t + h * sx_h + d                              # first halves
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)                        # (BLOCK_H, BLOCK_D)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)                 # (BLOCK_H, BLOCK_D)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    if BACKWARD:
        out1 = rounded(rounded(x1 * c1, dtype) + rounded(x2 * s2, dtype), dtype)
        out2 = rounded(rounded(x2 * c2, dtype) - rounded(x1 * s1, dtype), dtype)
    else:
        out1 = rounded(rounded(x1 * c1, dtype) - rounded(x2 * s1, dtype), dtype)
        out2 = rounded(rounded(x2 * c2, dtype) + rounded(x1 * s2, dtype), dtype)
    out = out_ptr + b * so_b + t * so_t + h * so_h + d
    tl.store(out, out1.to(dtype), mask=mask)                                    # already exact in dtype
    tl.store(out + HALF, out2.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, T, HQ, HK, HALF,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_K: tl.constexpr, BACKWARD: tl.constexpr):
    # One program per (batch, position): cos and sin of the position are read once for every q and k head.
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    d = tl.arange(0, BLOCK_D)                                                   # (BLOCK_D,)
    row = t * 2 * HALF + d                                                      # cos, sin are contiguous (T, hd)
    c1 = tl.load(cos_ptr + row, mask=d < HALF, other=0.0).to(tl.float32)[None, :]          # (1, BLOCK_D)
    c2 = tl.load(cos_ptr + row + HALF, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + row, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + row + HALF, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, q_out_ptr, b, t, HQ, sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t, c1, c2, s1, s2, HALF,
                  BLOCK_HQ, BLOCK_D, BACKWARD)
    if HAS_K:
        _rotate_heads(k_ptr, k_out_ptr, b, t, HK, sk_b, sk_h, sk_t, sko_b, sko_h, sko_t, c1, c2, s1, s2, HALF,
                      BLOCK_HK, BLOCK_D, BACKWARD)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t with stride 1 along head_dim; the (B, H, T, hd) view of a projection already has it."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, q_out, k_out, cos, sin, backward: bool) -> None:
    """Run the kernel over q (B, HQ, T, hd) and k (B, HK, T, hd) or None, any strides but the last."""
    B, HQ, T, hd = q.shape
    HK = 0 if k is None else k.shape[1]
    if B * T == 0:
        return
    k, k_out = (q, q_out) if k is None else (k, k_out)      # placeholders; HAS_K=False never reads them
    strides = [s for t in (q, k, q_out, k_out) for s in (t.stride(0), t.stride(1), t.stride(2))]
    block_d = triton.next_power_of_2(hd // 2)
    block_hq, block_hk = triton.next_power_of_2(HQ), triton.next_power_of_2(max(HK, 1))
    num_warps = 8 if (block_hq + block_hk) * block_d >= 8192 else 4
    # enable_fp_fusion=False: in fp32 a fused multiply-add would skip the rounding of x * cos that
    # the reference makes, and the result would differ from it in the last bit.
    _rope_kernel[(B * T,)](q, k, q_out, k_out, cos, sin, T, HQ, HK, hd // 2, *strides,
                           block_hq, block_hk, block_d, HK > 0, backward, num_warps=num_warps,
                           enable_fp_fusion=False)


class RoPEFunction(torch.autograd.Function):
    """(q, k) -> rotated (q, k); k may be None. cos, sin (T, hd) are constants (no gradient)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        q, k = _unit_last(q), None if k is None else _unit_last(k)
        # empty_like keeps a dense layout: the transposed view of a projection stays one, and its
        # gradient, allocated alike in backward, reshapes back to (B, T, H * hd) without a copy.
        q_out, k_out = torch.empty_like(q), None if k is None else torch.empty_like(k)
        _launch(q, k, q_out, k_out, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.layouts = [(t.shape, t.stride()) for t in (q_out, k_out) if t is not None]
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq, dk = [torch.empty_strided(shape, stride, dtype=cos.dtype, device=cos.device)
                  for shape, stride in ctx.layouts] + [None] * (2 - len(ctx.layouts))
        _launch(_unit_last(grad_q), None if dk is None else _unit_last(grad_k), dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, HQ, T, hd) and k (B, HK, T, hd) (or None) by cos, sin (T, hd) of one dtype -> (q, k)."""
    B, _, T, hd = q.shape
    if k is not None and (k.shape[0], k.shape[2], k.shape[3]) != (B, T, hd):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, positions and head_dim")
    if cos.shape != (T, hd) or sin.shape != (T, hd):
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be (T, head_dim) = {(T, hd)}")
    dtypes = {q.dtype, cos.dtype, sin.dtype} | ({k.dtype} if k is not None else set())
    if len(dtypes) != 1 or q.dtype not in ROPE_DTYPES:
        raise ValueError(f"q, k, cos, sin must share one dtype of {ROPE_DTYPES}, got {dtypes}: "
                         f"cast cos and sin to q's dtype, or use llama.model.apply_rope")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("cos and sin get no gradient from the kernel: detach them or use llama.model.apply_rope")
    if hd % 2:
        raise ValueError(f"head_dim {hd} must be even for rotary embeddings")
    return RoPEFunction.apply(q, k, cos.contiguous(), sin.contiguous())
