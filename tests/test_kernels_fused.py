"""kernels/rmsnorm.py, kernels/rope.py, kernels/swiglu.py and kernels/embedding.py against their references
(llama.model's RMSNorm, apply_rope, F.silu(g) * u, index_select), and the model with the fused path on against the model with it off. The
kernels run in Triton's CPU interpreter:

    TRITON_INTERPRET=1 python -m pytest tests/test_kernels_fused.py

RoPE must equal the reference (forward and autograd) bit for bit: the kernel rounds where the
reference's separate ops round. RMSNorm must equal the reference's ops given the kernel's rstd, and
its rstd and gradients must lie within bounds derived from the roundings each path makes, measured
against float64. U is the unit roundoff of a dtype (half an ulp at 1: bf16 2^-8, fp16 2^-11, fp32 2^-24).
"""

import math
import os

import pytest
import torch

import kernels.common
import kernels.rmsnorm
import llama.model
from kernels.rmsnorm import rms_norm, rms_norm_forward
from kernels.embedding import gather_rows
from kernels.rope import apply_rope_qk
from kernels.swiglu import swiglu
from llama.model import Llama, LlamaConfig, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from qlora.lora import apply_lora, lora_layers

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
U = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
U32 = 2.0 ** -24
EPS = 1e-5
# fp32 rstd = rsqrt(sum(x^2) / N + eps): squares, a tree sum of N terms (about log2(N) u32 in the
# orders Triton, numpy and CUDA use), a division, the eps add and rsqrt (<= 2 ulp on CUDA):
# 1e-6 is about 17 u32. A wrong eps lands far outside it: the smallest rows have mean square 1e-6.
RSTD_RTOL = 1e-6

# Triton reads TRITON_INTERPRET when it is imported, so it must be set before Python starts.
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs Triton kernels on the CPU: needs TRITON_INTERPRET=1 set before Python starts "
           "(TRITON_INTERPRET=1 python -m pytest tests/test_kernels_fused.py)")


def assert_within(actual, expected, tol, what):
    """|actual - expected| <= tol elementwise (compared in float64); the message gives the worst ratio."""
    err = (actual.double() - expected.double()).abs()
    ratio = (err / tol.clamp_min(1e-300)).max().item()
    assert (err <= tol).all(), f"{what}: error reaches {ratio:.3g} x the bound (max error {err.max().item():.3g})"


def rows_of(shape, dtype, seed=0):
    """Random x of `shape`, each row (last dim) scaled by one of 1e-3 .. 10: small rows make eps matter."""
    gen = torch.Generator().manual_seed(seed)
    n_rows = math.prod(shape[:-1])
    scale = torch.logspace(-3, 1, n_rows).reshape(*shape[:-1], 1)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def norm_weight(n, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(n, generator=gen)).to(dtype)    # HF initialises to 1; random catches a skipped w


# ----------------------------------------------------------------------------- RMSNorm

SHAPES = [(3, 96), (2, 5, 200), (4, 4096)]


