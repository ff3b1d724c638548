"""A frozen linear layer whose weight is stored in NF4 (QLoRA paper, section 3 and eq. 5).

The forward pass computes y = x @ dequant(W)^T + b in the compute dtype (bf16 by default); the
weight never receives a gradient, only the input does, which is all LoRA needs (eq. 6). On a GPU
(and on the CPU under TRITON_INTERPRET=1) the Triton kernels of kernels/ do the work: a GEMV that
reads the 4-bit weight once for decoding (1-16 rows), Triton dequantization + cuBLAS for training;
elsewhere (fp32 inputs, or a CPU without the interpreter) the pure-PyTorch reference
dequantize_nf4 + F.linear.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import KERNEL_DTYPES, NF4Matmul, matmul_nf4_grad
from kernels.dequant import runs_here
from qlora.nf4 import QuantState, dequantize_nf4, quantize_nf4


def use_kernels(x: torch.Tensor) -> bool:
    """Whether Linear4bit runs the Triton kernels for x: fp16 / bf16 on CUDA, or on the CPU when
    Triton interprets kernels (TRITON_INTERPRET=1, read when kernels/ is imported)."""
    return x.dtype in KERNEL_DTYPES and runs_here(x)


class Linear4bit(nn.Module):
    """nn.Linear with a frozen NF4 weight. Build it with `from_linear` or `from_weight`."""

    def __init__(self, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.compute_dtype = compute_dtype
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.weight_dtype = state.dtype
        # Everything the QuantState holds is a buffer, so .to(device) and state_dict() carry it.
        self.register_buffer("packed", packed)                 # uint8 [out * in / 2]
        self.register_buffer("absmax", state.absmax)           # uint8 codes or fp32 [n_blocks]
        self.register_buffer("code", state.code)               # fp32 [16]
        self.register_buffer("absmax2", state.absmax2)         # fp32 [n_blocks / 256] or None
        self.register_buffer("code2", state.code2)             # fp32 [256] or None
        self.register_buffer("offset", state.offset)           # fp32 scalar or None
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        """Quantize a [out, in] weight (on whatever device it lives) into a Linear4bit."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        packed, state = quantize_nf4(weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(packed, state, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        dtype = compute_dtype or (linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.bfloat16)
        return cls.from_weight(linear.weight, linear.bias, blocksize, double_quant, dtype)

    @property
    def state(self) -> QuantState:
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          dtype=self.weight_dtype, blocksize=self.blocksize, code=self.code,
                          quant_type=self.quant_type, absmax2=self.absmax2, code2=self.code2,
                          offset=self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: the compute dtype)."""
        return dequantize_nf4(self.packed, self.state).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(x):
            return NF4Matmul.apply(x, self.bias, self.packed, self.state)
        # The reference: fp32 inputs, or a CPU without TRITON_INTERPRET=1.
        w = self.dequantize(x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else None)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def grad_input(self, grad_y: torch.Tensor) -> torch.Tensor:
        """grad_y [..., out] @ W -> [..., in]: the input gradient of forward, for callers that write
        their own backward (qlora.lora.LoRAFunction). W is frozen, so this is all its backward needs."""
        if use_kernels(grad_y):
            return matmul_nf4_grad(grad_y, self.packed, self.state)
        return grad_y @ self.dequantize(grad_y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.absmax2 is not None}, compute_dtype={self.compute_dtype}")
