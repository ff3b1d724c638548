"""Triton kernels for NF4 weights (dequantization, the decode GEMV, the training-path matmul) and the
fused RMSNorm, RoPE and SwiGLU of the Llama block, the LoRA input gradient through dropout, and the
embedding lookup from a table in pinned host memory (kernels/embedding.py)."""

from kernels.dequant import KERNEL_DTYPES, dequantize_nf4_triton
from kernels.gemv import MAX_ROWS, gemv_nf4, gemv_supported
from kernels.lora_grad import lora_dropout_grad_
from kernels.matmul import NF4Matmul, matmul_nf4, matmul_nf4_grad
from kernels.rmsnorm import RMSNormFunction, rms_norm
from kernels.rope import RoPEFunction, apply_rope_qk
from kernels.swiglu import SwiGLUFunction, swiglu

__all__ = ["KERNEL_DTYPES", "MAX_ROWS", "NF4Matmul", "RMSNormFunction", "RoPEFunction", "apply_rope_qk",
           "dequantize_nf4_triton", "gemv_nf4", "gemv_supported", "matmul_nf4", "matmul_nf4_grad", "rms_norm",
           "SwiGLUFunction", "swiglu", "lora_dropout_grad_"]