@interpreted
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("w_dtype", ["same", torch.float32], ids=["w_same", "w_fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_forward_rounds_like_reference(dtype, w_dtype, shape):
    N = shape[-1]
    x, norm = rows_of(shape, dtype), RMSNorm(N, EPS)
    norm.weight.data = norm_weight(N, dtype if w_dtype == "same" else w_dtype)
    y, rstd = rms_norm_forward(x.reshape(-1, N), norm.weight, EPS)            # (M, N), (M,)

    x64 = x.reshape(-1, N).double()
    rstd64 = torch.rsqrt(x64.pow(2).mean(-1) + EPS)                            # (M,)
    assert rstd.dtype == torch.float32
    assert_within(rstd, rstd64, RSTD_RTOL * rstd64, "rstd")
    # Given the kernel's rstd, the reference's ops give the same bits: normalise in fp32, round to
    # x's dtype, multiply by the weight in the promoted dtype.
    expected = norm.weight * (x.reshape(-1, N).float() * rstd[:, None]).to(dtype)
    assert y.dtype == expected.dtype and torch.equal(y, expected)

    # Against the module: rstd differs by <= RSTD_RTOL, so x * rstd rounded to x's dtype differs by
    # <= RSTD_RTOL + 2 U[x] relative (one rounding each side), and y by 2 U[y] more.
    out, ref = rms_norm(x, norm.weight, EPS), norm(x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    y64 = norm.weight.double() * x.double() * rstd64.view(*shape[:-1], 1)
    tol = (RSTD_RTOL + 2 * U[dtype] + 2 * U[ref.dtype]) * 1.01 * y64.abs()
    assert_within(out, ref, tol, "y vs module")


@interpreted
def test_rms_norm_output_dtype_follows_reference_under_autocast():
    # An fp32 weight times a bf16 row is fp32 in the reference, autocast or not (mul is on no autocast list).
    x, norm = rows_of((3, 96), torch.bfloat16), RMSNorm(96, EPS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = rms_norm(x, norm.weight, EPS), norm(x)
    assert out.dtype == ref.dtype == torch.float32
    assert_within(out, ref, (RSTD_RTOL + 4 * U[torch.bfloat16]) * ref.abs().double(), "y under autocast")


def rms_norm_grads(fn, x, weight, dy):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    return torch.autograd.grad(fn(x, weight), (x, weight), dy)


@interpreted
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_grads_match_float64(dtype, shape):
    N = shape[-1]
    M = math.prod(shape[:-1])
    x, w = rows_of(shape, dtype), norm_weight(N, dtype)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    norm = RMSNorm(N, EPS)
    module = lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,))   # noqa: E731
    gx, gw = rms_norm_grads(lambda x, w: rms_norm(x, w, EPS), x, w, dy)
    rx, rw = rms_norm_grads(module, x, w, dy)                                 # the reference in x's dtype
    gx64, gw64 = rms_norm_grads(module, x.double(), w.double(), dy.double())  # its math, unrounded
    assert gx.dtype == dtype and gw.dtype == dtype

    # Magnitudes before the cancellation in dx = rstd * (g - n * mean(g * n)), g = dy * w, n = x * rstd.
    x64, dy64, w64 = x.double(), dy.double(), w.double()
    rstd64 = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    n, g = x64 * rstd64, dy64 * w64
    scale = rstd64 * (g.abs() + n.abs() * (g * n).abs().mean(-1, keepdim=True))
    dw_scale = (dy64 * n).abs().reshape(M, N).sum(0)                           # sum of |terms| of dw
    u = U[dtype]
    # Kernel: fp32 from the rounded inputs, one rounding at the end. rstd's error (<= RSTD_RTOL) enters
    # dx about three times (through n twice and the factor rstd), the row sum adds ~log2(N) u32:
    # 5e-6 of scale covers both.
    assert_within(gx, gx64, u * gx64.abs() + 5e-6 * scale, "grad_x vs float64")
    # dw: M rows summed in fp32 (any order: <= M u32 of the sum of |terms|) of dy * n, n rounded to
    # x's dtype as the forward used it (U[x]).
    assert_within(gw, gw64, u * gw64.abs() + (u + RSTD_RTOL + M * U32) * dw_scale, "grad_w vs float64")
    # The reference's autograd rounds dy * w to x's dtype before its fp32 math (U[x] of scale more),
    # and each dy * n to y's dtype before the sum: the two lie within the sum of their bounds.
    assert_within(gx, rx, 2 * u * gx64.abs() + (u + 1e-5) * scale, "grad_x vs reference")
    assert_within(gw, rw, 2 * u * gw64.abs() + (3 * u + 2 * RSTD_RTOL + 2 * M * U32) * dw_scale, "grad_w vs reference")


@interpreted
@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_rms_norm_noncontiguous_input_equals_contiguous(layout):
    N, dtype = 200, torch.bfloat16
    if layout == "row_strided":                     # rows N + 24 apart: read in place
        x = rows_of((2, 7, N + 24), dtype)[..., :N]
    else:                                           # (T, B, C) transposed: no 2-D view, copied once
        x = rows_of((7, 2, N), dtype).transpose(0, 1)
    w, dy = norm_weight(N, dtype), torch.randn(x.shape).to(dtype)
    fn = lambda x, w: rms_norm(x, w, EPS)           # noqa: E731
    for got, want in zip(rms_norm_grads(fn, x, w, dy), rms_norm_grads(fn, x.contiguous(), w, dy)):
        assert torch.equal(got, want)
    assert torch.equal(fn(x, w), fn(x.contiguous(), w))
    if layout == "row_strided":
        y = fn(x.requires_grad_(), w)
        assert y.grad_fn.saved_tensors[0].data_ptr() == x.data_ptr()   # saved x is the input, not a copy


@interpreted
def test_rms_norm_frozen_weight_skips_its_gradient(monkeypatch):
    calls = []
    backward = kernels.rmsnorm.rms_norm_backward
    monkeypatch.setattr(kernels.rmsnorm, "rms_norm_backward",
                        lambda *args: calls.append(args[-1]) or backward(*args))
    x, w = rows_of((2, 3, 96), torch.bfloat16), norm_weight(96, torch.bfloat16)
    dy = torch.randn(x.shape).to(torch.bfloat16)
    (frozen_gx,) = torch.autograd.grad(rms_norm(x.requires_grad_(), w, EPS), x, dy)
    trained_gx, _ = rms_norm_grads(lambda x, w: rms_norm(x, w, EPS), x, w, dy)
    assert calls == [False, True]                    # compute_dw only when the weight wants a gradient
    assert torch.equal(frozen_gx, trained_gx)


# ----------------------------------------------------------------------------- RoPE

def projection_views(B, H, T, hd, dtype, seed):
    """(B, H, T, hd) as Attention makes it: a (B, T, H * hd) projection viewed and transposed."""
    x = torch.randn(B, T, H * hd, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.view(B, T, H, hd).transpose(1, 2)


def cos_sin(kind, T, hd, dtype):
    """'hf': the model's tables (equal halves), at positions 3..T+2. 'random': halves differ, which
    catches a kernel that takes c1 for c2 or s1 for s2."""
    if kind == "hf":
        return rope_cos_sin(rope_inv_freq(LlamaConfig(hidden_size=4 * hd, num_attention_heads=4)),
                            torch.arange(T) + 3, dtype)
    gen = torch.Generator().manual_seed(7)
    return torch.randn(T, hd, generator=gen).to(dtype), torch.randn(T, hd, generator=gen).to(dtype)


def rope_bound(x, cos, sin, u, transpose=False):
    """2.01 u (|x cos| + |R x sin|) in float64, R = rotate_half (R^T for the backward, applied after
    the product): out = round(round(a) + round(b)) is within u|a| + u|b| + u|a + b| (1 + u) of a + b."""
    x, cos, sin = x.double(), cos.double(), sin.double()
    if transpose:
        s1, s2 = (x * sin).chunk(2, dim=-1)
        rotated = torch.cat([s2, -s1], dim=-1)
    else:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1) * sin
    return 2.01 * u * ((x * cos).abs() + rotated.abs())


ROPE_CASES = [(2, 4, 2, 7, 64, "hf"), (1, 6, 3, 5, 96, "random"), (3, 3, 1, 1, 10, "random")]


@interpreted
@pytest.mark.parametrize("B, HQ, HK, T, hd, kind", ROPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_equals_reference_bit_for_bit(dtype, B, HQ, HK, T, hd, kind):
    q, k = projection_views(B, HQ, T, hd, dtype, 0), projection_views(B, HK, T, hd, dtype, 1)
    cos, sin = cos_sin(kind, T, hd, dtype)
    gq, gk = projection_views(B, HQ, T, hd, dtype, 2), projection_views(B, HK, T, hd, dtype, 3)

    def run(fn, q, k):
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        q_out, k_out = fn(q, k)
        return (q_out, k_out, *torch.autograd.grad((q_out, k_out), (q, k), (gq.to(q.dtype), gk.to(k.dtype))))

    ours = run(lambda q, k: apply_rope_qk(q, k, cos, sin), q, k)
    ref = run(lambda q, k: (apply_rope(q, cos, sin), apply_rope(k, cos, sin)), q, k)
    for name, got, want in zip(["q", "k", "grad_q", "grad_k"], ours, ref):
        assert got.dtype == want.dtype and torch.equal(got, want), name

    c64, s64 = cos.double(), sin.double()
    ref64 = run(lambda q, k: (apply_rope(q, c64, s64), apply_rope(k, c64, s64)), q.double(), k.double())
    bounds = [rope_bound(q, cos, sin, U[dtype]), rope_bound(k, cos, sin, U[dtype]),
              rope_bound(gq, cos, sin, U[dtype], transpose=True), rope_bound(gk, cos, sin, U[dtype], transpose=True)]
    for name, got, want, tol in zip(["q", "k", "grad_q", "grad_k"], ours, ref64, bounds):
        assert_within(got, want, tol, f"{name} vs float64")


@interpreted
def test_rope_layouts_single_tensor_and_strided_grads():
    B, H, T, hd, dtype = 2, 3, 5, 32, torch.bfloat16
    cos, sin = cos_sin("random", T, hd, dtype)
    # A contiguous (B, H, T, hd) tensor, no k; the upstream gradient with stride 2 along head_dim.
    x = torch.randn(B, H, T, hd).to(dtype).requires_grad_()
    g = torch.randn(B, H, T, 2 * hd).to(dtype)[..., ::2]
    out, none = apply_rope_qk(x, None, cos, sin)
    assert none is None and out.stride() == x.stride() and torch.equal(out, apply_rope(x, cos, sin))
    (got,) = torch.autograd.grad(out, x, g)
    (want,) = torch.autograd.grad(apply_rope(x, cos, sin), x, g)
    assert torch.equal(got, want)
    # The projection view: its gradient comes back in the same layout (free reshape to (B, T, H * hd)),
    # also from an expanded (stride 0) upstream gradient.
    q = projection_views(B, H, T, hd, dtype, 0).requires_grad_()
    g = torch.randn(1, H, T, hd).to(dtype).expand(B, H, T, hd)
    (got,) = torch.autograd.grad(apply_rope_qk(q, None, cos, sin)[0], q, g)
    (want,) = torch.autograd.grad(apply_rope(q, cos, sin), q, g)
    assert got.stride() == q.stride() and torch.equal(got, want)


def test_rope_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="share one dtype"):
        apply_rope_qk(q, None, cos.half(), sin.half())
    with pytest.raises(ValueError, match=r"\(T, head_dim\)"):
        apply_rope_qk(q, None, cos[None], sin[None])
    with pytest.raises(ValueError, match="share batch"):
        apply_rope_qk(q, torch.randn(1, 2, 4, 8), cos, sin)


# ----------------------------------------------------------------------------- SwiGLU

# fp32 exp, sigmoid and silu: the interpreter's numpy and CUDA's fast exp are within ~1e-6 relative
# for the |g| <= 40 used here (the exponent's argument is rounded, and ex2.approx adds a few ulp).
EXP_RTOL = 1e-6


def swiglu_inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen) * 4
    g.view(-1)[:8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 40.0, -40.0, 1e-3, -1e-3])   # saturation, zero
    u, dy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return g.to(dtype), u.to(dtype), dy.to(dtype)


