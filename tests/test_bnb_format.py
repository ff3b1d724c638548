"""Checkpoints saved in 4-bit by transformers + bitsandbytes (qlora/bnb_format.py): loaded as stored,
bit for bit, and ours written in that format load in transformers."""

import json

import pytest
import torch

from llama.load import load_llama
from qlora.linear4bit import Linear4bit

pytest.importorskip("bitsandbytes")
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402


def bnb_config(double_quant: bool, compute_dtype=torch.bfloat16) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def saved_in_4bit_by_transformers(dense_dir, out_dir, double_quant=True, **save_kwargs):
    hf = LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=bnb_config(double_quant),
                                          dtype=torch.bfloat16, device_map="cpu").eval()
    hf.save_pretrained(out_dir, **save_kwargs)
    return hf


@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "single"])
def test_transformers_4bit_checkpoint_loads_with_the_same_bytes_and_logits(tiny_llama, tmp_path, double_quant):
    dense = tiny_llama("gqa")
    hf = saved_in_4bit_by_transformers(dense, tmp_path / "q4", double_quant)
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    ours = load_llama(tmp_path / "q4", dtype=torch.bfloat16, load_in_4bit=True)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 7 * 2
    for name, layer in layers.items():
        weight = hf.get_submodule(name).weight                     # bnb.nn.Params4bit
        state = weight.quant_state
        assert torch.equal(layer.packed, weight.data.view(-1)), name
        assert torch.equal(layer.absmax, state.absmax), name
        assert torch.equal(layer.code, state.code), name
        if double_quant:
            assert torch.equal(layer.absmax2, state.state2.absmax) and torch.equal(layer.code2, state.state2.code)
            assert torch.equal(layer.offset, state.offset), name
        else:
            assert layer.absmax2 is None
    # The same bytes as quantizing the dense checkpoint ourselves, so the same logits, exactly.
    from_dense = load_llama(dense, dtype=torch.bfloat16, load_in_4bit=True, double_quant=double_quant)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, expected = ours(ids).float(), hf(ids).logits.float()
        assert torch.equal(got, from_dense(ids).float())
    # Against transformers' own 4-bit forward: the matmuls round differently in bf16 (tests/test_llama_load.py).
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * 2**-7 * expected.abs().max().item())


def test_sharded_4bit_checkpoint_with_state_in_other_shards(tiny_llama, tmp_path):
    dense = tiny_llama("mha")
    saved_in_4bit_by_transformers(dense, tmp_path / "q4", max_shard_size="20KB")
    index = json.loads((tmp_path / "q4" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    ours = load_llama(tmp_path / "q4", dtype=torch.bfloat16, load_in_4bit=True)
    ref = load_llama(dense, dtype=torch.bfloat16, load_in_4bit=True)
    ours, ref = dict(ours.named_buffers(remove_duplicate=False)), dict(ref.named_buffers(remove_duplicate=False))
    assert ours.keys() == ref.keys()
    for name in ours:
        assert torch.equal(ours[name], ref[name]), name


def test_4bit_checkpoint_loads_dense_when_asked(tiny_llama, tmp_path):
    dense = tiny_llama("mha")
    saved_in_4bit_by_transformers(dense, tmp_path / "q4")
    ours = load_llama(tmp_path / "q4", dtype=torch.float32, load_in_4bit=False)
    assert not any(isinstance(m, Linear4bit) for m in ours.modules())
    q4 = load_llama(dense, dtype=torch.bfloat16, load_in_4bit=True)   # transformers quantized the bf16 weights
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(ours.get_submodule(name).weight, q4.get_submodule(name).dequantize(torch.float32))


def test_damaged_4bit_checkpoint_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    dense = tiny_llama("mha", num_hidden_layers=1)
    saved_in_4bit_by_transformers(dense, tmp_path / "q4")
    path = tmp_path / "q4" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.0.self_attn.q_proj.weight.absmax"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="q_proj.weight is stored in 4-bit but its quantization state is incomplete"):
        load_llama(tmp_path / "q4", load_in_4bit=True)


def test_our_4bit_export_loads_in_transformers_and_in_ours(tiny_llama, tmp_path):
    from qlora.adapter import save_merged
    from qlora.lora import apply_lora
    ckpt = tiny_llama("gqa")
    model = apply_lora(load_llama(ckpt, dtype=torch.bfloat16, load_in_4bit=True), "all-linear", r=4, alpha=8,
                       verbose=False)
    for m in model.modules():                          # B != 0, so the merge changes the weights
        if hasattr(m, "lora_b"):
            torch.nn.init.normal_(m.lora_b, std=0.05, generator=torch.Generator().manual_seed(0))
    config = json.loads((ckpt / "config.json").read_text())
    out = save_merged(model, config, tmp_path / "q4", load_in_4bit=True, max_shard_size="30KB")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    hf = LlamaForCausalLM.from_pretrained(out, device_map="cpu").eval()
    ours = load_llama(out, dtype=torch.bfloat16, load_in_4bit=True)
    merged_dense = save_merged(model, config, tmp_path / "dense")       # the same merge, kept in bf16
    requantized = load_llama(merged_dense, dtype=torch.bfloat16, load_in_4bit=True)
    for name, layer in ((n, m) for n, m in ours.named_modules() if isinstance(m, Linear4bit)):
        theirs = hf.get_submodule(name).weight
        assert torch.equal(layer.packed, theirs.data.view(-1)) and torch.equal(layer.absmax, theirs.quant_state.absmax)
        assert torch.equal(layer.packed, requantized.get_submodule(name).packed), name
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, expected = ours(ids).float(), hf(ids).logits.float()
        assert torch.equal(got, requantized(ids).float())
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * 2**-7 * expected.abs().max().item())
