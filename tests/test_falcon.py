"""falcon/: the model against transformers' FalconForCausalLM (fp32, bf16, NF4 against bitsandbytes),
the KV cache against the full forward, LoRA files against PEFT on transformers' Falcon, the merged
export against transformers, the tokenizer.json tokenizer against `tokenizers` and transformers, and
the Triton NF4 kernels at Falcon-like sizes that are not powers of two. All on tiny random
checkpoints written by transformers (tests/conftest.py); the kernels need TRITON_INTERPRET=1."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import FalconForCausalLM

from conftest import FALCON_VARIANTS, TINY_FALCON
from falcon.load import load_base, load_falcon, load_model, model_class
from falcon.model import Falcon, FalconConfig
from llama.generate import generate
from llama.model import Llama
from qlora.linear4bit import Linear4bit
from qlora.adapter import load_adapter, save_adapter, save_merged
from qlora.lora import apply_lora, lora_layers
from test_kernels import assert_within, error_bound, interpreted, nf4_weight, randn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

FOUR = sorted(Falcon.LINEAR_NAMES)
# tiiuae/falcon-7b's config.json as published on the Hub.
FALCON_7B = {
    "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
    "attention_dropout": 0.0, "bias": False, "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0,
    "hidden_size": 4544, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "falcon",
    "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71, "num_hidden_layers": 32,
    "parallel_attn": True, "torch_dtype": "bfloat16", "transformers_version": "4.27.4", "use_cache": True,
    "vocab_size": 65024}


def hf_falcon(directory, dtype=torch.float32) -> FalconForCausalLM:
    return FalconForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").eval()


def tokens(seed=0, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(0, TINY_FALCON["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def bf16_atol(expected: torch.Tensor) -> float:
    return 2 * 2**-7 * expected.abs().max().item()     # 2 bf16 ulps of the largest logit


def randomize_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)


def randomize_peft_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- config

def test_config_reads_falcon_7b_like_transformers():
    from transformers import FalconConfig as HFFalconConfig

    ours, ref = FalconConfig.from_hf(FALCON_7B), HFFalconConfig(**FALCON_7B)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                  "ffn_hidden_size", "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert (ours.head_dim, ours.n_kv_heads, ours.ffn_hidden_size) == (64, 1, 18176)
    with torch.device("meta"):
        attn = Falcon(ours).transformer.h[0].self_attention
    assert tuple(attn.query_key_value.weight.shape) == (4672, 4544)   # 71 query heads + K + V, of 64


@pytest.mark.parametrize("change, message", [
    ({"alibi": True}, "alibi"),
    ({"model_type": "llama"}, "model_type"),
    ({"architectures": ["RWForCausalLM"]}, "architectures"),
    ({"activation": "relu"}, "activation"),
    ({"hidden_dropout": 0.1}, "hidden_dropout"),
    ({"new_decoder_architecture": True, "parallel_attn": False}, "parallel_attn"),
    ({"num_attention_heads": 7}, "divisible"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"quantization_config": {"load_in_4bit": True}}, "quantization_config"),
])
def test_config_refuses_what_this_model_does_not_implement(change, message):
    with pytest.raises(ValueError, match=message):
        FalconConfig.from_hf({**FALCON_7B, **change})


# ----------------------------------------------------------------------------- logits

@pytest.mark.parametrize("variant", list(FALCON_VARIANTS))
def test_fp32_logits_equal_transformers(tiny_falcon, variant):
    directory = tiny_falcon(variant)
    hf, ours = hf_falcon(directory), load_falcon(directory, dtype=torch.float32)
    ids = tokens()
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert expected.abs().max() > 1                        # logits large enough to show a misplaced piece
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["7b", "40b", "sequential"])
def test_bf16_logits_match_transformers_within_rounding(tiny_falcon, variant):
    directory = tiny_falcon(variant)
    hf, ours = hf_falcon(directory, torch.bfloat16), load_falcon(directory, dtype=torch.bfloat16)
    ids = tokens(1)
    with torch.no_grad():
        expected, got = hf(ids).logits.float(), ours(ids).float()
    torch.testing.assert_close(got, expected, rtol=0, atol=bf16_atol(expected))


def test_module_names_and_tied_head_are_transformers(tiny_falcon):
    directory = tiny_falcon("40b")
    ours, hf = load_falcon(directory, dtype=torch.float32), hf_falcon(directory)
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert ours.lm_head.weight is ours.transformer.word_embeddings.weight
    assert all(not p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("variant", ["7b", "40b", "mha"])
def test_kv_cache_token_by_token_equals_full_forward(tiny_falcon, variant):
    model = load_falcon(tiny_falcon(variant), dtype=torch.float32)
    ids = tokens(2, (2, 12))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 16)
        steps = [model(ids[:, :4], start_pos=0)]           # a prefill of 4, then one token at a time
        steps += [model(ids[:, t:t + 1], start_pos=t) for t in range(4, 12)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert model.transformer.h[0].self_attention.n_kv_heads == {"7b": 1, "40b": 2, "mha": 6}[variant]


def test_greedy_generation_equals_transformers_generate(tiny_falcon):
    directory = tiny_falcon("7b")
    hf, ours = hf_falcon(directory), load_falcon(directory, dtype=torch.float32)
    prompt = tokens(3, (1, 5))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 5:].tolist()
    assert generate(ours, prompt.tolist(), 12) == [expected]


# ----------------------------------------------------------------------------- loading

def test_sharded_checkpoint_loads_and_load_model_picks_falcon(tiny_falcon):
    directory = tiny_falcon("7b", max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    model = load_model(directory, dtype=torch.float32)
    assert isinstance(model, Falcon)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), hf_falcon(directory)(tokens()).logits, rtol=0, atol=1e-5)


def test_model_class_by_model_type():
    assert model_class({"model_type": "falcon"}) is Falcon and model_class({"model_type": "llama"}) is Llama
    with pytest.raises(ValueError, match="model_type 'gpt2'.*llama or falcon"):
        model_class({"model_type": "gpt2"})


def test_pickle_only_falcon_checkpoint_is_refused(tiny_falcon):
    directory = tiny_falcon("7b")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_falcon(directory)


def test_random_model_builds_the_demo_falcon(tmp_path):
    config = {**FALCON_7B, "hidden_size": 48, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_base(tmp_path / "config.json", "cpu", torch.float32, load_in_4bit=True, seed=3)
    assert isinstance(model, Falcon)
    assert {n.rsplit(".", 1)[1] for n, m in model.named_modules() if isinstance(m, Linear4bit)} == set(FOUR)
    ln = model.transformer.h[0].input_layernorm
    assert torch.equal(ln.weight, torch.ones(48)) and torch.equal(ln.bias, torch.zeros(48))


# ----------------------------------------------------------------------------- 4-bit

def _linear4bit_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["7b", "mha"])
def test_4bit_logits_equal_transformers_with_dequantized_weights(tiny_falcon, variant, dtype):
    directory = tiny_falcon(variant)
    ours = load_falcon(directory, dtype=dtype, load_in_4bit=True)
    layers = _linear4bit_layers(ours)
    assert sorted({name.rsplit(".", 1)[1] for name in layers}) == FOUR and len(layers) == 4 * 2
    assert (layers["transformer.h.0.mlp.dense_h_to_4h"].bias is not None) == (variant == "mha")
    hf = hf_falcon(directory, dtype)
    for name, layer in layers.items():
        hf.get_submodule(name).weight.data = layer.dequantize(dtype)
    ids = tokens(4)
    with torch.no_grad():
        expected, got = hf(ids).logits.float(), ours(ids).float()
    atol = 1e-5 if dtype == torch.float32 else bf16_atol(expected)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_4bit_logits_close_to_transformers_bitsandbytes(tiny_falcon):
    from bench.falcon_step import load_peer, n_bnb_4bit

    directory = tiny_falcon("7b")
    # transformers + BitsAndBytesConfig (NF4, double quantization, bf16 compute). transformers 5 skips
    # Falcon's FalconLinear layers (it quantizes only type nn.Linear): load_peer then puts bitsandbytes'
    # Linear4bit there itself, as transformers 4 did (bench/falcon_step.py).
    try:
        hf = load_peer(directory, torch.device("cpu"), torch.bfloat16).eval()
    except Exception as e:  # bitsandbytes' 4-bit path needs a backend for this device
        pytest.skip(f"transformers + bitsandbytes 4-bit loading does not work on CPU here: {e}")
    assert n_bnb_4bit(hf) == 4 * 2
    ours = load_falcon(directory, dtype=torch.bfloat16, load_in_4bit=True)
    ids = tokens(5)
    with torch.no_grad():
        expected, got = hf(ids).logits.float(), ours(ids).float()
    # The same NF4 bytes (test_4bit_weights_equal_bitsandbytes_quantize_4bit in test_llama_load.py does
    # the bytes); bitsandbytes' CPU matmul rounds differently in bf16: 2 bf16 ulps of the largest logit.
    torch.testing.assert_close(got, expected, rtol=0, atol=bf16_atol(expected))


# ----------------------------------------------------------------------------- LoRA

def quantized_like_bitsandbytes(hf):
    """transformers' Falcon with the four linear layers' weights replaced by bitsandbytes' NF4 round trip."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    with torch.no_grad():
        for name, m in hf.named_modules():
            if name.split(".")[-1] in FOUR:
                packed, state = bnb_f.quantize_4bit(m.weight.data, blocksize=64, quant_type="nf4",
                                                    compress_statistics=True)
                m.weight.copy_(bnb_f.dequantize_4bit(packed, state))
    return hf


