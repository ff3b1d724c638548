"""Dequant-matmul in Triton for the training path: y = x @ W^T and grad_x = grad_y @ W, W in NF4.

Reference: F.linear(x, dequantize_nf4(packed, state).to(x.dtype)) and grad_y @ that weight. Each
program dequantizes its W tiles in the inner loop (kernels/dequant.py: dequantize_tile), so the
bf16 weight never exists in memory: the backward pass reads the same 4-bit storage again, as QLoRA
does (paper eq. 5-6: the frozen weight is dequantized on the fly, only the input gets a gradient).
"""

import torch
import triton
import triton.language as tl

from kernels.dequant import INTERPRET, KERNEL_DTYPES, dequantize_tile, dot, kernel_args, round_to
from qlora.nf4 import QuantState

# A few configs only: compiling each one costs seconds on the GPU. BLOCK_K is 64 (= blocksize) so
# a row of a W tile has a single absmax; BLOCK_M is the large side because each W tile is
# dequantized once per BLOCK_M rows of x, so a larger BLOCK_M spends less time dequantizing.
CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=w, num_stages=s)
           for bm, bn, w, s in [(128, 128, 8, 4), (256, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4)]]
# M_BUCKET (the next power of two of M) is only an autotuning key: a new sequence length reuses the
# config of its bucket instead of tuning again.
INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2})]


def _configs():
    return INTERPRET_CONFIGS if INTERPRET else CONFIGS


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering (Triton tutorial 03): GROUP_M row-tiles walk the columns together, so the
    # W tiles they share stay in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * tiles_n)) % size_m, (pid % (GROUP_M * tiles_n)) // size_m


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT"])
@triton.jit
def _matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, y_ptr,
                   M, N, K, stride_xm, stride_ym, M_BUCKET,
                   BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y[M, N] = x[M, K] @ W[N, K]^T."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows_x = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                           # (BLOCK_M,)
    rows_w = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                           # (BLOCK_N,)
    cols = tl.arange(0, BLOCK_K)                                               # (BLOCK_K,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rows_x[:, None].to(tl.int64) * stride_xm + (k0 + cols)[None, :],
                    mask=(rows_x < M)[:, None] & (k0 + cols < K)[None, :], other=0.0)   # (BLOCK_M, BLOCK_K)
        w = dequantize_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            rows_w, k0, N, K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, BLOCK_N, BLOCK_K)
        w = round_to(w, x_ptr.dtype.element_ty)                                # (BLOCK_N, BLOCK_K)
        acc = dot(x, tl.trans(w), acc)                                         # (BLOCK_M, BLOCK_N)
    mask = (rows_x < M)[:, None] & (rows_w < N)[None, :]
    tl.store(y_ptr + rows_x[:, None].to(tl.int64) * stride_ym + rows_w[None, :],
             round_to(acc, y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT"])
@triton.jit
def _matmul_grad_kernel(gy_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, gx_ptr,
                        M, N, K, stride_gym, stride_gxm, M_BUCKET,
                        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """grad_x[M, K] = grad_y[M, N] @ W[N, K]; a program owns a (BLOCK_M, BLOCK_K) tile of grad_x."""
    pid_m, pid_k = _tile_ids(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                             # (BLOCK_M,)
    k0 = pid_k * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)                                          # (BLOCK_K,)
    inner = tl.arange(0, BLOCK_N)                                              # (BLOCK_N,)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        gy = tl.load(gy_ptr + rows[:, None].to(tl.int64) * stride_gym + (n0 + inner)[None, :],
                     mask=(rows < M)[:, None] & (n0 + inner < N)[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        w = dequantize_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            n0 + inner, k0, N, K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, BLOCK_N, BLOCK_K)
        acc = dot(gy, round_to(w, gy_ptr.dtype.element_ty), acc)                 # (BLOCK_M, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    tl.store(gx_ptr + rows[:, None].to(tl.int64) * stride_gxm + cols[None, :],
             round_to(acc, gx_ptr.dtype.element_ty), mask=mask)


def check_fused_shape(x: torch.Tensor, state: QuantState, inner: int) -> None:
    """Raise ValueError unless the fused kernels can take x [M, inner] and this NF4 weight."""
    if len(state.shape) != 2:
        raise ValueError(f"the NF4 weight must be 2-D [out, in], got shape {tuple(state.shape)}")
    if state.shape[1] % state.blocksize:
        raise ValueError(f"fused NF4 kernels need in_features ({state.shape[1]}) divisible by blocksize "
                         f"({state.blocksize}); use dequantize_nf4_triton + torch.matmul for this weight")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"input dtype {x.dtype} is not supported by the kernels: use float16 or bfloat16")
    if x.dim() != 2 or x.shape[1] != inner or x.stride(1) != 1:
        raise ValueError(f"input must be a 2-D row-major [rows, {inner}] tensor, got shape {tuple(x.shape)} "
                         f"with strides {x.stride()}")


def matmul_nf4(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x [M, in] (fp16 / bf16) @ W^T for the NF4 weight W [out, in] -> [M, out] in x's dtype."""
    N, K = state.shape[0], state.shape[-1]
    check_fused_shape(x, state, K)
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(x.shape[0], meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _matmul_kernel[grid](x, *kernel_args(packed, state), y, x.shape[0], N, K, x.stride(0), y.stride(0),
                         triton.next_power_of_2(x.shape[0]), state.blocksize, state.blocksize2, state.double_quant)
    return y


def matmul_nf4_grad(grad_y: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """grad_y [M, out] (fp16 / bf16) @ W for the NF4 weight W [out, in] -> grad_x [M, in]."""
    N, K = state.shape[0], state.shape[-1]
    check_fused_shape(grad_y, state, N)
    grad_x = torch.empty(grad_y.shape[0], K, dtype=grad_y.dtype, device=grad_y.device)
    grid = lambda meta: (triton.cdiv(grad_y.shape[0], meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _matmul_grad_kernel[grid](grad_y, *kernel_args(packed, state), grad_x, grad_y.shape[0], N, K,
                              grad_y.stride(0), grad_x.stride(0), triton.next_power_of_2(grad_y.shape[0]),
                              state.blocksize, state.blocksize2, state.double_quant)
    return grad_x
