"""The fused block kernels on the GPU at Llama-2-7B training shapes (issue #8), each against its
PyTorch reference: the relative L2 error of both against float64, the share of elements equal to
the reference bit for bit, and the median time (triton.testing.do_bench) of forward and of
forward + backward:

    python -m bench.fused_kernels        # CUDA only; the CPU tests are tests/test_kernels_fused.py

RMSNorm and RoPE on (2, 2048, 4096) bf16, SwiGLU on (2, 2048, 11008), and the LoRA input gradient
through dropout (kernels/lora_grad.py) for 4096 rows, r = 32, in = 4096 and 11008.
"""

import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import llama.model as m
from kernels.lora_grad import lora_dropout_grad_
from kernels.rmsnorm import rms_norm
from kernels.rope import apply_rope_qk
from kernels.swiglu import swiglu

DEVICE = "cuda"


def with_grads(fn, inputs, grads):
    """fn(*inputs) and the gradients of its outputs (grads) with respect to inputs."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return (*outs, *torch.autograd.grad(outs, inputs, grads))


def us(fn) -> float:
    return 1e3 * do_bench(fn, return_mode="median")


def compare(name, fused, reference, inputs, grads, labels):
    """Print errors vs float64 and timings for one kernel and its reference."""
    ours, ref = with_grads(fused, inputs, grads), with_grads(reference, inputs, grads)
    exact = with_grads(reference, [t.double() for t in inputs], [g.double() for g in grads])
    for label, o, r, e in zip(labels, ours, ref, exact):
        rel = lambda t: ((t.double() - e).norm() / e.norm()).item()   # noqa: E731
        print(f"{name} {label}: rel. error fused {rel(o):.3e}, reference {rel(r):.3e}; "
              f"equal to the reference {(o == r).float().mean().item():.4f}")
    for side, fn in [("fused", fused), ("reference", reference)]:
        print(f"{name} {side}: forward {us(lambda: fn(*inputs)):.1f} us, "
              f"forward + backward {us(lambda: with_grads(fn, inputs, grads)):.1f} us")


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.fused_kernels needs a CUDA device")
        return 1
    torch.manual_seed(0)
    bf16 = dict(device=DEVICE, dtype=torch.bfloat16)

    # RMSNorm: rows scaled 1e-3 .. 10, so eps matters for the small ones.
    x = torch.randn(2, 2048, 4096, **bf16) * torch.logspace(-3, 1, 2048, device=DEVICE)[:, None].bfloat16()
    w = (0.5 + torch.rand(4096, device=DEVICE)).bfloat16()
    norm = m.RMSNorm(4096, 1e-5).to(DEVICE)
    compare("rmsnorm", lambda x, w: rms_norm(x, w, 1e-5),
            lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)),
            [x, w], [torch.randn_like(x)], ["y", "grad_x", "grad_w"])

    # RoPE on q and k as Attention makes them: (B, T, H * hd) projections viewed as (B, H, T, hd).
    B, T, H, hd = 2, 2048, 32, 128
    cos, sin = m.rope_cos_sin(m.rope_inv_freq(m.LlamaConfig()).to(DEVICE), torch.arange(T, device=DEVICE),
                              torch.bfloat16)
    proj = lambda: torch.randn(B, T, H * hd, **bf16).view(B, T, H, hd).transpose(1, 2)   # noqa: E731
    compare("rope", lambda q, k: apply_rope_qk(q, k, cos, sin),
            lambda q, k: (m.apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)), m.apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))),
            [proj(), proj()], [proj(), proj()], ["q", "k", "grad_q", "grad_k"])

    # SwiGLU on the MLP's (tokens, intermediate) gate and up.
    g = torch.randn(2, 2048, 11008, **bf16) * 4
    compare("swiglu", swiglu, lambda g, u: F.silu(g) * u, [g, torch.randn_like(g)], [torch.randn_like(g)],
            ["y", "grad_g", "grad_u"])

    # The LoRA input gradient through dropout (p = 0.05): in place into grad_x, so no autograd here.
    for n in (4096, 11008):
        gx, gh = torch.randn(4096, n, **bf16), torch.randn(4096, 32, **bf16)
        a, keep = torch.randn(32, n, **bf16), torch.rand(4096, n, device=DEVICE) > 0.05
        ours = lora_dropout_grad_(gx.clone(), gh, a, keep, 1 / 0.95)
        ref = gx.clone().addcmul_(gh @ a, keep, value=1 / 0.95)
        exact = gx.double() + (gh.double() @ a.double()) * keep / 0.95
        rel = lambda t: ((t.double() - exact).norm() / exact.norm()).item()   # noqa: E731
        print(f"lora grad in={n}: rel. error fused {rel(ours):.3e}, reference {rel(ref):.3e}; equal to the "
              f"reference {(ours == ref).float().mean().item():.4f}; fused {us(lambda: lora_dropout_grad_(gx, gh, a, keep, 1.0)):.1f} us, "
              f"reference {us(lambda: gx.addcmul_(gh @ a, keep, value=1.0)):.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
