"""NF4 quantization in Triton: a float weight -> packed 4-bit codes + fp32 absmax, in one pass.

Reference: qlora.nf4.quantize_nf4 (pure PyTorch, bit for bit equal to bitsandbytes), which makes a
dozen full-size temporaries (fp32 copy, scaled values, indices); the kernel reads each value once and
writes half a byte, so the loader can quantize a whole weight on the GPU without chunking for memory.
The arithmetic is the reference's, step by step (QLoRA paper section 3, eq. 1-2):
    absmax_b = max |w| over block b                    (blocks of BLOCKSIZE consecutive values)
    s        = w * (1 / absmax_b), or w / absmax_b in the last, partial block; clamped to [-1, 1]
    q        = number of midpoints between neighbouring NF4 levels that are < s   (nearest level,
               ties to the lower one: torch.bucketize)
    byte     = q[2i] << 4 | q[2i + 1]                  (first value in the high nibble)
so the bytes equal the reference's; the tests check that under TRITON_INTERPRET=1 at odd sizes.
Non-finite values are counted into `bad` (the reference refuses them; so does the caller).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_kernel(w_ptr, mid_ptr, packed_ptr, absmax_ptr, bad_ptr, n,
                     BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr):
    # One program quantizes BLOCKS absmax blocks, read as even and odd values: (BLOCKS, BLOCKSIZE / 2) each.
    pid = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = BLOCKSIZE // 2
    block = pid * BLOCKS + tl.arange(0, BLOCKS)                                    # (BLOCKS,)
    even = block[:, None] * BLOCKSIZE + 2 * tl.arange(0, HALF)[None, :]            # (BLOCKS, HALF)
    w0 = tl.load(w_ptr + even, mask=even < n, other=0.0).to(tl.float32)            # values 2i
    w1 = tl.load(w_ptr + even + 1, mask=even + 1 < n, other=0.0).to(tl.float32)    # values 2i + 1

    # fp32 constants by their bits: Triton types a Python float it cannot hold as a normal fp32 as fp64.
    FLT_MAX = tl.full((BLOCKS, HALF), 0x7F7FFFFF, tl.int32).to(tl.float32, bitcast=True)
    finite = (tl.abs(w0) <= FLT_MAX) & (tl.abs(w1) <= FLT_MAX)                     # False for NaN too
    tl.atomic_add(bad_ptr, tl.sum(tl.sum((~finite).to(tl.int32), axis=1), axis=0))

    absmax = tl.maximum(tl.max(tl.abs(w0), axis=1), tl.max(tl.abs(w1), axis=1))   # (BLOCKS,)
    n_blocks = tl.cdiv(n, BLOCKSIZE)
    tl.store(absmax_ptr + block, absmax, mask=block < n_blocks)
    TINY = tl.full((BLOCKS,), 0x006CE3EE, tl.int32).to(tl.float32, bitcast=True)   # fp32(1e-38), the clamp
    safe = tl.maximum(absmax, TINY)[:, None]                                       # an all-zero block stays 0
    partial = (block == n_blocks - 1)[:, None] & (n % BLOCKSIZE != 0)
    recip = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)             # IEEE 1 / absmax
    s0 = tl.where(partial, tl.math.div_rn(w0, safe), w0 * recip)
    s1 = tl.where(partial, tl.math.div_rn(w1, safe), w1 * recip)
    s0 = tl.minimum(tl.maximum(s0, -1.0), 1.0)
    s1 = tl.minimum(tl.maximum(s1, -1.0), 1.0)

    q0 = tl.zeros(s0.shape, tl.int32)
    q1 = tl.zeros(s1.shape, tl.int32)
    for i in tl.static_range(15):                                                  # the 15 midpoints
        mid = tl.load(mid_ptr + i)
        q0 += (s0 > mid).to(tl.int32)
        q1 += (s1 > mid).to(tl.int32)
    byte = (q0 << 4) | q1                                                          # (BLOCKS, HALF)
    n_bytes = (n + 1) // 2
    tl.store(packed_ptr + even // 2, byte.to(tl.uint8), mask=even // 2 < n_bytes)


def quantize_nf4_triton(w: torch.Tensor, midpoints: torch.Tensor, blocksize: int = 64,
                        packed: torch.Tensor | None = None, absmax: torch.Tensor | None = None,
                        bad: torch.Tensor | None = None, blocks_per_program: int = 16):
    """w (any shape, fp32/fp16/bf16, contiguous) -> (packed uint8 [ceil(n / 2)], absmax fp32 [n_blocks], bad).

    midpoints: fp32 [15], between neighbouring levels of the sorted NF4 code (as the reference makes
    them). packed / absmax may be views into larger buffers (the loader fills one weight in row
    chunks); `bad` (int32 [1]) accumulates the count of NaN/Inf values, checked by the caller once.
    """
    w = w.reshape(-1)
    if not w.is_contiguous():
        raise ValueError("quantize_nf4_triton needs a contiguous weight")
    n = w.numel()
    n_blocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device) if packed is None else packed
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=w.device) if absmax is None else absmax
    bad = torch.zeros(1, dtype=torch.int32, device=w.device) if bad is None else bad
    grid = (triton.cdiv(n_blocks, blocks_per_program),)
    _quantize_kernel[grid](w, midpoints, packed, absmax, bad, n, BLOCKSIZE=blocksize, BLOCKS=blocks_per_program)
    return packed, absmax, bad
