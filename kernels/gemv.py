"""Decode-time GEMV in Triton: y = x @ W^T for 1-16 rows of x, W in NF4, reading W once.

Reference: F.linear(x, dequantize_nf4(packed, state).to(x.dtype)). With so few rows the product is
bound by reading W: 0.5 byte per weight plus 1/64 byte of absmax code. Each program owns BLOCK_N rows
of W and walks along K, BLOCK_K weights per row at a time; every packed byte is loaded once, in
16-byte vectors, decoded in registers and used for all rows of x before the next tile.

Two inner products, picked by the number of rows of x (FMA_ROWS):
* few rows (the FMA kernel): W is read as int32 words of 8 codes, the codes become their fp32 NF4
  levels (a 16-entry table read through tl.gather, no global-memory gather) and meet 8 consecutive
  values of x in fp32 multiply-adds; the absmax of each 16-byte vector (inside one block of
  `blocksize` weights) multiplies the vector's partial sum once (sum_k code[q_k] x_k absmax =
  absmax sum_k code[q_k] x_k). W is never rounded, so the result is at least as close to the exact
  product as the reference's.
* more rows (the dot kernel): fp32 FMAs would cost 16 per weight at 16 rows, past what the chip's
  fp32 units deliver at full bandwidth, so W is decoded to x's dtype (code[q] * absmax in fp32,
  rounded once: the reference's weight, bit for bit) and multiplied on the tensor cores (tl.dot,
  fp32 accumulation) with x padded to 16 rows. Byte i of a row holds weights 2i (high nibble) and
  2i + 1 (low nibble); the kernel keeps the two halves apart (even weights meet x[2i], odd ones
  x[2i + 1], read together as one int32 of x viewed in pairs), so no interleave is needed.

Speed (docs/benchmarks.md, H200): 0.9-1.2 TB/s effective at batch 1, bound by instruction issue
(~9 SASS instructions per weight), not by bytes in flight.
"""

import torch
import triton
import triton.language as tl

from kernels.common import INTERPRET, NF4State, round_to
from kernels.dequant import KERNEL_DTYPES, decode_absmax, kernel_args

MAX_ROWS = 16
FMA_ROWS = 4            # rows of x up to which the fp32 FMA kernel runs; more take the tensor cores

# BLOCK_K weights of BLOCK_N rows per tile: each of the 32 * num_warps threads loads 16-64 bytes.
# The candidates that ranked best on the H200 (bench/gemv_sweep.py, 2026-12-01); the autotuner picks
# per shape, timing each config with L2 flushed.
FMA_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bn, bk, w, s in [(2, 2048, 4, 1), (4, 2048, 4, 1), (4, 1024, 2, 1), (4, 1024, 4, 2),
                                    (2, 2048, 4, 2), (8, 1024, 4, 1)]]
DOT_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bn, bk, w, s in [(32, 256, 4, 3), (64, 128, 4, 3), (32, 256, 4, 2), (16, 512, 4, 3)]]
# The interpreter's cost grows with programs x tiles x rows of x, so it gets wide tiles that are
# still smaller than the test shapes: partial tiles in both N and K.
INTERPRET_FMA_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 256})]
INTERPRET_DOT_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 256})]


