"""A frozen linear layer whose weight is stored in NF4 (QLoRA paper, section 3 and eq. 5).

The forward pass computes y = x @ dequant(W)^T + b in the compute dtype (bf16 by default); the
weight never receives a gradient, only the input does, which is all LoRA needs (eq. 6). On a GPU
(and on the CPU under TRITON_INTERPRET=1) the Triton kernels of kernels/ do the work: a GEMV that
reads the 4-bit weight once for decoding (1-16 rows), Triton dequantization + cuBLAS for training;
elsewhere (fp32 inputs, or a CPU without the interpreter) the pure-PyTorch reference
dequantize_nf4 + F.linear.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import KERNEL_DTYPES, NF4Matmul, matmul_nf4_grad
from kernels.matmul import linear_nf4
from kernels.common import use_kernel
from kernels.quantize import quantize_nf4_triton
from qlora.nf4 import (QuantState, check_weight, code_midpoints, dequantize_nf4, double_quantize, nf4_code,
                       quantize_nf4)

QUANT_CHUNK_NUMEL = 2**21  # values quantized at once by from_weight: quantize_nf4 needs ~23 bytes of scratch each


def _rows_on_device(weight: torch.Tensor, rows: int, device: torch.device, dtype: torch.dtype):
    """Yield (first row, weight[first row:][:rows] on `device` in `dtype`) for every chunk of rows.

    From the CPU to a GPU each chunk goes through one of two pinned buffers: the upload is then a DMA
    that runs while the host copies the next chunk into the other buffer (a pageable tensor's .to()
    would make the driver stage and wait for every chunk)."""
    if not (weight.device.type == "cpu" and device.type == "cuda"):
        for r in range(0, weight.shape[0], rows):
            yield r, weight[r:r + rows].to(device=device, dtype=dtype)
        return
    staging = [torch.empty((rows, weight.shape[1]), dtype=weight.dtype, pin_memory=True) for _ in range(2)]
    uploaded = [None, None]                                  # the event after each buffer's last upload
    for i, r in enumerate(range(0, weight.shape[0], rows)):
        buf, rows_here = staging[i % 2], min(rows, weight.shape[0] - r)
        if uploaded[i % 2] is not None:
            uploaded[i % 2].synchronize()                    # its previous DMA has finished reading it
        buf[:rows_here].copy_(weight[r:r + rows_here])
        chunk = buf[:rows_here].to(device=device, non_blocking=True).to(dtype)
        uploaded[i % 2] = torch.cuda.Event()
        uploaded[i % 2].record()
        yield r, chunk


def use_kernels(x: torch.Tensor) -> bool:
    """Whether Linear4bit runs the Triton kernels for x, by the kernel switch: fp16 / bf16 on CUDA, or on
    the CPU when Triton interprets kernels (TRITON_INTERPRET=1, read when kernels/ is imported)."""
    return use_kernel(x, KERNEL_DTYPES)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes x in: autocast's when it is on (bf16 in QLoRA training), as F.linear
    does, else x's own. Without it an fp32 input under autocast (LayerNorm runs in fp32 there: Falcon's
    blocks) took the fp32 reference path."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it already is (a no-op .to() is still an op the host dispatches)."""
    return t if t.dtype == dtype else t.to(dtype)


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
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16, device=None,
                    weight_dtype: torch.dtype | None = None, chunk_numel: int = QUANT_CHUNK_NUMEL) -> "Linear4bit":
        """Quantize a [out, in] weight (on any device) to NF4 into a Linear4bit on `device` (default: the
        weight's), casting it to `weight_dtype` first (default: its own dtype).

        The weight moves to the device and is quantized a few rows (chunk_numel values) at a time, so
        a 7B model's projections never exist whole in 16 bits there. The bytes equal one quantize_nf4
        call on the whole weight: chunks hold whole blocks, so every block's absmax is the same, and
        the double quantization runs once on all of them.
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        check_weight(weight, blocksize, finite=False)           # each chunk is checked for NaN/Inf
        device = weight.device if device is None else torch.device(device)
        weight_dtype = weight_dtype or weight.dtype
        weight = weight.detach()
        out_features, in_features = weight.shape
        n = weight.numel()
        rows_per_block = blocksize // math.gcd(in_features, blocksize)  # rows that end on a block boundary
        rows = max(rows_per_block, chunk_numel // in_features // rows_per_block * rows_per_block)

        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
        absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=device)
        kernel = use_kernel(packed.new_empty(0, dtype=weight_dtype), KERNEL_DTYPES + (torch.float32,), cuda_only=True)
        if kernel:                                              # one Triton pass per chunk, one check per weight
            midpoints, bad = code_midpoints(nf4_code(device)), torch.zeros(1, dtype=torch.int32, device=device)
        for r, chunk in _rows_on_device(weight, rows, device, weight_dtype):
            start = r * in_features                             # a multiple of blocksize, so even
            if kernel:
                stop = start + chunk.numel()
                quantize_nf4_triton(chunk, midpoints, blocksize, packed[start // 2:(stop + 1) // 2],
                                    absmax[start // blocksize:math.ceil(stop / blocksize)], bad)
                continue
            chunk_packed, chunk_state = quantize_nf4(chunk, blocksize, double_quant=False)   # the reference
            packed[start // 2:start // 2 + chunk_packed.numel()] = chunk_packed
            absmax[start // blocksize:start // blocksize + chunk_state.absmax.numel()] = chunk_state.absmax
            del chunk, chunk_packed, chunk_state
        if kernel and bad.item():
            raise ValueError(f"weight has {bad.item()} NaN/Inf value(s): fix or drop them before quantizing")

        state = QuantState(absmax=absmax, shape=weight.shape, dtype=weight_dtype, blocksize=blocksize,
                           code=nf4_code(device))
        return cls(packed, double_quantize(state) if double_quant else state, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        dtype = compute_dtype or (linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.bfloat16)
        return cls.from_weight(linear.weight, linear.bias, blocksize, double_quant, dtype)

    # packed and absmax are 1-D buffers, or 2-D parameters [row groups, ...] once sharded by FSDP2
    # (qlora/distributed.py); everything below reads them flat (reshape: a view, no copy).
    @property
    def state(self) -> QuantState:
        return QuantState(absmax=self.absmax.reshape(-1), shape=torch.Size((self.out_features, self.in_features)),
                          dtype=self.weight_dtype, blocksize=self.blocksize, code=self.code,
                          quant_type=self.quant_type, absmax2=self.absmax2, code2=self.code2,
                          offset=self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: the compute dtype)."""
        return dequantize_nf4(self.packed, self.state).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = cast(x, compute_dtype(x))
        if use_kernels(x):
            return NF4Matmul.apply(x, self.bias, self.packed.reshape(-1), self.state)
        # The reference: fp32 inputs, or a CPU without TRITON_INTERPRET=1.
        w = self.dequantize(x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else None)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """forward's value without its autograd node, for callers that write their own backward
        (qlora.lora.LoRAFunction: a node inside a node costs host time and records nothing)."""
        x = cast(x, compute_dtype(x))
        if use_kernels(x):
            return linear_nf4(x, self.bias, self.packed.reshape(-1), self.state)
        return self.forward(x)

    def grad_input(self, grad_y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """grad_y [..., out] @ W -> [..., in]: the input gradient of forward, for callers that write
        their own backward (qlora.lora.LoRAFunction). W is frozen, so this is all its backward needs.
        out: a 2-D [M, in] tensor to add the product into, in place (several layers that read one
        input sum their input gradients there)."""
        if use_kernels(grad_y):
            return matmul_nf4_grad(grad_y, self.packed.reshape(-1), self.state, out)
        w = self.dequantize(grad_y.dtype)
        return grad_y @ w if out is None else out.addmm_(grad_y, w)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.absmax2 is not None}, compute_dtype={self.compute_dtype}")
