"""Triton kernels for NF4 weights: dequantization, the decode GEMV, and the training-path matmul."""

from kernels.dequant import KERNEL_DTYPES, dequantize_nf4_triton
from kernels.gemv import MAX_ROWS, gemv_nf4, gemv_supported
from kernels.matmul import NF4Matmul, matmul_nf4, matmul_nf4_grad

__all__ = ["KERNEL_DTYPES", "MAX_ROWS", "NF4Matmul", "dequantize_nf4_triton", "gemv_nf4", "gemv_supported",
           "matmul_nf4", "matmul_nf4_grad"]
