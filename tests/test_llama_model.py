"""llama/model.py against transformers' LlamaForCausalLM on tiny random checkpoints (fp32, CPU)."""

import json

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from conftest import VARIANTS
from llama.load import load_llama
from llama.model import LlamaConfig, RopeScaling, rope_inv_freq
from qlora.linear4bit import Linear4bit

# Published config.json files (meta-llama/Llama-2-7b-hf and Llama-3.1-8B, as on the Hub).
LLAMA2_7B = {
    "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}


def _hf_and_ours(directory, dtype=torch.float32):
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").eval()
    return hf, load_llama(directory, dtype=dtype)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("hf", [LLAMA2_7B, LLAMA31_8B], ids=["llama2-7b", "llama3.1-8b"])
def test_config_from_hf_reads_published_configs_like_transformers(hf):
    ours, ref = LlamaConfig.from_hf(hf), HFLlamaConfig(**hf)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, field) == getattr(ref, field), field
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    if ref.rope_parameters["rope_type"] == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            assert getattr(ours.rope_scaling, k) == ref.rope_parameters[k]
    else:
        assert ours.rope_scaling is None


def test_config_from_hf_reads_transformers5_rope_parameters(tiny_llama):
    saved = json.loads((tiny_llama("llama3_rope") / "config.json").read_text())
    assert "rope_parameters" in saved                     # transformers 5 writes this, not rope_scaling
    config = LlamaConfig.from_hf(saved)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "linear"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"quantization_config": {"load_in_4bit": True}}, "quantization_config"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
])
def test_config_from_hf_refuses_what_this_model_does_not_implement(change, field):
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_hf({**LLAMA2_7B, **change})


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("variant", list(VARIANTS) + ["sharded"])
def test_logits_match_transformers(tiny_llama, variant):
    directory = tiny_llama("gqa", max_shard_size="20KB") if variant == "sharded" else tiny_llama(variant)
    if variant == "sharded":
        assert (directory / "model.safetensors.index.json").is_file()
    hf, ours = _hf_and_ours(directory)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    # Same ops in the same order as transformers' fp32 path: equal up to fp32 rounding (atol 1e-5 on
    # logits of size ~3; measured: bit-identical on torch 2.13 CPU).
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if variant == "llama3_rope":  # the scaling must matter at these positions, or the test proves nothing
        saved = json.loads((directory / "config.json").read_text())
        plain = LlamaConfig.from_hf({**saved, "rope_parameters": {"rope_theta": 500000.0}})
        assert not torch.allclose(rope_inv_freq(plain), ours.inv_freq)


def test_bf16_logits_match_transformers(tiny_llama):
    directory = tiny_llama("gqa")
    hf, ours = _hf_and_ours(directory, torch.bfloat16)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits.float(), ours(ids).float()
    # bf16 has 8 bits of mantissa: allow 2 bf16 ulps of the largest logit.
    torch.testing.assert_close(got, expected, rtol=0, atol=2 * 2**-7 * expected.abs().max().item())


def test_return_hidden_matches_transformers_last_hidden_state(tiny_llama):
    hf, ours = _hf_and_ours(tiny_llama("tied"))
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf.model(ids).last_hidden_state
        got = ours(ids, return_hidden=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_state_dict_keys_equal_transformers(tiny_llama):
    for variant in ("gqa", "tied"):
        hf, ours = _hf_and_ours(tiny_llama(variant))
        assert list(ours.state_dict()) == list(hf.state_dict())
        if variant == "tied":
            assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_kv_cache_decoding_matches_transformers_full_forward(tiny_llama):
    hf, ours = _hf_and_ours(tiny_llama("llama3_rope"))
    ids = torch.randint(0, 128, (3, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(ids).logits
        ours.setup_cache(batch_size=3, max_len=32)
        pieces = [ours(ids[:, :10], start_pos=0)]                      # prefill
        pieces += [ours(ids[:, t:t + 1], start_pos=t) for t in range(10, 20)]  # one token at a time
        pieces.append(ours(ids[:, 20:30], start_pos=20))               # a chunk after a prefix (masked)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=0, atol=1e-5)


def test_kv_cache_misuse_raises(tiny_llama):
    _, ours = _hf_and_ours(tiny_llama("mha"))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="setup_cache"):
        ours(ids, start_pos=0)
    ours.setup_cache(batch_size=1, max_len=6)
    with pytest.raises(ValueError, match="do not fit the cache"):
        ours(ids, start_pos=4)
    with pytest.raises(ValueError, match="input_ids must be"):
        ours(ids[0])


def test_gradient_checkpointing_gives_transformers_gradients(tiny_llama):
    hf, ours = _hf_and_ours(tiny_llama("gqa"))
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    for model in (hf, ours):
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
    hf(ids, labels=ids).loss.backward()
    ours.gradient_checkpointing = True
    logits = ours(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_projections_can_be_swapped_for_linear4bit(tiny_llama):
    hf, ours = _hf_and_ours(tiny_llama("gqa"))
    attn = ours.model.layers[0].self_attn
    attn.q_proj = Linear4bit.from_linear(attn.q_proj, compute_dtype=torch.float32)
    # reference: transformers with q_proj's weight replaced by the dequantized NF4 weight
    hf.model.layers[0].self_attn.q_proj.weight.data = attn.q_proj.dequantize(torch.float32)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)
