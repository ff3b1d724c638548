"""LoRALinear.forward (LoRAFunction: one autograd node, hand-written backward) against its textbook
form LoRALinear.reference_forward (x W^T + s * dropout(x) A^T B^T as plain autograd ops), forward
and gradients, with the same dropout mask (the same seed). In float64 they agree to float64 rounding;
in fp32, on an NF4 base too, to fp32 rounding."""

import pytest
import torch
import torch.nn as nn

from qlora.linear4bit import Linear4bit
from qlora.lora import LoRALinear


def layer(base_kind: str, dtype: torch.dtype, p: float) -> LoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=True).to(dtype)
    if base_kind == "nf4":
        base = Linear4bit.from_linear(base, compute_dtype=dtype)
    lora = LoRALinear(base, r=4, alpha=8, dropout=p)
    with torch.no_grad():
        lora.lora_b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))   # B = 0 hides A's gradient
    return lora.train()


def output_and_grads(forward, lora: LoRALinear, x: torch.Tensor, seed: int = 7):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)                          # the same dropout mask on both paths
    out = forward(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), [x, lora.lora_a, lora.lora_b])
    return [out.detach(), *grads]


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("base_kind, dtype", [("linear", torch.float64), ("linear", torch.float32),
                                              ("nf4", torch.float32)])
def test_fused_forward_and_backward_equal_the_textbook_form(base_kind, dtype, p):
    lora = layer(base_kind, dtype, p)
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3), dtype=dtype)
    fused = output_and_grads(lora, lora, x)
    reference = output_and_grads(lora.reference_forward, lora, x)
    for name, got, want in zip(["output", "grad x", "grad A", "grad B"], fused, reference):
        torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")
    if p:                                            # the dropout really dropped something
        torch.manual_seed(7)
        assert not torch.equal(lora.dropout(x), x)
