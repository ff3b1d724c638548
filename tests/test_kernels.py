"""kernels/: the Triton NF4 kernels against their pure-PyTorch references, and Linear4bit on top of
them against bitsandbytes. The kernels run in Triton's CPU interpreter:

    TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py

Dequantization must be bit-exact. Products are compared with the float64 product of the same fp32
weight, within a bound derived from the roundings each path makes (fp16 / bf16 operands and outputs,
fp32 accumulation); a wrong nibble, absmax or mask lands many times outside it.
"""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels.common
import kernels.gemv
import kernels.matmul
from kernels import (MAX_ROWS, NF4Matmul, dequantize_nf4_triton, gemv_nf4, lora_dropout_grad_, matmul_nf4,
                     matmul_nf4_grad)
from kernels.common import use_kernel
from qlora.linear4bit import Linear4bit, use_kernels
from qlora.nf4 import dequantize_nf4, quantize_nf4

ROOT = Path(__file__).resolve().parents[1]
HALF_DTYPES = [torch.float16, torch.bfloat16]

# Triton reads TRITON_INTERPRET when it is imported, so it must be set before Python starts.
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs Triton kernels on the CPU: needs TRITON_INTERPRET=1 set before Python starts "
           "(TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py)")


def nf4_weight(shape, blocksize=64, double_quant=True, seed=0):
    """An fp32 N(0, 1) weight quantized to NF4 -> (packed, state); state.dtype is fp32."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def half_ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of `dtype` numbers at magnitude v (float64): the most rounding to nearest moves v."""
    info = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(v.clamp(min=info.tiny)))) * info.eps / 2


def error_bound(x, w, dtype, rounded_operands, bias=None):
    """Elementwise bound on |computed - exact| for x @ w.T (+ bias), exact in float64.

    The computation rounded `rounded_operands` of x and w to `dtype` (relative error u each), summed
    the products in fp32 ((K + 2) * 2^-24 of sum |x||w| covers the products and the sum), rounded
    the result to `dtype`, and once more after adding the bias.
    """
    x, w = x.double(), w.double()
    product = x @ w.T
    u = torch.finfo(dtype).eps / 2
    first = (rounded_operands * u * (1 + u) + (x.shape[-1] + 2) * 2.0**-24) * (x.abs() @ w.abs().T)
    bound = first + half_ulp(product.abs() + first, dtype)
    if bias is not None:
        bound = bound + half_ulp((product + bias.double()).abs() + bound, dtype)
    return bound