def swiglu_grads(fn, g, u, dy):
    g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
    y = fn(g, u)
    return (y, *torch.autograd.grad(y, (g, u), dy))


@interpreted
@pytest.mark.parametrize("shape", [(11,), (3, 7, 130), (2, 1030)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_forward_and_grads_within_rounding_of_float64(dtype, shape):
    g, u, dy = swiglu_inputs(shape, dtype, seed=sum(shape))
    ours = swiglu_grads(swiglu, g, u, dy)
    ref = swiglu_grads(lambda g, u: torch.nn.functional.silu(g) * u, g, u, dy)
    g64, u64, dy64 = g.double(), u.double(), dy.double()
    sig = torch.sigmoid(g64)
    s = g64 * sig                                                   # silu
    d = sig * (1 + g64 * (1 - sig))                                 # silu'
    exact = [s * u64, dy64 * u64 * d, dy64 * s]                     # y, grad_g, grad_u
    uu = U[dtype]
    floor = torch.finfo(dtype).smallest_normal * uu                 # fp16 results can be subnormal
    # y and grad_u: silu in fp32 (EXP_RTOL), rounded; a product, rounded: 2 roundings.
    # grad_g: dy * u rounded, times silu' in fp32 (sigmoid's EXP_RTOL enters through sig, 1 - sig and
    # g (1 - sig): 3 EXP_RTOL of sig (1 + 2|g|) bounds them), rounded once more.
    bounds = [(EXP_RTOL + 2.01 * uu) * exact[0].abs() + floor,
              2.01 * uu * exact[1].abs() + 3 * EXP_RTOL * (dy64 * u64).abs() * sig * (1 + 2 * g64.abs()) + floor,
              (EXP_RTOL + 2.01 * uu) * exact[2].abs() + floor]
    for name, got, want, e, tol in zip(["y", "grad_g", "grad_u"], ours, ref, exact, bounds):
        assert got.dtype == dtype and got.shape == g.shape
        assert_within(got, e, tol, f"{name} vs float64")
        assert_within(got, want, 2 * tol, f"{name} vs F.silu(g) * u")   # the reference is within tol too


def test_swiglu_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3).half())


