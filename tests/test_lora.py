"""LoRALinear, apply_lora, merging and adapter files, checked against peft 0.21, transformers'
LlamaForCausalLM and bitsandbytes (CPU). Tiny shapes, fp32, so results agree to fp32 rounding."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from qlora import adapter as lora_mod
from qlora.linear4bit import Linear4bit
from qlora.adapter import load_adapter, merged_state_dict, save_adapter, save_merged
from qlora.lora import LoRALinear, apply_lora, count_parameters, trainable_summary

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(layers=2, hidden=32) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=56, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def hf_llama(seed=0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


def quantize_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear but lm_head by an NF4 Linear4bit with fp32 compute."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, Linear4bit.from_linear(m, compute_dtype=torch.float32))
    return model


def randomize_lora_b(model: nn.Module, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_mod.lora_layers(model).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)


def randomize_peft_b(model: nn.Module, seed=1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def tokens(seed=0, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


class OneProj(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def peft_layer(base: nn.Linear, r, alpha, use_rslora=False, dropout=0.0):
    model = get_peft_model(OneProj(copy.deepcopy(base)), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                                                     use_rslora=use_rslora, lora_dropout=dropout))
    return model, model.base_model.model.proj


def paired_layers(base: nn.Linear, r, alpha, use_rslora=False, dropout=0.0):
    """PEFT's layer (model, layer) and ours on copies of base, with the same A and a random B."""
    model, ref = peft_layer(base, r, alpha, use_rslora, dropout)
    ours = LoRALinear(copy.deepcopy(base), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    with torch.no_grad():
        ref.lora_B["default"].weight.normal_()
        ours.lora_a.copy_(ref.lora_A["default"].weight)
        ours.lora_b.copy_(ref.lora_B["default"].weight)
    return model, ref, ours


# ----------------------------------------------------------------------------- the layer vs PEFT

def forward_backward_both(model, ref, ours, x, x_needs_grad=True):
    """x through our layer and PEFT's model (one seed before each: the same dropout mask), then the
    same random output gradient back; asserts outputs and A / B gradients agree. Returns both inputs
    (for their gradients) and the output gradient."""
    x_ours, x_ref = x.clone().requires_grad_(x_needs_grad), x.clone().requires_grad_(x_needs_grad)
    torch.manual_seed(7)
    y_ours = ours(x_ours)
    torch.manual_seed(7)
    y_ref = model(x_ref)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-6, atol=1e-6)
    grad_out = torch.randn_like(y_ref)
    y_ours.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(ours.lora_a.grad, ref.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.lora_b.grad, ref.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
    return x_ours, x_ref, grad_out


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_peft_lora_layer(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True)
    model, ref, ours = paired_layers(base, r=4, alpha=8, use_rslora=use_rslora)
    assert ours.scaling == ref.scaling["default"] == (8 / 2 if use_rslora else 8 / 4)

    x_ours, x_ref, _ = forward_backward_both(model, ref, ours, torch.randn(3, 5, 24))
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert ours.base.weight.grad is None and ours.base.bias.grad is None


@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_dropout_forward_and_grads_match_peft_under_the_same_seed(x_needs_grad):
    # LoRAFunction writes dropout's backward itself (mask / (1 - p) on the adapter's input gradient);
    # PEFT runs nn.Dropout under autograd. The same seed draws the same mask on both sides.
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True)
    model, ref, ours = paired_layers(base, r=4, alpha=8, dropout=0.4)
    model.train(), ours.train()
    x = torch.randn(3, 5, 24)
    x_ours, x_ref, grad_out = forward_backward_both(model, ref, ours, x, x_needs_grad)
    if x_needs_grad:
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        # The mask matters: without dropout the input gradient differs.
        ours.eval()
        x_plain = x.clone().requires_grad_()
        ours(x_plain).backward(grad_out)
        assert not torch.allclose(x_plain.grad, x_ours.grad, rtol=1e-3, atol=1e-3)
    else:
        assert x_ours.grad is None
    # eval() turns dropout off, as in PEFT.
    ours.eval(), model.eval()
    torch.testing.assert_close(ours(x), model(x), rtol=1e-6, atol=1e-6)