def assert_within(got, exact, bound, what):
    err = (got.double() - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"{what}: error {worst:.2f}x the rounding bound (max abs error {err.max().item():.3g})"


# ----------------------------------------------------------------------------- dequantization

# 7 x 129: an odd number of values; 129 x 257: 17 programs, the last partial, and > 256 absmax blocks
# (so several second-level absmax2 blocks with double quantization).
@interpreted
@pytest.mark.parametrize("shape", [(3, 100), (7, 129), (129, 257)])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dequantize_triton_equals_reference_bit_for_bit(shape, blocksize, double_quant, dtype):
    packed, state = nf4_weight(shape, blocksize, double_quant, seed=shape[0] + blocksize)
    fp32_values = dequantize_nf4(packed, state)
    for state_dtype in (torch.float32, torch.float16, torch.bfloat16):
        s = replace(state, dtype=state_dtype)
        got = dequantize_nf4_triton(packed, s, dtype)
        assert got.shape == shape and got.dtype == dtype
        # The kernel rounds the fp32 value code[q] * absmax once, to `dtype`...
        assert torch.equal(got, fp32_values.to(dtype))
        # ...which is what the reference returns whenever it rounds once too.
        if state_dtype in (torch.float32, dtype):
            assert torch.equal(got, dequantize_nf4(packed, s).to(dtype))


# ----------------------------------------------------------------------------- decode GEMV

def check_gemv(x, packed, state, what):
    """gemv_nf4 against the float64 product, within the rounding bound of the kernel it runs.

    Up to FMA_ROWS rows the kernel keeps W in fp32 (0 rounded operands: only fp32 accumulation and
    the output rounding), so it is at least as close as the reference, which rounds W to x's dtype
    first. With more rows it runs on the tensor cores with W rounded to x's dtype as the reference
    does: then it is bound against the product of exactly the reference's operands."""
    w = dequantize_nf4(packed, replace(state, dtype=torch.float32))    # fp32, what the kernel decodes
    got = gemv_nf4(x, packed, state)
    assert got.shape == (x.shape[0], state.shape[0]) and got.dtype == x.dtype
    exact = x.double() @ w.double().T
    if x.shape[0] <= kernels.gemv.FMA_ROWS:
        assert_within(got, exact, error_bound(x, w, x.dtype, rounded_operands=0), what)
        ref = F.linear(x, w.to(x.dtype))
        assert (got.double() - exact).norm() <= (ref.double() - exact).norm()
    else:
        w_ref = w.to(x.dtype).float()                                  # the reference's weight, bit for bit
        assert_within(got, x.double() @ w_ref.double().T, error_bound(x, w_ref, x.dtype, 0), what)
        assert_within(got, exact, error_bound(x, w, x.dtype, rounded_operands=1), what)


# 131 x 192 / 64 = 393 absmax blocks: two second-level blocks; blocksize 256 = the interpreter's
# BLOCK_K; 584 x 576 = (73 * 8) x (9 * 64) and 24 x 4544 (Falcon-7B's 71 * 64) leave partial tiles
# in N and K for every config, as Falcon's 4544 / 4672 / 18176 do.
@interpreted
@pytest.mark.parametrize("N, K, blocksize", [(131, 192, 64), (67, 256, 256), (584, 576, 64), (24, 4544, 64)])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gemv_within_rounding_of_exact_product(N, K, blocksize, M, dtype):
    packed, state = nf4_weight((N, K), blocksize, seed=N + M)
    check_gemv(randn(M, K, dtype=dtype, seed=M), packed, state, f"gemv_nf4 {N}x{K} M={M}")


@interpreted
@pytest.mark.parametrize("kernel, config, M", [("_gemv_fma_kernel", c, 2) for c in kernels.gemv.FMA_CONFIGS]
                         + [("_gemv_dot_kernel", c, 5) for c in kernels.gemv.DOT_CONFIGS], ids=str)
def test_gemv_gpu_configs_in_interpreter(kernel, config, M, monkeypatch):
    # The GPU tiles (BLOCK_K 128-2048, BLOCK_N 2-64) differ from the interpreter's: K = 1344 = 21 * 64
    # leaves a partial tile for every BLOCK_K, N = 13 a partial one for every BLOCK_N.
    monkeypatch.setattr(getattr(kernels.gemv, kernel), "configs", [config])
    packed, state = nf4_weight((13, 1344), 64, seed=3)
    check_gemv(randn(M, 1344, dtype=torch.bfloat16, seed=4), packed, state, f"{kernel} {config}")


# ----------------------------------------------------------------------------- training path

@interpreted
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_matmul_nf4_and_grad_equal_reference(dtype):
    # in_features 100 is not a multiple of blocksize 64: absmax blocks cross rows of W.
    packed, state = nf4_weight((37, 100), 64, seed=5)
    w = dequantize_nf4(packed, state).to(dtype)
    x, grad_y = randn(2, 9, 100, dtype=dtype, seed=6), randn(2, 9, 37, dtype=dtype, seed=7)
    # The same torch product of the same (bit-exact) weight: equal, not merely close.
    assert torch.equal(matmul_nf4(x, packed, state), F.linear(x, w))
    assert torch.equal(matmul_nf4_grad(grad_y, packed, state), grad_y @ w)
    # Added into a given gradient (layers that share an input): torch's addmm_ of the same weight.
    acc = randn(18, 100, dtype=dtype, seed=8)
    expected = acc.clone().addmm_(grad_y.reshape(18, 37), w)
    assert torch.equal(matmul_nf4_grad(grad_y.reshape(18, 37), packed, state, out=acc), expected)


@interpreted
@pytest.mark.parametrize("x_shape", [(5, 128), (4, 10, 128)], ids=["gemv", "matmul"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_nf4matmul_gradients_match_float64_autograd(x_shape, dtype):
    packed, state = nf4_weight((37, 128), 64, seed=8)
    w = dequantize_nf4(packed, state)                                  # fp32 [37, 128]
    x = randn(*x_shape, dtype=dtype, seed=9).requires_grad_()
    bias = randn(37, dtype=dtype, seed=10).requires_grad_()
    grad_y = randn(*x_shape[:-1], 37, dtype=dtype, seed=11)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = NF4Matmul.apply(x, bias, packed, state)
    y.backward(grad_y)
    # Only the 4-bit storage is kept for backward: no activation, no dequantized weight (eq. 6).
    assert len(saved) == 1 and saved[0].data_ptr() == packed.data_ptr()
    assert not packed.requires_grad and packed.grad is None

    # Reference: autograd through dequantize + F.linear, all in float64.
    x64 = x.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_()
    y64 = F.linear(x64, w.double(), bias64)
    y64.backward(grad_y.double())

    x2, gy2 = x.detach().reshape(-1, 128), grad_y.reshape(-1, 37)
    assert_within(y.detach().reshape(-1, 37), y64.detach().reshape(-1, 37),
                  error_bound(x2, w, dtype, rounded_operands=1, bias=bias.detach()), "forward")
    assert_within(x.grad.reshape(-1, 128), x64.grad.reshape(-1, 128),
                  error_bound(gy2, w.T, dtype, rounded_operands=1), "grad_x")
    # grad_bias sums grad_y over rows in fp32, then rounds once.
    summed = (gy2.shape[0] + 2) * 2.0**-24 * gy2.double().abs().sum(0)
    bias_bound = summed + half_ulp(bias64.grad.abs() + summed, dtype)
    assert_within(bias.grad, bias64.grad, bias_bound, "grad_bias")


# ----------------------------------------------------------------------------- Linear4bit

def bnb_linear4bit(linear: nn.Linear):
    """bitsandbytes.nn.Linear4bit (nf4, double quant, bf16 compute) holding linear's weight, on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
    layer.bias = nn.Parameter(linear.bias.data.to(torch.bfloat16), requires_grad=False)
    return layer.to("cpu")                                             # quantizes the weight


@interpreted
@pytest.mark.parametrize("x_shape", [(1, 192), (2, 3, 192), (4, 10, 192)], ids=["1row", "6rows", "40rows"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["kernels", "reference"])
def test_linear4bit_matches_bitsandbytes(x_shape, dtype, monkeypatch):
    torch.manual_seed(12)
    linear = nn.Linear(192, 67)
    ours, theirs = Linear4bit.from_linear(linear), bnb_linear4bit(linear)
    qs = theirs.weight.quant_state
    assert torch.equal(ours.packed, theirs.weight.data.view(-1)) and torch.equal(ours.absmax, qs.absmax)
    assert torch.equal(ours.absmax2, qs.state2.absmax) and torch.equal(ours.offset, qs.offset)

    calls = []
    for name in ("gemv_nf4", "matmul_nf4"):     # record which kernel path NF4Matmul takes
        fn = getattr(kernels.matmul, name)
        monkeypatch.setattr(kernels.matmul, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    x = randn(*x_shape, dtype=dtype, seed=13)
    with torch.no_grad():
        got = ours(x)
        expected = theirs(x)
    rows = x.numel() // 192
    if dtype == torch.float32:
        assert calls == []                      # fp32 input: the pure-PyTorch reference
    else:
        assert calls == ["gemv_nf4" if rows <= MAX_ROWS else "matmul_nf4"]
    assert got.shape == expected.shape == (*x_shape[:-1], 67) and got.dtype == expected.dtype == dtype

    w = ours.dequantize(torch.float32)
    x2, bias = x.reshape(rows, 192), ours.bias
    exact = (x2.double() @ w.double().T + bias.double())
    # Ours: W rounded to bf16 (the kernels) or nothing rounded (fp32 reference). bitsandbytes
    # computes in bf16 whatever the input: W and, for an fp32 input, x are rounded to bf16.
    ours_bound = error_bound(x2, w, dtype, 1 if dtype == torch.bfloat16 else 0, bias)
    bnb_bound = error_bound(x2, w, torch.bfloat16, 1 if dtype == torch.bfloat16 else 2, bias)
    assert_within(got.reshape(rows, 67), exact, ours_bound, "Linear4bit")
    assert_within(got.reshape(rows, 67), expected.reshape(rows, 67).double(), ours_bound + bnb_bound,
                  "Linear4bit vs bitsandbytes")


@interpreted
@pytest.mark.parametrize("x_shape", [(2, 3, 192), (4, 10, 192)], ids=["gemv", "matmul"])
def test_lora_on_linear4bit_matches_peft_on_bitsandbytes(x_shape):
    # The QLoRA layer as training runs it (bf16 autocast, the Triton kernels, dropout): LoRAFunction
    # against PEFT's LoRA on bitsandbytes.nn.Linear4bit, the same weights, the same dropout mask (one
    # seed), both measured against float64. Ours may err more than PEFT only by rounding noise.
    peft = pytest.importorskip("peft")
    from qlora.lora import LoRALinear
    torch.manual_seed(14)
    linear = nn.Linear(192, 67)
    ours = LoRALinear(Linear4bit.from_linear(linear), r=8, alpha=16, dropout=0.3).train()
    wrapper = nn.ModuleDict(dict(proj=bnb_linear4bit(linear)))
    wrapper.forward = lambda x: wrapper["proj"](x)
    ref = peft.get_peft_model(wrapper, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.3, target_modules=["proj"]))
    ref.train()
    layer = ref.base_model.model["proj"]
    with torch.no_grad():
        ours.lora_b.normal_()
        layer.lora_A["default"].weight.copy_(ours.lora_a)
        layer.lora_B["default"].weight.copy_(ours.lora_b)
    x, grad_y = randn(*x_shape, dtype=torch.bfloat16, seed=15), randn(*x_shape[:-1], 67, dtype=torch.bfloat16, seed=16)

    def run(module, x):
        x = x.clone().requires_grad_()
        torch.manual_seed(17)                                          # the same dropout mask
        with torch.autocast("cpu", dtype=torch.bfloat16):              # as training runs (train.py)
            y = module(x)
        y.backward(grad_y.to(y.dtype))
        return y.detach(), x.grad

    y_ours, gx_ours = run(ours, x)
    ga_ours, gb_ours = ours.lora_a.grad, ours.lora_b.grad
    y_ref, gx_ref = run(ref, x)
    ga_ref, gb_ref = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad

    # float64: the dequantized weight (the same on both sides), the same mask, autograd.
    torch.manual_seed(17)
    _, mask = torch.native_dropout(x.reshape(-1, 192), 0.3, True)
    x64 = x.double().requires_grad_()
    a64, b64 = (t.detach().double().requires_grad_() for t in (ours.lora_a, ours.lora_b))
    w64, bias64 = ours.base.dequantize(torch.float64), ours.base.bias.double()
    xd = (x64.reshape(-1, 192) * mask / 0.7).view(x_shape)
    y64 = F.linear(x64, w64, bias64) + 2.0 * (xd @ a64.T) @ b64.T
    y64.backward(grad_y.double())
    exact = [y64.detach(), x64.grad, a64.grad, b64.grad]

    def rel(tensors):
        return [((t.double() - e).norm() / e.norm()).item() for t, e in zip(tensors, exact)]

    ours_err, ref_err = rel([y_ours, gx_ours, ga_ours, gb_ours]), rel([y_ref, gx_ref, ga_ref, gb_ref])
    assert ga_ours.dtype == gb_ours.dtype == torch.float32 and gx_ours.dtype == torch.bfloat16
    for what, e_ours, e_ref in zip(["y", "grad_x", "grad_A", "grad_B"], ours_err, ref_err):
        # Both sides sit about 0.004 from float64 (bf16 roundings; ours / PEFT's 0.96-1.06 when
        # written); a lost mask, scale or term is off by O(1).
        assert e_ours <= 1.5 * e_ref, f"{what}: relative error {e_ours:.3g} vs PEFT + bnb {e_ref:.3g}"


@interpreted
@pytest.mark.parametrize("M, N, R", [(37, 200, 8), (64, 128, 32), (5, 77, 70)], ids=str)
@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32], ids=str)
def test_lora_dropout_grad_within_rounding_of_float64(M, N, R, dtype):
    # grad_x += s * mask * (grad_h @ A): against float64 on the same (rounded) inputs, and against the
    # reference grad_x.addcmul_(grad_h @ A, mask, value=s) that LoRAFunction runs without Triton.
    grad_x, grad_h, a = randn(M, N, dtype=dtype, seed=20), randn(M, R, dtype=dtype, seed=21), randn(R, N, dtype=dtype, seed=22)
    mask = torch.rand(M, N, generator=torch.Generator().manual_seed(23)) > 0.3
    s = 1 / 0.7
    ours = lora_dropout_grad_(grad_x.clone(), grad_h, a, mask, s)
    ref = grad_x.clone().addcmul_(grad_h @ a, mask, value=s)
    t = grad_h.double() @ a.double()
    exact = grad_x.double() + s * mask * t
    # The r-term sum in fp32, rounded to dtype (as the reference's product); then gx + s t in fp32, rounded.
    sum_err = (R + 2) * 2.0**-24 * (grad_h.double().abs() @ a.double().abs())
    t_err = s * mask * (sum_err + half_ulp(t.abs() + sum_err, dtype))
    bound = t_err + 2.0**-24 * (exact.abs() + t_err) + half_ulp(exact.abs() + t_err, dtype)
    assert ours.dtype == dtype
    assert_within(ours, exact, bound, "lora_dropout_grad_")
    assert_within(ref, exact, bound, "the reference")                # the bound holds for the reference too
    assert_within(ours, ref.double(), 2 * bound, "lora_dropout_grad_ vs reference")


def test_lora_dropout_grad_rejects_bad_input_with_clear_message():
    gx, gh, a, mask = torch.zeros(4, 8), torch.zeros(4, 2), torch.zeros(2, 8), torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="bool mask"):
        lora_dropout_grad_(gx, gh, a, mask.float(), 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        lora_dropout_grad_(gx, gh.half(), a, mask, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        lora_dropout_grad_(torch.zeros(8, 4).t(), gh, a, mask, 1.0)


@interpreted
def test_use_kernels_under_interpreter():
    assert use_kernels(torch.ones(2, dtype=torch.bfloat16)) and use_kernels(torch.ones(2, dtype=torch.float16))
    assert not use_kernels(torch.ones(2)) and not use_kernels(torch.ones(2, dtype=torch.float64))


FALLBACK_SCRIPT = """
import torch, torch.nn.functional as F
from unittest import mock
import qlora.linear4bit as L
x = torch.randn(3, 64, dtype=torch.bfloat16)
assert not L.use_kernels(x), "use_kernels is True on a CPU without TRITON_INTERPRET"
layer = L.Linear4bit.from_weight(torch.randn(8, 64), torch.randn(8))
with mock.patch.object(L.NF4Matmul, "apply", side_effect=AssertionError("Linear4bit took the kernel path")):
    y = layer(x)
assert torch.equal(y, F.linear(x, layer.dequantize(torch.bfloat16), layer.bias)), "not the reference"
print("reference path")
"""


def test_linear4bit_uses_reference_on_cpu_without_interpreter():
    # In a fresh interpreter: TRITON_INTERPRET is read once, when kernels/ is imported.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "reference path" in run.stdout, run.stderr


# ----------------------------------------------------------------------------- bad input

def test_gemv_rejects_bad_input_with_clear_message():
    packed, state = nf4_weight((8, 64), 64)
    with pytest.raises(ValueError, match="1 to 16 rows of x, got 17: use matmul_nf4"):
        gemv_nf4(torch.zeros(17, 64, dtype=torch.bfloat16), packed, state)
    with pytest.raises(ValueError, match=r"x must be \[rows, in_features\] for the weight \(8, 64\), got x \(2, 65\)"):
        gemv_nf4(torch.zeros(2, 65, dtype=torch.bfloat16), packed, state)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        gemv_nf4(torch.zeros(2, 64), packed, state)
    packed, state = nf4_weight((8, 100), 64)
    with pytest.raises(ValueError, match=r"in_features \(100\) must be a multiple of blocksize \(64\)"):
        gemv_nf4(torch.zeros(2, 100, dtype=torch.bfloat16), packed, state)


def test_dequantize_triton_rejects_bad_input_with_clear_message():
    packed, state = nf4_weight((8, 64), 64)
    with pytest.raises(ValueError, match="use torch.float16 or torch.bfloat16"):
        dequantize_nf4_triton(packed, state, torch.float32)
    with pytest.raises(ValueError, match=r"256 bytes for shape \(8, 64\), got torch.uint8 with 255"):
        dequantize_nf4_triton(packed[:-1], state, torch.bfloat16)


@interpreted
def test_one_switch_decides_every_kernel(monkeypatch):
    x = torch.ones(2, dtype=torch.bfloat16)
    assert use_kernel(x, (torch.bfloat16,)) and not use_kernel(x, (torch.bfloat16,), cuda_only=True)   # auto
    assert not use_kernel(x, (torch.float16,))
    monkeypatch.setattr(kernels.common, "KERNELS", "1")
    assert use_kernel(x, (torch.bfloat16,), cuda_only=True) and use_kernels(x)
    monkeypatch.setattr(kernels.common, "KERNELS", "0")
    assert not use_kernels(x) and not use_kernel(x, (torch.bfloat16,))
    with pytest.raises(ValueError, match="to auto, 1 or 0"):
        kernels.common.set_kernels("cuda")
