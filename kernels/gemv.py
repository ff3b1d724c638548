"""Decode-time GEMV in Triton: y = x @ W^T for 1-16 rows of x, W in NF4, reading W once.

Reference: F.linear(x, dequantize_nf4(packed, state).to(x.dtype)). With so few rows the product is
bound by reading W, so the kernel streams the 4-bit bytes (0.5 byte/weight plus 1/64 byte of absmax
code) and never writes a bf16 copy of W. A dequantized weight stays in fp32 and meets every row of
x before the next tile is read; it is not rounded to bf16 first, so the result is at least as close
to the exact product as the reference's.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET, NF4State, round_to
from kernels.dequant import KERNEL_DTYPES, decode_absmax, kernel_args

MAX_ROWS = 16

# A program owns BLOCK_N rows of W and walks along K, BLOCK_K values (BLOCK_K / 2 bytes) per row at
# a time. Few rows per program and long strips keep many programs, and many bytes, in flight.
CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
           for bn, bk, w in [(8, 1024, 4), (4, 1024, 4), (16, 512, 4), (8, 512, 2), (4, 2048, 8)]]
# The interpreter's cost grows with programs x tiles x rows of x, so it gets wider programs; the tile
# is still smaller than the test shapes, which leaves partial tiles in both N and K.
INTERPRET_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 128})]


@triton.jit
def _load_tile(packed_ptr, absmax_ptr, rows, k0, N, K,
               BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed bytes (BLOCK_N, BLOCK_K / 2) and raw absmax (BLOCK_N, groups) of W[rows, k0:k0 + BLOCK_K]."""
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCKSIZE < BLOCK_K else 1
    cols = k0 // 2 + tl.arange(0, HALF)                                        # (HALF,) byte columns
    mask = (rows < N)[:, None] & (cols < K // 2)[None, :]
    packed = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (K // 2) + cols[None, :], mask=mask, other=0)
    # K % BLOCKSIZE == 0, so absmax blocks never cross a row: block = (row * K + k) / BLOCKSIZE.
    group_k = k0 + tl.arange(0, GROUPS) * BLOCKSIZE                           # (GROUPS,)
    block = (rows[:, None].to(tl.int64) * K + group_k[None, :]) // BLOCKSIZE   # (BLOCK_N, GROUPS)
    ok = (rows < N)[:, None] & (group_k < K)[None, :]
    return packed, tl.load(absmax_ptr + block, mask=ok, other=0), block, ok


@triton.autotune(configs=INTERPRET_CONFIGS if INTERPRET else CONFIGS, key=["N", "K", "BLOCK_M", "DOUBLE_QUANT"])
@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, y_ptr,
                 M, N, K, stride_xm, stride_ym,
                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = x[M, K] @ W[N, K]^T for M <= BLOCK_M <= 16."""
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCKSIZE < BLOCK_K else 1
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                  # (BLOCK_N,) rows of W
    pairs = tl.arange(0, HALF)                                                 # (HALF,) byte columns
    x_rows = tl.arange(0, BLOCK_M)                                             # (BLOCK_M,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # The next tile's loads are issued before the current tile is used: a program keeps two tiles
    # in flight instead of waiting out the memory latency at every step.
    nxt = _load_tile(packed_ptr, absmax_ptr, rows, 0, N, K, BLOCKSIZE, BLOCK_N, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        packed, raw, block, ok = nxt
        nxt = _load_tile(packed_ptr, absmax_ptr, rows, k0 + BLOCK_K, N, K, BLOCKSIZE, BLOCK_N, BLOCK_K)
        absmax = decode_absmax(raw, block, ok, absmax2_ptr, code2_ptr, offset_ptr,
                               BLOCKSIZE2, DOUBLE_QUANT)                       # (BLOCK_N, GROUPS)
        # Value 2i is the high nibble of byte i, value 2i + 1 the low one (bitsandbytes' order).
        w_even = tl.load(code_ptr + (packed >> 4).to(tl.int32))                # (BLOCK_N, HALF) fp32
        w_odd = tl.load(code_ptr + (packed & 0xF).to(tl.int32))                # (BLOCK_N, HALF) fp32
        w_even = tl.reshape(tl.reshape(w_even, (BLOCK_N, GROUPS, HALF // GROUPS)) * absmax[:, :, None],
                            (BLOCK_N, HALF))
        w_odd = tl.reshape(tl.reshape(w_odd, (BLOCK_N, GROUPS, HALF // GROUPS)) * absmax[:, :, None],
                           (BLOCK_N, HALF))
        for m in tl.static_range(BLOCK_M):
            # Rows m >= M (BLOCK_M is a power of two) re-read row M - 1; they are never stored.
            x_row = x_ptr + tl.minimum(m, M - 1) * stride_xm + k0
            x_even = tl.load(x_row + 2 * pairs, mask=k0 + 2 * pairs < K, other=0.0).to(tl.float32)      # (HALF,)
            x_odd = tl.load(x_row + 2 * pairs + 1, mask=k0 + 2 * pairs < K, other=0.0).to(tl.float32)   # (HALF,)
            part = tl.sum(w_even * x_even[None, :] + w_odd * x_odd[None, :], axis=1)                   # (BLOCK_N,)
            acc = tl.where(x_rows[:, None] == m, acc + part[None, :], acc)     # row m of (BLOCK_M, BLOCK_N)
    mask = (x_rows < M)[:, None] & (rows < N)[None, :]
    tl.store(y_ptr + x_rows[:, None] * stride_ym + rows[None, :], round_to(acc, y_ptr.dtype.element_ty), mask=mask)


def _unsupported(x: torch.Tensor, state: NF4State) -> str | None:
    """Why gemv_nf4 cannot take x and this weight, or None if it can."""
    if len(state.shape) != 2 or x.dim() != 2 or x.shape[1] != state.shape[1]:
        return f"x must be [rows, in_features] for the weight {tuple(state.shape)}, got x {tuple(x.shape)}"
    if not 1 <= x.shape[0] <= MAX_ROWS:
        return f"gemv_nf4 takes 1 to {MAX_ROWS} rows of x, got {x.shape[0]}: use matmul_nf4 for more"
    if x.dtype not in KERNEL_DTYPES:
        return f"x has dtype {x.dtype}: gemv_nf4 takes torch.float16 or torch.bfloat16"
    if state.shape[1] % state.blocksize:
        return (f"in_features ({state.shape[1]}) must be a multiple of blocksize ({state.blocksize}) so that no "
                f"absmax block crosses a row of W: use matmul_nf4 for this weight")
    return None


def gemv_supported(x: torch.Tensor, state: NF4State) -> bool:
    """Whether gemv_nf4 takes x: 1-16 fp16 / bf16 rows [M, in], in_features a multiple of blocksize."""
    return _unsupported(x, state) is None


def gemv_nf4(x: torch.Tensor, packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """x [M <= 16, in] (fp16 / bf16) @ W^T for the NF4 weight W [out, in] -> [M, out] in x's dtype."""
    problem = _unsupported(x, state)
    if problem:
        raise ValueError(problem)
    if x.stride(1) != 1:
        x = x.contiguous()
    N, K = state.shape
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _gemv_kernel[grid](x, *kernel_args(packed, state), y, x.shape[0], N, K, x.stride(0), y.stride(0),
                       state.blocksize, state.blocksize2, state.double_quant, triton.next_power_of_2(x.shape[0]))
    return y