def test_fp32_weights_under_bf16_autocast_match_float64():
    # Autocast decides the compute dtype (bf16) although x and the weights are fp32; backward, which
    # runs outside autocast, must then work in bf16 too and hand fp32 gradients back.
    torch.manual_seed(0)
    ours = LoRALinear(nn.Linear(64, 32, bias=False), r=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        ours.lora_b.normal_()
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    assert y.dtype == torch.bfloat16
    grad_out = torch.randn(4, 32)
    y.backward(grad_out.bfloat16())
    assert x.grad.dtype == ours.lora_a.grad.dtype == ours.lora_b.grad.dtype == torch.float32
    w, a, b = (t.detach().double() for t in (ours.base.weight, ours.lora_a, ours.lora_b))
    x64, g64 = x.detach().double().requires_grad_(), grad_out.bfloat16().double()
    a64, b64 = a.clone().requires_grad_(), b.clone().requires_grad_()
    y64 = x64 @ w.T + 2.0 * (x64 @ a64.T) @ b64.T
    y64.backward(g64)
    # bf16 inputs and outputs: a few units of 2^-8 relative to the magnitudes involved.
    torch.testing.assert_close(y.double(), y64.detach(), rtol=3e-2, atol=5e-2)
    for got, want in [(x.grad, x64.grad), (ours.lora_a.grad, a64.grad), (ours.lora_b.grad, b64.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_init_matches_peft_under_same_seed():
    base = nn.Linear(24, 40)
    _, ref = peft_layer(base, r=8, alpha=16)
    torch.manual_seed(123)
    ref.reset_lora_parameters("default", True)          # PEFT's own init of A (Kaiming) and B (zeros)
    torch.manual_seed(123)
    ours = LoRALinear(base, r=8, alpha=16)
    assert torch.equal(ours.lora_a, ref.lora_A["default"].weight)
    assert torch.equal(ours.lora_b, ref.lora_B["default"].weight) and not ours.lora_b.any()


def test_4bit_base_matches_peft_on_bitsandbytes_dequantized_weight():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=False)
    ours = LoRALinear(Linear4bit.from_linear(dense, compute_dtype=torch.float32), r=4, alpha=4)
    # Reference base weight: bitsandbytes' own NF4 round trip of the same weight.
    packed, state = bnb_f.quantize_4bit(dense.weight.data, blocksize=64, quant_type="nf4", compress_statistics=True)
    ref_base = nn.Linear(64, 48, bias=False)
    ref_base.weight.data = bnb_f.dequantize_4bit(packed, state)
    model, ref = peft_layer(ref_base, r=4, alpha=4)
    with torch.no_grad():
        ours.lora_b.normal_()
        ref.lora_A["default"].weight.copy_(ours.lora_a)
        ref.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(2, 3, 64)
    y_ours, y_ref = ours(x), model(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    y_ours.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(ours.lora_a.grad, ref.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.lora_b.grad, ref.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-5)
    # The 4-bit base holds no trainable tensor and gets no gradient.
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]
    assert all(p.grad is None for p in ours.base.parameters())


def test_bf16_compute_with_fp32_adapter_matches_float64():
    torch.manual_seed(0)
    dense = nn.Linear(64, 32, bias=False)
    ours = LoRALinear(Linear4bit.from_linear(dense, compute_dtype=torch.bfloat16), r=8, alpha=16)
    with torch.no_grad():
        ours.lora_b.normal_()
    x = torch.randn(4, 64).bfloat16()
    y = ours(x)
    assert y.dtype == torch.bfloat16
    w = ours.base.dequantize(torch.float64)
    a, b = ours.lora_a.double(), ours.lora_b.double()
    expected = x.double() @ w.T + 2.0 * (x.double() @ a.T) @ b.T
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=5e-2)   # bf16 rounding
    y.float().sum().backward()
    assert ours.lora_a.grad.dtype == torch.float32 and ours.lora_b.grad.dtype == torch.float32


def test_bf16_adapter_storage():
    layer = LoRALinear(nn.Linear(16, 8), r=2, alpha=4, dtype=torch.bfloat16)
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.bfloat16
    assert layer(torch.randn(3, 16)).dtype == torch.float32


# ----------------------------------------------------------------------------- merge

def original_linear(weight, bias):
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.weight.data, linear.bias.data = weight.clone(), bias.detach().clone()
    return linear


def test_merge_unmerge_matches_peft_and_restores_base():
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    original = base.weight.detach().clone()
    ours = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        ours.lora_b.normal_()
    model, ref = peft_layer(original_linear(original, base.bias), r=4, alpha=8)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(ours.lora_a)
        ref.lora_B["default"].weight.copy_(ours.lora_b)
    x = torch.randn(6, 24)
    before = ours(x)
    ours.merge()
    ref.merge()
    torch.testing.assert_close(ours.base.weight, ref.base_layer.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="merged already"):
        ours.merge()
    ours.unmerge()
    torch.testing.assert_close(ours.base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)


def test_merge_into_4bit_base_is_refused():
    layer = LoRALinear(Linear4bit.from_linear(nn.Linear(64, 16)), r=2, alpha=2)
    with pytest.raises(ValueError, match="merged_state_dict"):
        layer.merge()


# ----------------------------------------------------------------------------- apply_lora

@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_apply_lora_summary_and_frozen_params_match_peft(targets, capsys):
    ours = apply_lora(hf_llama(), targets, r=4, alpha=8)
    line = capsys.readouterr().out.strip()
    ref = get_peft_model(hf_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    ref.print_trainable_parameters()
    assert line == capsys.readouterr().out.strip() == trainable_summary(ours)
    ours_trainable = {n.replace(".lora_a", ".lora_A.default.weight").replace(".lora_b", ".lora_B.default.weight")
                      for n, p in ours.named_parameters() if p.requires_grad}
    ref_trainable = {n.removeprefix("base_model.model.") for n, p in ref.named_parameters() if p.requires_grad}
    assert ours_trainable == ref_trainable
    if targets == "all-linear":
        assert not isinstance(ours.lm_head, LoRALinear)


def test_4bit_weights_count_as_out_times_in_and_get_no_grad():
    dense = apply_lora(hf_llama(), "all-linear", r=4, alpha=8, verbose=False)
    quant = apply_lora(quantize_linears(hf_llama()), "all-linear", r=4, alpha=8, verbose=False)
    assert count_parameters(quant) == count_parameters(dense)
    randomize_lora_b(quant)
    quant(tokens()).logits.square().mean().backward()
    for name, p in quant.named_parameters():
        is_lora = name.endswith(("lora_a", "lora_b"))
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name


# ----------------------------------------------------------------------------- adapter files

def test_our_adapter_loads_in_peft_with_same_logits(tmp_path):
    ours = apply_lora(hf_llama(), ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], r=4, alpha=16,
                      dropout=0.1, use_rslora=True, verbose=False)
    randomize_lora_b(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "tiny-llama" and config["use_rslora"] is True
    ref = PeftModel.from_pretrained(hf_llama(), tmp_path / "adapter").eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours(ids).logits, hf_llama()(ids).logits, atol=1e-3)  # B is non-zero


@pytest.mark.parametrize("targets,use_rslora", [(["q_proj", "v_proj", "up_proj"], False), ("all-linear", True)])
def test_peft_adapter_loads_in_ours_with_same_logits(tmp_path, targets, use_rslora):
    torch.manual_seed(5)
    ref = get_peft_model(hf_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                  use_rslora=use_rslora, task_type="CAUSAL_LM"))
    randomize_peft_b(ref)
    ref.save_pretrained(tmp_path / "peft")
    ours = load_adapter(hf_llama(), tmp_path / "peft")
    ids = tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(lora_mod.lora_layers(ours)) == (6 if targets != "all-linear" else 14)


