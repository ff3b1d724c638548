"""Layers that read one input as one node (qlora.lora.shared_input_forward, SharedInputLoRAFunction):
with dropout 0 the result is PEFT's (a tiny Llama, loss and every LoRA gradient); with a shared mask it
is the textbook formula with one dropout of x, computed in float64 (the Triton dropout-gradient kernel
runs here under TRITON_INTERPRET=1 on fp32); without lora_shared_dropout each layer draws its own mask."""

import copy

import pytest
import torch
import torch.nn as nn

from qlora.adapter import save_adapter
from qlora.linear4bit import Linear4bit
from qlora.lora import LoRALinear, SharedInputLoRAFunction, apply_lora, lora_layers, share_dropout, shared_input_forward
from qlora.loss import causal_lm_loss

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import PeftModel  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402


def lora_group(outs=(24, 8, 8), d_in=40, r=(4, 4, 2), alpha=8, dropout=0.2, base_4bit=False, seed=0):
    torch.manual_seed(seed)
    layers = []
    for out, rank in zip(outs, r):
        base = nn.Linear(d_in, out, bias=False)
        if base_4bit:
            base = Linear4bit.from_linear(base, compute_dtype=torch.float32)
        layer = LoRALinear(base, r=rank, alpha=alpha, dropout=dropout)
        with torch.no_grad():
            layer.lora_b.normal_()
        layers.append(layer.train())
    return layers


def reference_outputs(layers, x, seed):
    """The layers in float64 with one dropout mask of x (drawn as forward draws it, same seed)."""
    p = layers[0].dropout_p
    torch.manual_seed(seed)
    xd = torch.nn.functional.dropout(x, p, training=True) if p > 0 else x
    outs, params = [], []
    for layer in layers:
        w = (layer.base.dequantize(torch.float64) if isinstance(layer.base, Linear4bit)
             else layer.base.weight.detach().double())
        a, b = (t.detach().double().requires_grad_() for t in (layer.lora_a, layer.lora_b))
        outs.append(x @ w.T + layer.scaling * (xd @ a.T) @ b.T)
        params.append((a, b))
    return outs, params


@pytest.mark.parametrize("base_4bit", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_shared_mask_matches_float64_formula(base_4bit, dropout):
    layers = lora_group(dropout=dropout, base_4bit=base_4bit)
    share_dropout(nn.ModuleList(layers), True)
    x = torch.randn(3, 5, 40)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    torch.manual_seed(11)
    outs = shared_input_forward(layers, x32)
    want, params = reference_outputs(layers, x64, seed=11)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(want, [g.double() for g in grads])
    for got, w in zip(outs, want):
        torch.testing.assert_close(got.double(), w.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    for layer, (a, b) in zip(layers, params):
        torch.testing.assert_close(layer.lora_a.grad.double(), a.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.lora_b.grad.double(), b.grad, rtol=1e-5, atol=1e-5)
    if dropout:        # the check can fail: with another mask the formula gives other numbers
        other, _ = reference_outputs(layers, x64.detach(), seed=12)
        assert not torch.allclose(other[1], want[1].detach(), rtol=1e-3, atol=1e-3)


def test_without_shared_dropout_each_layer_draws_its_own_mask():
    layers = lora_group(dropout=0.3)
    x = torch.randn(4, 40)
    torch.manual_seed(5)
    grouped = shared_input_forward(layers, x)
    torch.manual_seed(5)
    one_by_one = [layer(x) for layer in layers]         # PEFT's semantics, LoRAFunction per layer
    for g, o in zip(grouped, one_by_one):
        assert torch.equal(g, o)


def test_grouping_only_where_semantics_allow(monkeypatch):
    calls = []
    monkeypatch.setattr(SharedInputLoRAFunction, "apply",
                        staticmethod(lambda *args: calls.append(1) or tuple(torch.zeros(1) for _ in range(3))))
    x = torch.randn(2, 40)
    layers = lora_group(dropout=0.3)
    shared_input_forward(layers, x)                     # p > 0, masks not shared: one by one
    assert calls == []
    for layer in layers:
        layer.eval()                                    # p = 0 in eval: one node
    shared_input_forward(layers, x)
    assert calls == [1]
    plain = [nn.Linear(40, 8), *lora_group(dropout=0.0)[1:]]
    assert len(shared_input_forward(plain, x)) == 3 and calls == [1]   # a bare linear: one by one


def peft_pair(ckpt, tmp_path):
    """Ours (fp32, LoRA r 4 on all linears, random B, dropout 0) and PEFT on transformers with the same adapter."""
    from llama.load import load_llama
    ours = apply_lora(load_llama(ckpt, dtype=torch.float32), "all-linear", r=4, alpha=8, dropout=0.0, verbose=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(ckpt))
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(ckpt), tmp_path / "adapter", is_trainable=True)
    return ours.train(), ref.train()


@pytest.mark.parametrize("variant", ["gqa", "mha"])
def test_grouped_llama_matches_peft_loss_and_gradients(tiny_llama, tmp_path, variant):
    ours, ref = peft_pair(tiny_llama(variant), tmp_path)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    loss = causal_lm_loss(ours(ids, return_hidden=True), ours.lm_head.weight, ids)
    ref_loss = ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward(), ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for name, layer in lora_layers(ours).items():
        for ours_p, peft_name in [(layer.lora_a, "lora_A"), (layer.lora_b, "lora_B")]:
            want = ref_grads[f"base_model.model.{name}.{peft_name}.default.weight"]
            torch.testing.assert_close(ours_p.grad, want, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_group_under_bf16_autocast_is_close_to_one_by_one():
    # The bf16 path (autocast, as QLoRA trains): the grouped node against the same layers one by one
    # at p = 0, where both compute the same formula; bf16 rounding of different product shapes only.
    layers = lora_group(dropout=0.0, base_4bit=True)
    copies = copy.deepcopy(layers)
    x = torch.randn(6, 40)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped = shared_input_forward(layers, xs[0])
        single = [LoRALinear.forward(layer, xs[1]) for layer in copies]
    assert all(o.dtype == torch.bfloat16 for o in grouped)
    grads = [torch.randn_like(o) for o in grouped]
    torch.autograd.backward(grouped, grads), torch.autograd.backward(single, grads)
    for g, s in zip(grouped, single):
        torch.testing.assert_close(g, s, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=2e-2, atol=2e-2)
    for a, b in zip(layers, copies):
        assert a.lora_a.grad.dtype == torch.float32
        torch.testing.assert_close(a.lora_a.grad, b.lora_a.grad, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(a.lora_b.grad, b.lora_b.grad, rtol=2e-2, atol=2e-2)