# ----------------------------------------------------------------------------- the model

def tiny_lora_llama(dtype, lora_dtype):
    """A random 2-layer Llama (hidden 96, GQA, head_dim 24) in `dtype` with LoRA (r=4) on every
    linear layer in `lora_dtype`; the same weights for every call."""
    config = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=120, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=EPS)
    torch.manual_seed(0)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            p.data = p.data.to(dtype)
    torch.manual_seed(1)
    apply_lora(model, "all-linear", r=4, alpha=8, verbose=False)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.normal_(0, 0.1, generator=gen)       # B = 0 would leave every A gradient 0
            layer.lora_a.data, layer.lora_b.data = layer.lora_a.data.to(lora_dtype), layer.lora_b.data.to(lora_dtype)
    model.gradient_checkpointing = True                      # as in training: the recompute runs the kernels too
    return model


def logits_and_lora_grads(model, ids, weights):
    logits = model(ids)
    loss = (logits.double() * weights).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return [logits.detach(), *torch.autograd.grad(loss, params)]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_with_fused_norm_rope_matches_reference_path(dtype, monkeypatch):
    calls = {"norm": 0, "rope": 0, "swiglu": 0}

    def spy(key, fn):
        def wrapped(*args):
            calls[key] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(llama.model, "rms_norm", spy("norm", llama.model.rms_norm))
    monkeypatch.setattr(llama.model, "apply_rope_qk", spy("rope", llama.model.apply_rope_qk))
    monkeypatch.setattr(llama.model, "swiglu", spy("swiglu", llama.model.swiglu))
    gen = torch.Generator().manual_seed(3)
    ids, weights = torch.randint(0, 64, (2, 7), generator=gen), torch.randn(2, 7, 64, generator=gen, dtype=torch.float64)
    model = tiny_lora_llama(dtype, torch.float32)
    exact = logits_and_lora_grads(tiny_lora_llama(torch.float64, torch.float64), ids, weights)

    monkeypatch.setattr(kernels.common, "KERNELS", "0")
    off = logits_and_lora_grads(model, ids, weights)
    assert calls == {"norm": 0, "rope": 0, "swiglu": 0}
    monkeypatch.setattr(kernels.common, "KERNELS", "1")
    on = logits_and_lora_grads(model, ids, weights)
    assert calls["norm"] > 0 and calls["rope"] > 0 and calls["swiglu"] > 0

    # The fused path rounds where the reference path does or less often (RoPE: the same roundings;
    # RMSNorm: the same forward up to the order of the fp32 sum, one rounding fewer backward), so its
    # error against float64 may exceed the reference path's only by rounding noise. Measured as the
    # relative L2 error of the logits and the RMS of the LoRA gradients' relative L2 errors, that
    # noise averages out: on / off ratios were 0.97-1.10 over three seeds in fp32 and bf16, so allow
    # 1.25. A wrong kernel is off by the size of the values (a dropped term or sign: ratios over 10
    # in bf16, over 10^5 in fp32).
    def rel_err(tensors):
        errs = [((t.double() - e).norm() / e.norm()).item() for t, e in zip(tensors, exact)]
        return errs[0], math.sqrt(sum(err ** 2 for err in errs[1:]) / len(errs[1:]))

    for what, err_on, err_off in zip(["logits", "LoRA grads"], rel_err(on), rel_err(off)):
        assert err_on <= 1.25 * err_off, f"{what}: relative error {err_on:.3g} vs reference path {err_off:.3g}"


