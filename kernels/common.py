"""What every Triton kernel here shares: whether Triton interprets kernels on the CPU, where kernels
can run, the fp32 -> dtype rounding helpers, and the shape of an NF4 weight's state.

kernels/ imports nothing of the packages above it (qlora/, llama/): an NF4 weight arrives as its
packed bytes plus any object with the fields of NF4State (qlora.nf4.QuantState is one).
"""

import os
from typing import Protocol

import torch
import triton
import triton.language as tl

# Kernels run in Triton's CPU interpreter under TRITON_INTERPRET=1, whose bf16 cast needs help.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def runs_here(x: torch.Tensor) -> bool:
    """Whether Triton kernels can run on x's device: CUDA, or the CPU when Triton interprets them."""
    return x.is_cuda or bool(INTERPRET)


class NF4State(Protocol):
    """What the NF4 kernels read of a weight's quantization state (qlora.nf4.QuantState)."""
    absmax: torch.Tensor                 # fp32 [n_blocks], or uint8 codes with double quantization
    shape: torch.Size                    # the weight's shape
    blocksize: int                       # values per absmax block
    code: torch.Tensor                   # fp32 [16] code book
    absmax2: torch.Tensor | None         # double quantization: fp32 [ceil(n_blocks / blocksize2)]
    code2: torch.Tensor | None           # fp32 [256]
    offset: torch.Tensor | None          # fp32 scalar
    blocksize2: int

    @property
    def double_quant(self) -> bool: ...


@triton.jit
def round_to(values, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even (like torch's .to())."""
    if INTERPRET and dtype == tl.bfloat16:
        # Triton's interpreter truncates fp32 -> bf16; round with integer ops there instead.
        bits = values.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)                # finite inputs only (no NaN/Inf here)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return values.to(dtype)


@triton.jit
def rounded(v, dtype: tl.constexpr):
    """fp32 v rounded to dtype and back to fp32: the rounding one separate torch op makes."""
    return round_to(v, dtype).to(tl.float32)
