"""What every Triton kernel here shares: the one switch that decides whether a kernel runs (and
where kernels can run), the fp32 -> dtype rounding helpers, and the shape of an NF4 weight's state.

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


# ----------------------------------------------------------------------------- the kernel switch

# Every Triton kernel of the training and decode paths (NF4 matmul and GEMV in Linear4bit, the LoRA
# input gradient in LoRAFunction, RMSNorm, RoPE and SwiGLU in llama.model) asks use_kernel() before
# it runs; otherwise its caller runs the plain PyTorch reference of the same function.
#   "auto" (default): every kernel wherever Triton runs (CUDA; the CPU under TRITON_INTERPRET=1),
#          except that the fused RMSNorm, RoPE and SwiGLU (cuda_only=True) run on CUDA only: in the
#          CPU interpreter they would slow every model test, so the tests that check them set "1"
#   "1":   every kernel wherever Triton runs
#   "0":   no kernel: the PyTorch reference everywhere
# Whatever the setting, code compiled by torch.compile takes the references (use_kernel says why).
# Set it with set_kernels(); its default comes from the environment variable QLORA_FUSED_KERNELS.
KERNEL_SETTINGS = ("auto", "1", "0")


def _checked(setting: str) -> str:
    if setting not in KERNEL_SETTINGS:
        raise ValueError(f"kernel setting {setting!r} is not one of {KERNEL_SETTINGS}: set QLORA_FUSED_KERNELS "
                         "(or call kernels.common.set_kernels) to auto, 1 or 0")
    return setting


KERNELS = _checked(os.environ.get("QLORA_FUSED_KERNELS", "auto"))


def set_kernels(setting: str) -> None:
    """Switch the Triton kernels: "auto", "1" or "0" (see KERNEL_SETTINGS above)."""
    global KERNELS
    KERNELS = _checked(setting)


def use_kernel(x: torch.Tensor, dtypes: tuple, cuda_only: bool = False) -> bool:
    """Whether a kernel that takes x's dtype among `dtypes` runs on x, by the switch (above)."""
    if x.dtype not in dtypes or KERNELS == "0":
        return False
    if torch.compiler.is_compiling():
        # Inside torch.compile (torch_compile: true) the reference ops are traced instead: inductor
        # writes its own fused kernels for them, and it could not trace the CPU interpreter anyway.
        return False
    if x.is_cuda:
        return True
    return bool(INTERPRET) and not (cuda_only and KERNELS == "auto")


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