def test_adapter_round_trip_on_4bit_base(tmp_path):
    ours = apply_lora(quantize_linears(hf_llama()), "all-linear", r=4, alpha=8, verbose=False)
    randomize_lora_b(ours)
    save_adapter(ours, tmp_path / "a")
    again = load_adapter(quantize_linears(hf_llama()), tmp_path / "a")
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, again(ids).logits)


# ----------------------------------------------------------------------------- merged export

def test_merged_export_loads_in_transformers_with_same_logits(tmp_path):
    ours = apply_lora(quantize_linears(hf_llama()), ["q_proj", "v_proj", "gate_proj", "down_proj"],
                      r=4, alpha=8, verbose=False)
    randomize_lora_b(ours)
    out = save_merged(ours, tiny_config().to_dict(), tmp_path / "merged", dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    # The merged weight is dequant(W) + s B A with W from bitsandbytes' own NF4 round trip.
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    dense = hf_llama().model.layers[0].self_attn.q_proj.weight.data
    packed, state = bnb_f.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = ours.model.layers[0].self_attn.q_proj
    expected = bnb_f.dequantize_4bit(packed, state).double() + 2.0 * q.lora_b.double() @ q.lora_a.double()
    torch.testing.assert_close(hf.model.layers[0].self_attn.q_proj.weight.double(), expected, rtol=0, atol=1e-6)


def test_merged_export_sharded_bf16(tmp_path):
    ours = apply_lora(hf_llama(), "all-linear", r=4, alpha=8, verbose=False)
    randomize_lora_b(ours)
    fp32 = merged_state_dict(ours, torch.float32)
    out = save_merged(ours, tiny_config().to_dict(), tmp_path / "m", max_shard_size="10KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(fp32)
    hf = LlamaForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    for key, value in hf.state_dict().items():
        assert torch.equal(value, fp32[key].bfloat16()), key


def test_merged_nn_linear_layers_equal_peft_merge_and_unload():
    ours = apply_lora(hf_llama(), ["q_proj", "o_proj"], r=4, alpha=8, verbose=False)
    randomize_lora_b(ours)
    ref = get_peft_model(hf_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    sd = lora_mod.adapter_state_dict(ours)
    peft.set_peft_model_state_dict(ref, sd)
    expected = ref.merge_and_unload().state_dict()
    got = merged_state_dict(ours, torch.float32)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("r", [0, -2])
def test_bad_rank_is_refused(r):
    with pytest.raises(ValueError, match="positive integer"):
        LoRALinear(nn.Linear(4, 4), r=r, alpha=1)
    with pytest.raises(ValueError, match="positive integer"):
        apply_lora(hf_llama(), ["q_proj"], r=r, alpha=1)


def test_unknown_target_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qkv_proj'\].*'q_proj'.*all-linear"):
        apply_lora(hf_llama(), ["q_proj", "qkv_proj"], r=4, alpha=8)
    model = apply_lora(hf_llama(), ["q_proj"], r=4, alpha=8, verbose=False)
    with pytest.raises(ValueError, match="has a LoRA adapter already"):
        apply_lora(model, ["q_proj"], r=4, alpha=8)


def test_adapter_for_other_shapes_is_refused_and_model_untouched(tmp_path):
    save_adapter(apply_lora(hf_llama(hidden=48), ["q_proj"], r=4, alpha=8, verbose=False), tmp_path / "a",
                 base_model_name_or_path="bigger-llama")
    model = hf_llama()
    with pytest.raises(ValueError, match=r"bigger-llama.*lora_A of model.layers.0.self_attn.q_proj has shape "
                                         r"\[4, 48\], the model needs \[4, 32\]"):
        load_adapter(model, tmp_path / "a")
    assert not lora_mod.lora_layers(model)


def test_adapter_for_other_layer_count_is_refused(tmp_path):
    save_adapter(apply_lora(hf_llama(layers=3), ["v_proj"], r=4, alpha=8, verbose=False), tmp_path / "a")
    with pytest.raises(ValueError, match="the adapter has 3 layers, the model 2"):
        load_adapter(hf_llama(layers=2), tmp_path / "a")
    # PEFT writes full module paths when it targets fewer than 20 modules ("all-linear" on a small
    # model, or paths given by hand); a path the model lacks is named in the error.
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    ref = get_peft_model(hf_llama(layers=3), LoraConfig(r=2, target_modules=paths, task_type="CAUSAL_LM"))
    ref.save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="model.layers.2.*matches no module"):
        load_adapter(hf_llama(layers=2), tmp_path / "p")


def test_adapter_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(hf_llama(), tmp_path / "missing")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="only 'LORA'"):
        load_adapter(hf_llama(), tmp_path / "ia3")
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(hf_llama(), tmp_path / "x")
    get_peft_model(hf_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_adapter(hf_llama(), tmp_path / "d")


def test_saves_are_atomic_and_do_not_clobber(tmp_path, monkeypatch):
    model = apply_lora(hf_llama(), ["q_proj"], r=2, alpha=2, verbose=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        save_adapter(model, tmp_path / "busy")
    with pytest.raises(ValueError, match="max_shard_size"):
        save_merged(model, {}, tmp_path / "m", max_shard_size="lots")

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(lora_mod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]      # no half-written dir, no temp left
    monkeypatch.undo()
    save_adapter(model, tmp_path / "busy", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]


# ----------------------------------------------------------------------------- our Llama (llama/)

def quantized_like_bitsandbytes(hf: LlamaForCausalLM) -> LlamaForCausalLM:
    """The HF model with every block projection replaced by bitsandbytes' NF4 round trip of it."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    with torch.no_grad():
        for name, m in hf.named_modules():
            if name.split(".")[-1] in ALL:
                packed, state = bnb_f.quantize_4bit(m.weight.data, blocksize=64, quant_type="nf4",
                                                    compress_statistics=True)
                m.weight.copy_(bnb_f.dequantize_4bit(packed, state))
    return hf


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_llama_adapter_round_trips_with_peft(tiny_llama, tmp_path, load_in_4bit):
    from llama.load import load_llama
    ckpt = tiny_llama("gqa")
    reference_base = lambda: quantized_like_bitsandbytes(LlamaForCausalLM.from_pretrained(ckpt)) if load_in_4bit \
        else LlamaForCausalLM.from_pretrained(ckpt)
    ids = tokens(3, (2, 9))

    # ours -> PEFT
    ours = apply_lora(load_llama(ckpt, dtype=torch.float32, load_in_4bit=load_in_4bit), "all-linear",
                      r=4, alpha=8, verbose=False)
    randomize_lora_b(ours)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(ckpt))
    ref = PeftModel.from_pretrained(reference_base(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-4, atol=1e-4)

    # PEFT -> ours
    ref = get_peft_model(reference_base(), LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "down_proj"],
                                                     use_rslora=True, task_type="CAUSAL_LM"))
    randomize_peft_b(ref, seed=7)
    ref.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_llama(ckpt, dtype=torch.float32, load_in_4bit=load_in_4bit), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_llama_4bit_merged_export_loads_in_transformers_and_load_llama(tiny_llama, tmp_path):
    from llama.load import load_llama
    ckpt = tiny_llama("tied")
    ours = apply_lora(load_llama(ckpt, dtype=torch.float32, load_in_4bit=True), "all-linear", r=4, alpha=8,
                      verbose=False)
    randomize_lora_b(ours)
    config = json.loads((ckpt / "config.json").read_text())
    out = save_merged(ours, config, tmp_path / "merged", max_shard_size="40KB", dtype=torch.float32)
    assert (out / "model.safetensors.index.json").is_file()
    ids = tokens(4, (2, 9))
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(out).eval()(ids).logits, expected,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_llama(out, dtype=torch.float32)(ids), expected, rtol=1e-4, atol=1e-4)
