"""Triton kernels for NF4 weights: dequantization, the dequant-matmul of training, the decode GEMV."""

from kernels.dequant import dequantize_nf4_triton
from kernels.gemv import MAX_ROWS, gemv_nf4
from kernels.matmul import check_fused_shape, matmul_nf4, matmul_nf4_grad

__all__ = ["dequantize_nf4_triton", "gemv_nf4", "matmul_nf4", "matmul_nf4_grad", "check_fused_shape", "MAX_ROWS"]