@triton.jit
def _levels(q, table):
    """The fp32 NF4 levels of the int32 codes q (any shape) from the 16-entry table."""
    return tl.reshape(tl.gather(table, tl.reshape(q, (q.numel,)), 0), q.shape)


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, kb0, N, K, stride_w,
              BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Bytes kb0 .. kb0 + BLOCK_K / 2 of `rows` (weights 2 kb0 ..) as (even, odd, absmax): the fp32
    NF4 levels of the even and odd weights (BLOCK_N, V, 16) and the fp32 absmax of each 16-byte
    vector (BLOCK_N, V).

    A vector is 16 packed bytes (32 weights), the width of one load; blocksize >= 32, so a vector
    lies inside one absmax block, and K % blocksize == 0, so no block crosses a row. stride_w = K / 2
    is its own argument so that Triton sees it divisible by 16 and issues 16-byte loads."""
    V: tl.constexpr = BLOCK_K // 32
    vec = kb0 + tl.arange(0, V) * 16                                     # (V,) first byte of each vector
    cols = vec[:, None] + tl.arange(0, 16)[None, :]                      # (V, 16) byte columns
    row_ok = rows < N
    ok = row_ok[:, None, None] & (cols < stride_w)[None, :, :]
    row_start = rows.to(tl.int64) * stride_w                             # (BLOCK_N,)
    packed = tl.load(packed_ptr + row_start[:, None, None] + cols[None, :, :], mask=ok, other=0)  # (BLOCK_N, V, 16) u8

    block = (row_start[:, None] + vec[None, :]) // (BLOCKSIZE // 2)     # (BLOCK_N, V) absmax block of each vector
    block_ok = row_ok[:, None] & (vec < stride_w)[None, :]
    raw = tl.load(absmax_ptr + block, mask=block_ok, other=0)
    absmax = decode_absmax(raw, block, block_ok, absmax2_ptr, code2_ptr, offset_ptr, BLOCKSIZE2, DOUBLE_QUANT)

    # The 16 levels are read from a register copy of the table through tl.gather on a flat view,
    # which keeps it in shared memory: one 32-bit read per code, no global-memory gather.
    table = tl.load(code_ptr + tl.arange(0, 16))
    even = _levels((packed >> 4).to(tl.int32), table)
    odd = _levels((packed & 0xF).to(tl.int32), table)
    return even, odd, absmax


@triton.jit
def _x_pairs(xp_ptr, row, cols, mask, DTYPE: tl.constexpr):
    """x[row, 2c] and x[row, 2c + 1] in DTYPE from the int32 pairs view of x (little-endian: the
    even element is the low half)."""
    pair = tl.load(xp_ptr + row + cols, mask=mask, other=0)
    even = pair.to(tl.int16).to(DTYPE, bitcast=True)
    odd = (pair >> 16).to(tl.int16).to(DTYPE, bitcast=True)
    return even, odd


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b with fp32 accumulation. Triton's interpreter misreads bf16 operands of tl.dot, so
    it gets them in fp32 (the same values; their products are exact in fp32 either way)."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _word_levels(words, table):
    """int32 words (...) of 8 codes each -> their fp32 NF4 levels (..., 8) in weight order.

    Byte b of a word (bits 8b .. 8b + 7) holds weights 2b (high nibble) and 2b + 1 (low nibble), so
    weight j sits at bit 4 * (j ^ 1). The 8 codes of every word are gathered from the 16-entry table
    at once."""
    # Code of weight 2b: bits 8b + 4 ..; of weight 2b + 1: bits 8b .. . tl.join appends the new axis
    # last, so the outermost join is the lowest bit of the weight index: q[..., i, j, k] is weight 4i + 2j + k.
    q = tl.join(tl.join(tl.join((words >> 4) & 0xF, (words >> 20) & 0xF),
                        tl.join((words >> 12) & 0xF, (words >> 28) & 0xF)),
                tl.join(tl.join(words & 0xF, (words >> 16) & 0xF),
                        tl.join((words >> 8) & 0xF, (words >> 24) & 0xF)))   # (..., 2, 2, 2)
    return tl.reshape(_levels(q, table), words.shape + [8])


@triton.autotune(configs=INTERPRET_FMA_CONFIGS if INTERPRET else FMA_CONFIGS,
                 key=["N", "K", "BLOCK_M", "DOUBLE_QUANT"])
@triton.jit
def _gemv_fma_kernel(x_ptr, words_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, y_ptr,
                     M, N, K, stride_w, stride_xm, stride_ym,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = x[M, K] @ W[N, K]^T for M <= BLOCK_M, fp32 levels and fp32 FMAs.

    W is read as int32 words of 8 codes (stride_w = K / 8 words per row), 4 words = one 16-byte
    vector per thread; the 8 weights of a word meet 8 consecutive values of x (one 16-byte load)."""
    V: tl.constexpr = BLOCK_K // 32
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                  # (BLOCK_N,) rows of W
    row_ok = rows < N
    row_start = rows.to(tl.int64) * stride_w                                   # (BLOCK_N,) in words
    x_rows = tl.arange(0, BLOCK_M)                                             # (BLOCK_M,)
    table = tl.load(code_ptr + tl.arange(0, 16))                               # (16,) fp32 levels
    acc = tl.zeros((BLOCK_M, BLOCK_N, V), dtype=tl.float32)
    for kw0 in range(0, stride_w, BLOCK_K // 8):                               # words of a row of W
        vec = kw0 + tl.arange(0, V) * 4                                        # (V,) first word of each vector
        cols = vec[:, None] + tl.arange(0, 4)[None, :]                         # (V, 4) word columns
        ok = row_ok[:, None, None] & (cols < stride_w)[None, :, :]
        words = tl.load(words_ptr + row_start[:, None, None] + cols[None, :, :], mask=ok, other=0)  # (BLOCK_N, V, 4)
        block = (row_start[:, None] + vec[None, :]) * 8 // BLOCKSIZE           # (BLOCK_N, V) absmax block
        block_ok = row_ok[:, None] & (vec < stride_w)[None, :]
        raw = tl.load(absmax_ptr + block, mask=block_ok, other=0)
        absmax = decode_absmax(raw, block, block_ok, absmax2_ptr, code2_ptr, offset_ptr, BLOCKSIZE2, DOUBLE_QUANT)
        w = _word_levels(words, table)                                         # (BLOCK_N, V, 4, 8) fp32
        k = 8 * cols[:, :, None] + tl.arange(0, 8)[None, None, :]              # (V, 4, 8) columns of x
        for m in tl.static_range(BLOCK_M):
            # Rows m >= M (BLOCK_M is a power of two) re-read row M - 1; they are never stored.
            x = tl.load(x_ptr + tl.minimum(m, M - 1) * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            s = tl.sum(tl.sum(w * x[None], axis=3), axis=2)                    # (BLOCK_N, V): in-thread sums
            acc = tl.where(x_rows[:, None, None] == m, acc + (s * absmax)[None], acc)
    y = tl.sum(acc, axis=2)                                                    # (BLOCK_M, BLOCK_N)
    mask = (x_rows < M)[:, None] & (rows < N)[None, :]
    tl.store(y_ptr + x_rows[:, None] * stride_ym + rows[None, :], round_to(y, DTYPE), mask=mask)


@triton.autotune(configs=INTERPRET_DOT_CONFIGS if INTERPRET else DOT_CONFIGS,
                 key=["N", "K", "DOUBLE_QUANT"])
@triton.jit
def _gemv_dot_kernel(xp_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, y_ptr,
                     M, N, K, stride_w, stride_xm, stride_ym,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = x[M, K] @ W[N, K]^T for M <= BLOCK_M = 16, W rounded to x's dtype, tensor cores."""
    HALF: tl.constexpr = BLOCK_K // 2
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                  # (BLOCK_N,) rows of W
    x_rows = tl.arange(0, BLOCK_M)                                             # (BLOCK_M,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, stride_w, BLOCK_K // 2):                               # bytes of a row of W
        even, odd, absmax = _nf4_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                      rows, kb0, N, K, stride_w, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, BLOCK_K)
        # code[q] * absmax in fp32, rounded once to x's dtype: dequantize_nf4(...).to(dtype).
        w_even = tl.reshape(round_to(even * absmax[:, :, None], DTYPE), (BLOCK_N, HALF))  # (BLOCK_N, HALF)
        w_odd = tl.reshape(round_to(odd * absmax[:, :, None], DTYPE), (BLOCK_N, HALF))
        cols = kb0 + tl.arange(0, HALF)                                        # (HALF,) pairs of x
        ok = (x_rows < M)[:, None] & (cols < stride_w)[None, :]
        x_even, x_odd = _x_pairs(xp_ptr, x_rows[:, None] * stride_xm, cols[None, :], ok, DTYPE)  # (BLOCK_M, HALF)
        acc = _dot(x_even, tl.trans(w_even), acc)
        acc = _dot(x_odd, tl.trans(w_odd), acc)                                # (BLOCK_M, BLOCK_N)
    mask = (x_rows < M)[:, None] & (rows < N)[None, :]
    tl.store(y_ptr + x_rows[:, None] * stride_ym + rows[None, :], round_to(acc, DTYPE), mask=mask)


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
    N, K = state.shape
    M = x.shape[0]
    # x as int32 pairs (x[2c], x[2c + 1]): one 4-byte load feeds an even and an odd weight.
    x = x.contiguous()
    xp = x.view(torch.int32)                                               # (M, K / 2)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    args = kernel_args(packed, state)
    if M <= FMA_ROWS:     # the FMA kernel reads W as int32 words (K % 8 == 0 as K % blocksize == 0)
        _gemv_fma_kernel[grid](x, args[0].view(torch.int32), *args[1:], y, M, N, K, K // 8, x.stride(0),
                               y.stride(0), state.blocksize, state.blocksize2, state.double_quant,
                               triton.next_power_of_2(M))
    else:
        _gemv_dot_kernel[grid](xp, *args, y, M, N, K, K // 2, xp.stride(0), y.stride(0), state.blocksize,
                               state.blocksize2, state.double_quant, 16)
    return y