def test_all_linear_is_the_four_falcon_layers_and_unknown_names_list_them(tiny_falcon):
    model = apply_lora(load_falcon(tiny_falcon("7b"), dtype=torch.float32), "all-linear", r=2, alpha=4,
                       verbose=False)
    assert sorted({name.rsplit(".", 1)[1] for name in lora_layers(model)}) == FOUR
    assert len(lora_layers(model)) == 4 * 2
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['q_proj'\].*'query_key_value'.*'dense_4h_to_h'"):
        apply_lora(load_falcon(tiny_falcon("7b"), dtype=torch.float32), ["q_proj"], r=2, alpha=4)


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_falcon_adapter_round_trips_with_peft(tiny_falcon, tmp_path, load_in_4bit):
    ckpt = tiny_falcon("7b")
    reference_base = lambda: quantized_like_bitsandbytes(hf_falcon(ckpt)) if load_in_4bit else hf_falcon(ckpt)  # noqa: E731
    ids = tokens(6)

    # ours -> PEFT on transformers' Falcon
    ours = apply_lora(load_falcon(ckpt, dtype=torch.float32, load_in_4bit=load_in_4bit), FOUR,
                      r=4, alpha=8, dropout=0.1, verbose=False).eval()
    randomize_lora_b(ours)
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(ckpt))
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"] == FOUR
    ref = PeftModel.from_pretrained(reference_base(), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(expected, reference_base()(ids).logits, atol=1e-3)   # B is not zero

    # PEFT on transformers' Falcon -> ours
    ref = get_peft_model(reference_base(), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                     target_modules=["query_key_value", "dense_4h_to_h"],
                                                     task_type="CAUSAL_LM"))
    randomize_peft_b(ref, seed=7)
    ref.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_falcon(ckpt, dtype=torch.float32, load_in_4bit=load_in_4bit), tmp_path / "peft").eval()
    assert len(lora_layers(ours)) == 2 * 2
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_4bit_merged_export_loads_in_transformers_and_load_falcon(tiny_falcon, tmp_path):
    ckpt = tiny_falcon("mha")                               # biases too: they go into the export as they are
    ours = apply_lora(load_falcon(ckpt, dtype=torch.float32, load_in_4bit=True), "all-linear", r=4, alpha=8,
                      verbose=False)
    randomize_lora_b(ours)
    config = json.loads((ckpt / "config.json").read_text())
    out = save_merged(ours, config, tmp_path / "merged", max_shard_size="40KB", dtype=torch.float32)
    assert (out / "model.safetensors.index.json").is_file()
    ids = tokens(7)
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(hf_falcon(out)(ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_falcon(out, dtype=torch.float32)(ids), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- tokenizer

MIXED = ["Hello world", "How do I figure out how much money I need to retire?", "  two  leading, runs   of  spaces  ",
         "digits 1234567890 and 3.14159, -42, $1,500,000.00", "émigré naïve café", "日本語のテキスト", "emoji 🦅🔥",
         "line one\nline two\n\n  indented\ttab\r\n", "### Instruction:\nWhat is a bond?\n\n### Response:\n",
         "a" * 40, " ", ""]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from llama.tokenizer import train_bpe_tokenizer

    corpus = ["The quick brown fox jumps over the lazy dog. 0123456789", "Saving $1,500 a month for 30 years.",
              "### Instruction:\nWhat is compound interest?\n\n### Response:\n", "café naïve 日本 🦅"] * 30
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(corpus, 400, directory)
    return directory


def test_bpe_ids_equal_tokenizers_and_transformers(bpe_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    from llama.tokenizer import BPETokenizer, load_tokenizer

    ours = load_tokenizer(bpe_dir)
    assert isinstance(ours, BPETokenizer)
    lib, hf = HFTokenizer.from_file(str(bpe_dir / "tokenizer.json")), AutoTokenizer.from_pretrained(bpe_dir)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (None, 0, None)
    for text in MIXED:
        expected = hf.encode(text, add_special_tokens=False)
        assert expected == lib.encode(text, add_special_tokens=False).ids, text
        assert ours.encode(text) == expected, text              # no BOS: Falcon's tokenizer has none
        assert ours.encode(text, eos=True) == expected + [hf.eos_token_id], text
        assert ours.decode(ours.encode(text, eos=True)) == hf.decode(expected) == text, text   # byte-level: lossless


def test_bpe_keeps_special_strings_as_text_and_checks_ids(bpe_dir):
    from llama.tokenizer import load_tokenizer

    ours = load_tokenizer(bpe_dir / "tokenizer.json")
    ids = ours.encode("Hey<|endoftext|>there", bos=False)
    assert ours.eos_id not in ids and ours.decode(ids) == "Hey<|endoftext|>there"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([ours.vocab_size])
    assert set(ours.files()) == {"tokenizer.json", "tokenizer_config.json"}


def test_bad_tokenizer_files_fail_clearly(tmp_path):
    from llama.tokenizer import BPETokenizer, load_tokenizer

    with pytest.raises(FileNotFoundError, match="tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        BPETokenizer(tmp_path / "tokenizer.json")


# ----------------------------------------------------------------------------- kernels at Falcon's sizes

# Falcon-7B's sizes are 71 x 64 (hidden), 73 x 64 (query_key_value out) and 284 x 64 (the MLP): not
# powers of two. Here the same primes times 8: rows of 568 values cross the 64-value absmax blocks
# (dequantization and the training matmul take that). The decode GEMV needs whole blocks per row, as
# every Falcon size has: it runs at Falcon's own K = 71 x 64 = 4544 and N = 73 x 8.
FALCON_K, FALCON_N = 71 * 8, 73 * 8
FALCON_7B_K = 71 * 64


@interpreted
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_triton_bit_exact_at_falcon_sizes(double_quant):
    from kernels import dequantize_nf4_triton
    from qlora.nf4 import dequantize_nf4

    packed, state = nf4_weight((FALCON_N, FALCON_K), 64, double_quant, seed=11)
    fp32_values = dequantize_nf4(packed, state)
    for dtype in (torch.float16, torch.bfloat16):
        got = dequantize_nf4_triton(packed, state, dtype)
        assert got.shape == (FALCON_N, FALCON_K) and torch.equal(got, fp32_values.to(dtype))


@interpreted
@pytest.mark.parametrize("M", [1, 5])
def test_gemv_at_falcon_sizes_within_rounding(M):
    from kernels import gemv_nf4
    from qlora.nf4 import dequantize_nf4

    packed, state = nf4_weight((FALCON_N, FALCON_7B_K), 64, seed=12)
    w = dequantize_nf4(packed, state)
    x = randn(M, FALCON_7B_K, dtype=torch.bfloat16, seed=13)
    got = gemv_nf4(x, packed, state)
    assert_within(got, x.double() @ w.double().T, error_bound(x, w, torch.bfloat16, 0), "gemv_nf4 at Falcon sizes")


@interpreted
def test_matmul_and_grad_at_falcon_sizes_equal_reference():
    from kernels import matmul_nf4, matmul_nf4_grad
    from qlora.nf4 import dequantize_nf4

    packed, state = nf4_weight((FALCON_N, FALCON_K), 64, seed=14)
    w = dequantize_nf4(packed, state).to(torch.bfloat16)
    x, grad_y = randn(3, 7, FALCON_K, dtype=torch.bfloat16, seed=15), randn(3, 7, FALCON_N, dtype=torch.bfloat16, seed=16)
    assert torch.equal(matmul_nf4(x, packed, state), F.linear(x, w))
    assert torch.equal(matmul_nf4_grad(grad_y, packed, state), grad_y @ w)


@interpreted
def test_4bit_falcon_forward_through_the_kernels_matches_the_reference(tiny_falcon, monkeypatch):
    # Under the interpreter bf16 Linear4bit runs the Triton kernels (GEMV for the 1-token decode step,
    # dequant + matmul for the prefill); the reference is the same model on the PyTorch dequantizer.
    import qlora.linear4bit as linear4bit

    model = load_falcon(tiny_falcon("7b"), dtype=torch.bfloat16, load_in_4bit=True)
    ids = tokens(8, (1, 6))

    def run():
        with torch.no_grad():
            model.setup_cache(1, 8)
            out = torch.cat([model(ids[:, :5], start_pos=0), model(ids[:, 5:], start_pos=5)], dim=1)
            model.clear_cache()
        return out.float()

    kernels_out = run()
    monkeypatch.setattr(linear4bit, "use_kernels", lambda x: False)
    reference = run()
    torch.testing.assert_close(kernels_out, reference, rtol=0, atol=bf16_atol(reference))


@interpreted
def test_4bit_layer_under_autocast_takes_the_kernels_for_fp32_inputs(tiny_falcon, monkeypatch):
    # CUDA autocast runs LayerNorm in fp32, so Falcon's linears get fp32 inputs; the 4-bit layer must
    # cast them to autocast's dtype as F.linear does, not fall back to the fp32 reference dequantizer
    # (on the H200 that fallback was 254 of a step's 430 ms). CPU autocast keeps LayerNorm in bf16, so
    # the fp32 input is made here directly.
    import qlora.linear4bit as linear4bit

    model = load_falcon(tiny_falcon("7b"), dtype=torch.bfloat16, load_in_4bit=True)
    apply_lora(model, ["dense_h_to_4h"], 4, 8, 0.0, verbose=False)
    randomize_lora_b(model)
    layer = model.transformer.h[0].mlp.dense_h_to_4h
    x = randn(2, 5, layer.in_features, dtype=torch.float32, seed=21).requires_grad_()
    seen, use_kernels = [], linear4bit.use_kernels
    monkeypatch.setattr(linear4bit, "use_kernels", lambda t: seen.append(t.dtype) or use_kernels(t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = layer(x.detach().bfloat16())
    y.float().sum().backward()
    assert set(seen) == {torch.bfloat16}, seen
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected)
    assert x.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- train.py / infer.py

def test_train_and_infer_on_a_tiny_random_falcon(tmp_path, capsys):
    import infer
    import train
    from qlora.sql_dataset import write_jsonl
    from qlora.finance_dataset import finance_rows

    config = {**FALCON_7B, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 384,
              "bos_token_id": 0, "eos_token_id": 0}
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    write_jsonl(finance_rows(200, seed=2), tmp_path / "rows.jsonl")
    out = tmp_path / "out"
    argv = ["--base_model", tmp_path / "tiny.json", "--datasets", f"{tmp_path / 'rows.jsonl'}:alpaca",
            "--output_dir", out, "--max_steps", 16, "--micro_batch_size", 8, "--learning_rate", 3e-3,
            "--lora_target_linear", "false", "--lora_target_modules", "query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
            "--eval_steps", 8, "--save_steps", 16, "--logging_steps", 1, "--warmup_steps", 1, "--val_set_size", 8]
    assert train.main([str(a) for a in argv]) == 0
    curve = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.3, curve
    adapter = out / "adapter"
    assert {"tokenizer.json", "tokenizer_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == FOUR

    capsys.readouterr()
    assert infer.main(["--adapter", str(adapter), "--instruction", "What is a bond?", "--max_new_tokens", "6"]) == 0
    assert "new tokens" in capsys.readouterr().err                # it answered (6 tokens, or fewer at EOS)
    export = tmp_path / "merged"
    assert infer.main(["--adapter", str(adapter), "--export", str(export), "--prompt", "Hi", "--max_new_tokens", "2"]) == 0
    assert isinstance(load_model(export, dtype=torch.float32), Falcon)
    assert (export / "tokenizer.json").is_file()

    # A Llama target name on a Falcon fails before anything loads, naming Falcon's layers.
    with pytest.raises(ValueError, match=r"unknown LoRA target.*'q_proj'.*'query_key_value'"):
        train.main([str(a) for a in [*argv[:6], "--lora_target_linear", "false", "--lora_target_modules", "q_proj"]])
