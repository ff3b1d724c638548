"""Decode-time GEMV in Triton: y = x @ W^T for 1-16 rows of x, W in NF4, reading W once.

Reference: F.linear(x, dequantize_nf4(packed, state).to(x.dtype)). With so few rows the product is
bound by reading W, so the kernel streams the 4-bit bytes (0.5 byte/weight plus absmax) and never
writes a bf16 copy of W. Each dequantized value stays in fp32 and meets every row of x before the
next tile is read; it is not rounded to bf16 first, so the result is at least as close to the exact
product as the reference's.
"""

import torch
import triton
import triton.language as tl

from kernels.dequant import INTERPRET, dequantize_tile, kernel_args, round_to
from kernels.matmul import check_fused_shape
from qlora.nf4 import QuantState

MAX_ROWS = 16

# Few rows of W per program (BLOCK_N) and long strips of K keep many programs and many bytes in
# flight, which is what a bandwidth-bound kernel needs.
CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
           for bn, bk, w, s in [(16, 256, 4, 3), (8, 512, 4, 3), (32, 256, 8, 3), (16, 512, 4, 4)]]
INTERPRET_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128})]


@triton.autotune(configs=INTERPRET_CONFIGS if INTERPRET else CONFIGS, key=["N", "K", "BLOCK_M", "DOUBLE_QUANT"])
@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, y_ptr,
                 M, N, K, stride_xm, stride_ym,
                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = x[M, K] @ W[N, K]^T; a program owns BLOCK_N rows of W and all M <= BLOCK_M rows of x."""
    rows_w = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                # (BLOCK_N,)
    rows_x = tl.arange(0, BLOCK_M)                                             # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_K)                                               # (BLOCK_K,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = dequantize_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            rows_w, k0, N, K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, BLOCK_N, BLOCK_K)
        for m in tl.static_range(BLOCK_M):                                     # (BLOCK_N, BLOCK_K) fp32 w
            # Rows m >= M (BLOCK_M is a power of two) re-read row M - 1; they are never stored.
            x_row = x_ptr + tl.minimum(m, M - 1) * stride_xm
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0)      # (BLOCK_K,)
            part = tl.sum(w * x.to(tl.float32)[None, :], axis=1)               # (BLOCK_N,)
            acc = tl.where(rows_x[:, None] == m, acc + part[None, :], acc)     # row m of (BLOCK_M, BLOCK_N)
    mask = (rows_x < M)[:, None] & (rows_w < N)[None, :]
    tl.store(y_ptr + rows_x[:, None] * stride_ym + rows_w[None, :], round_to(acc, y_ptr.dtype.element_ty),
             mask=mask)


def gemv_nf4(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x [M <= 16, in] (fp16 / bf16) @ W^T for the NF4 weight W [out, in] -> [M, out] in x's dtype."""
    N, K = state.shape[0], state.shape[-1]
    check_fused_shape(x, state, K)
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"gemv_nf4 takes 1 to {MAX_ROWS} rows, got {x.shape[0]}: use matmul_nf4 for more")
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _gemv_kernel[grid](x, *kernel_args(packed, state), y, x.shape[0], N, K, x.stride(0), y.stride(0),
                       state.blocksize, state.blocksize2, state.double_quant, triton.next_power_of_2(x.shape[0]))
    return y