@interpreted
@pytest.mark.parametrize("vocab, C, ids_shape", [(37, 50, (3, 7)), (5, 1030, (1, 1)), (128, 64, (2, 0)),
                                                 (300, 2049, (2, 5))], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gather_rows_equals_index_select(dtype, vocab, C, ids_shape):
    # embeddings_on_host's lookup (the GPU reads the looked-up rows of a pinned host table): a copy,
    # so bit for bit; odd widths cross the 1024-wide column blocks, repeated ids included.
    g = torch.Generator().manual_seed(vocab + C)
    table = torch.randn(vocab, C, generator=g).to(dtype)
    ids = torch.randint(0, vocab, ids_shape, generator=g)
    if ids.numel() > 1:
        ids.view(-1)[-1] = ids.view(-1)[0]
    out = torch.full((ids.numel(), C), float("nan"), dtype=dtype)
    assert torch.equal(gather_rows(table, ids.reshape(-1), out), torch.index_select(table, 0, ids.reshape(-1)))


@interpreted
def test_gather_rows_reads_nothing_outside_the_table():
    table = torch.arange(12.0).view(4, 3)
    out = gather_rows(table, torch.tensor([1, -1, 4, 3]), torch.empty(4, 3))
    assert torch.equal(out, torch.tensor([[3.0, 4, 5], [0, 0, 0], [0, 0, 0], [9, 10, 11]]))

