"""llama/load.py: 4-bit loading against bitsandbytes and transformers, and its errors on bad input."""

import json
import math
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import llama.load
from llama.load import load_llama, quantize_weight, random_quantized_llama, resident_bytes
from llama.model import Llama, LlamaConfig
from qlora.linear4bit import Linear4bit
from qlora.nf4 import dequantize_absmax, nf4_code

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _linear4bit_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}


def _assert_equal_to_bnb(layer: Linear4bit, weight: torch.Tensor):
    """layer holds exactly what bitsandbytes.functional.quantize_4bit makes of weight (nf4, double quant)."""
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=layer.blocksize, compress_statistics=True,
                                                 quant_type="nf4")
    assert torch.equal(layer.packed, packed.view(-1)), "packed codes differ"
    assert torch.equal(layer.absmax, state.absmax), "absmax codes differ"
    assert torch.equal(layer.absmax2, state.state2.absmax), "second-level scales differ"
    assert torch.equal(layer.offset, state.offset), "absmax offset differs"


# ----------------------------------------------------------------------------- 4-bit loading

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_4bit_logits_equal_transformers_with_dequantized_weights(tiny_llama, dtype):
    directory = tiny_llama("gqa")
    ours = load_llama(directory, dtype=dtype, load_in_4bit=True)
    layers = _linear4bit_layers(ours)
    assert sorted({name.rsplit(".", 1)[1] for name in layers}) == sorted(Llama.LINEAR_NAMES)
    assert len(layers) == 7 * 2
    # reference: transformers with every projection's weight replaced by our dequantized NF4 weight
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    for name, layer in layers.items():
        hf.get_submodule(name).weight.data = layer.dequantize(dtype)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = hf(ids).logits.float(), ours(ids).float()
    # fp32: rounding only (atol 1e-5 on logits of size ~3); bf16: 2 bf16 ulps of the largest logit.
    atol = 1e-5 if dtype == torch.float32 else 2 * 2**-7 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_4bit_weights_equal_bitsandbytes_quantize_4bit(tiny_llama):
    directory = tiny_llama("mha", num_hidden_layers=1)
    ours = load_llama(directory, dtype=torch.bfloat16, load_in_4bit=True)
    weights = load_file(directory / "model.safetensors")
    for name, layer in _linear4bit_layers(ours).items():
        _assert_equal_to_bnb(layer, weights[name + ".weight"].to(torch.bfloat16))
        assert layer.compute_dtype == torch.bfloat16


def test_4bit_logits_close_to_transformers_bitsandbytes(tiny_llama):
    from transformers import BitsAndBytesConfig

    directory = tiny_llama("gqa")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        hf = LlamaForCausalLM.from_pretrained(directory, quantization_config=quant, dtype=torch.bfloat16,
                                              device_map="cpu").eval()
    except Exception as e:  # bitsandbytes' 4-bit path needs a backend for this device
        pytest.skip(f"transformers + bitsandbytes 4-bit loading does not work on CPU here: {e}")
    ours = load_llama(directory, dtype=torch.bfloat16, load_in_4bit=True)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits.float(), ours(ids).float()
    # Same NF4 bytes (previous test); bitsandbytes' CPU matmul rounds differently in bf16:
    # allow 2 bf16 ulps of the largest logit.
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * 2**-7 * expected.abs().max().item())


@pytest.mark.parametrize("shape, chunk_numel", [((96, 64), 1000), ((37, 50), 64), ((5, 3000), 1), ((7, 9), 10**6)])
def test_quantize_weight_in_chunks_equals_bitsandbytes(shape, chunk_numel):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.02
    layer = quantize_weight(weight, "cpu", torch.bfloat16, blocksize=64, chunk_numel=chunk_numel)
    _assert_equal_to_bnb(layer, weight.to(torch.bfloat16))
    plain = quantize_weight(weight, "cpu", torch.float32, double_quant=False, chunk_numel=chunk_numel)
    ref_packed, ref_state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=False,
                                                         quant_type="nf4")
    assert torch.equal(plain.packed, ref_packed.view(-1)) and torch.equal(plain.absmax, ref_state.absmax)


def test_loaded_model_is_frozen_with_expected_dtypes_and_size(tiny_llama):
    directory = tiny_llama("tied")
    model = load_llama(directory, dtype=torch.bfloat16, load_in_4bit=True)
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # Independent count from the config: bf16 for embeddings and norms; per projected weight 4 + 8/64
    # bits, one fp32 scale per 256 blocks and an fp32 offset; the fp32 code books (16 + 256 values)
    # once per distinct tensor (on the CPU every layer shares the cached ones); fp32 RoPE frequencies.
    c = json.loads((directory / "config.json").read_text())
    C, I, L, hd = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["head_dim"]
    kv = c["num_key_value_heads"] * hd
    proj = [C * C, C * kv, C * kv, C * C, C * I, C * I, I * C]
    per_layer = sum(n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 for n in proj)
    layers = _linear4bit_layers(model).values()
    code_books = 4 * (16 * len({l.code.data_ptr() for l in layers}) + 256 * len({l.code2.data_ptr() for l in layers}))
    expected = L * per_layer + code_books + 2 * (c["vocab_size"] * C + (2 * L + 1) * C) + 4 * hd // 2
    assert resident_bytes(model) == expected


# ----------------------------------------------------------------------------- random 4-bit models

# Odd sizes: hidden 96 (1.5 blocks of 64 per row), intermediate 200, grouped-query attention.
RANDOM_CONFIG = dict(vocab_size=100, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


def _spy_on_random_quantized_llama(monkeypatch) -> dict:
    """Record what random_quantized_llama hands to quantize_weight: {id(layer): a copy of the weight}.
    Every draw first checks that no tensor drawn before it is still alive: one 16-bit tensor at a time."""
    drawn, alive = {}, []
    real_draw, real_quantize = llama.load._random_tensor, llama.load.quantize_weight

    def draw(*args, **kwargs):
        assert all(ref() is None for ref in alive), "a tensor drawn earlier is still alive"
        tensor = real_draw(*args, **kwargs)
        alive.append(weakref.ref(tensor))
        return tensor

    def quantize(weight, *args, **kwargs):
        layer = real_quantize(weight, *args, **kwargs)
        drawn[id(layer)] = weight.clone()
        return layer

    monkeypatch.setattr(llama.load, "_random_tensor", draw)
    monkeypatch.setattr(llama.load, "quantize_weight", quantize)
    return drawn


def test_random_quantized_llama_holds_bitsandbytes_nf4_of_the_weights_it_drew(monkeypatch):
    drawn = _spy_on_random_quantized_llama(monkeypatch)
    model = random_quantized_llama(LlamaConfig(**RANDOM_CONFIG), "cpu", torch.bfloat16, seed=3)
    layers = _linear4bit_layers(model)
    assert len(layers) == len(drawn) == 7 * 2
    assert sorted({name.rsplit(".", 1)[1] for name in layers}) == sorted(Llama.LINEAR_NAMES)
    code = nf4_code().double()
    half_gap = ((code[1:] - code[:-1]) / 2).max()                 # the farthest a value is from its level
    for name, layer in layers.items():
        w = drawn[id(layer)]
        assert w.dtype == torch.bfloat16 and tuple(w.shape) == (layer.out_features, layer.in_features)
        assert abs(w.float().std().item() - 0.02) < 0.002          # the N(0, 0.02) draw
        _assert_equal_to_bnb(layer, w)                             # the very bytes bitsandbytes makes of it
        # Within NF4's rounding of the drawn weight, per block of 64 (float64): nearest level of w / a,
        # times the stored absmax a' (double-quantized), rounded once to bf16:
        #   |dequant - w| <= half_gap * a + |a' - a| + 2^-8 * a'
        blocks = w.double().reshape(-1)
        n_blocks = math.ceil(blocks.numel() / 64)
        blocks = torch.nn.functional.pad(blocks, (0, n_blocks * 64 - blocks.numel())).view(n_blocks, 64)
        a = blocks.abs().amax(dim=1)
        a_stored = dequantize_absmax(layer.state).double()
        bound = (half_gap * a + (a_stored - a).abs() + 2**-8 * a_stored)[:, None]
        error = (layer.dequantize(torch.bfloat16).double().reshape(-1) - w.double().reshape(-1))
        error = torch.nn.functional.pad(error, (0, n_blocks * 64 - error.numel())).view(n_blocks, 64)
        assert (error.abs() <= bound * (1 + 1e-6)).all(), name


def test_random_quantized_llama_equals_transformers_holding_its_weights():
    config = LlamaConfig(**RANDOM_CONFIG)
    model = random_quantized_llama(config, "cpu", torch.float32, seed=0)
    assert not any(p.requires_grad or p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, p in model.named_parameters():                      # random_llama's init of the dense part
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            std = 96 ** -0.5 if name == "lm_head.weight" else 0.02
            assert abs(p.std().item() - std) < 0.1 * std, name
    # reference: transformers' Llama with our dequantized projections and our dense weights
    from transformers import LlamaConfig as HFLlamaConfig
    hf = LlamaForCausalLM(HFLlamaConfig(**RANDOM_CONFIG, rms_norm_eps=config.rms_norm_eps)).eval()
    dense = {name: p for name, p in model.named_parameters()}
    layers = _linear4bit_layers(model)
    dense.update({name + ".weight": layer.dequantize(torch.float32) for name, layer in layers.items()})
    missing, unexpected = hf.load_state_dict(dense, strict=False)
    assert not missing and not unexpected
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-5)


def test_random_quantized_llama_is_seeded():
    config = LlamaConfig(**RANDOM_CONFIG, tie_word_embeddings=True)
    a, b = (random_quantized_llama(config, "cpu", torch.bfloat16, seed=5) for _ in range(2))
    c = random_quantized_llama(config, "cpu", torch.bfloat16, seed=6)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.1.mlp.down_proj.packed"], sc["model.layers.1.mlp.down_proj.packed"])


# ----------------------------------------------------------------------------- bad input

def _rewrite_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def _rewrite_weights(directory, change):
    path = directory / "model.safetensors"
    weights = load_file(path)
    change(weights)
    save_file(weights, path, metadata={"format": "pt"})


def test_missing_directory_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llama(tmp_path / "nope")


def test_file_instead_of_directory_raises(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_llama(tmp_path / "model.safetensors")


def test_missing_config_raises_file_not_found(tiny_llama):
    directory = tiny_llama()
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_llama(directory)


def test_invalid_config_json_raises(tiny_llama):
    directory = tiny_llama()
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_llama(directory)


def test_missing_weights_raise_file_not_found(tiny_llama):
    directory = tiny_llama()
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_llama(directory)


def test_pickle_checkpoint_is_refused(tiny_llama):
    directory = tiny_llama()
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickle"):
        load_llama(directory)


def test_missing_shard_named_in_index_raises(tiny_llama):
    directory = tiny_llama("mha", max_shard_size="20KB")
    shard = sorted(directory.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard.name}"):
        load_llama(directory)


def test_shape_that_disagrees_with_config_raises(tiny_llama):
    directory = tiny_llama()
    _rewrite_config(directory, intermediate_size=128)
    with pytest.raises(ValueError, match="mlp.down_proj.weight.*has shape"):
        load_llama(directory)


def test_missing_tensor_raises(tiny_llama):
    directory = tiny_llama()
    _rewrite_weights(directory, lambda w: w.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(ValueError, match="missing from the checkpoint.*post_attention_layernorm"):
        load_llama(directory)


def test_unexpected_tensor_raises(tiny_llama):
    directory = tiny_llama()
    _rewrite_weights(directory, lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_llama(directory)


def test_non_llama_architecture_raises(tiny_llama):
    directory = tiny_llama()
    _rewrite_config(directory, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ValueError, match="mistral"):
        load_llama(directory)


def test_weight_with_nan_is_refused_by_name(tiny_llama):
    directory = tiny_llama()
    _rewrite_weights(directory, lambda w: w["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")))
    with pytest.raises(ValueError, match="cannot quantize 'model.layers.0.mlp.up_proj.weight'.*NaN"):
        load_llama(directory, load_in_4bit=True)


@pytest.mark.parametrize("kwargs, message", [(dict(dtype=torch.int8), "dtype"),
                                             (dict(load_in_4bit=True, blocksize=48), "blocksize")])
def test_bad_arguments_raise(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_llama(tiny_llama(), **kwargs)
