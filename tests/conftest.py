"""Shared fixtures: tiny random Llama checkpoints written by transformers, and a tiny tokenizer.

Other test files can import the plain functions: `from conftest import write_tiny_llama`.
"""

from pathlib import Path

import warnings

import pytest
import torch

# ../shared/data beside the repository (absent in a user's clone: tests that need it skip).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LLAMA2_TOKENIZER = SHARED_DATA / "llama2-tokenizer.model"
STORIES260K = SHARED_DATA / "stories260K"

# hidden 64, 2 layers, vocab 128; the variants add what Llama 2 / 3.x checkpoints differ in.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, initializer_range=0.1)
VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16)),
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(num_key_value_heads=2, head_dim=32),   # head_dim != hidden / heads
}


def write_tiny_llama(path, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides) -> Path:
    """Save a random transformers LlamaForCausalLM (TINY config + overrides) with safetensors to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).to(dtype)
    with torch.no_grad():  # HF initialises norms to 1; random ones catch a norm applied in the wrong place
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = Path(path)
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


@pytest.fixture
def tiny_llama(tmp_path):
    """A function (variant name or overrides) -> directory of a tiny random HF Llama checkpoint."""
    def make(variant: str = "mha", **overrides):
        return write_tiny_llama(tmp_path / variant, **{**VARIANTS[variant], **overrides})
    return make


def train_tiny_sentencepiece(path, vocab_size: int = 320) -> Path:
    """Train a small BPE sentencepiece model (Llama-like settings) on a few sentences; returns the .model path."""
    import sentencepiece as spm

    path = Path(path)
    text = path.with_suffix(".txt")
    sentences = ["The quick brown fox jumps over the lazy dog.", "QLoRA fine-tunes a 4-bit model with LoRA.",
                 "Tiny tokenizers are trained in tests.", "Numbers: 1234567890.", "Hello world, hello tests!"]
    text.write_text("\n".join(sentences * 20))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.with_suffix("")), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    return path.with_suffix(".model")


def bitsandbytes_on_its_generic_cpu_path():
    """Make bitsandbytes, where the tests use it as a reference, compute the same on every CPU.

    bitsandbytes 0.50.2 picks its CPU code by the CPU's features, in two places the tests reach:
    - With AVX512-BF16, an eval-mode, no-grad `bnb.nn.Linear4bit.forward` repacks its weight for a
      fused CPU GEMM (nn/modules.py: `self.support_avx512bf16_for_cpu = has_avx512bf16()`); the repack
      breaks on out_features not divisible by 32 and rounds differently otherwise.
    - With AVX-512F, the C dequantizer behind `dequantize_4bit` (csrc/cpu_ops.cpp,
      `dequantizeBlockwise4bitCpu`) takes a vector path that assumes every row holds whole blocks: it
      returns wrong values when a row's length is a multiple of 32 but not of the blocksize (seen for
      32x32 and 64x96 weights at blocksize 64).
    Both are switched to what bitsandbytes runs on a CPU without those features: no repack (the flag
    read in Linear4bit.__init__), and its generic PyTorch dequantizer (backends/default/ops.py, called
    without its torch.compile wrapper so each new shape does not recompile). Same math, any CPU.
    """
    try:
        import bitsandbytes.nn.modules as bnb_modules
        from bitsandbytes.backends.default import ops as bnb_default
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:
        return
    bnb_modules.has_avx512bf16 = lambda: False
    compute = bnb_default._dequantize_4bit_compute.__wrapped__

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        code = _get_4bit_code(quant_type, A.device)
        return compute(A.view(torch.uint8).reshape(-1), absmax, code, blocksize, shape, dtype)

    with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)


bitsandbytes_on_its_generic_cpu_path()


def float64_lora_llama(variant: str = "mha", seed: int = 0, r: int = 4):
    """Our Llama with the TINY config (+ a VARIANTS entry), LoRA on every linear layer, in float64.

    B is random (not PEFT's zeros) so the adapters change the output and every A and B gets a
    gradient; dropout 0 so the exact comparisons are deterministic.
    """
    from llama.model import Llama, LlamaConfig

    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{k: v for k, v in {**TINY, **VARIANTS[variant]}.items()
                                 if k != "initializer_range"}))
    return random_lora_float64(model, r)


def random_lora_float64(model, r: int):
    """model with N(0, 0.1) weights, LoRA (r, alpha 2r, random B, no dropout) on every linear layer, float64."""
    from qlora.lora import apply_lora, lora_layers

    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    apply_lora(model, "all-linear", r=r, alpha=2 * r, verbose=False)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.normal_(0, 0.1)
    return model.double()


# Falcon: hidden 72 = 6 heads of 12, 2 layers, vocab 128; the variants are the shapes FalconConfig describes.
TINY_FALCON = dict(vocab_size=128, hidden_size=72, num_attention_heads=6, num_hidden_layers=2,
                   max_position_embeddings=256, layer_norm_epsilon=1e-5, bos_token_id=11, eos_token_id=11,
                   initializer_range=0.1)
FALCON_VARIANTS = {
    "7b": {},                                                        # multi-query, parallel, one LayerNorm
    "40b": dict(new_decoder_architecture=True, num_kv_heads=2),      # grouped K/V, ln_attn + ln_mlp
    "sequential": dict(parallel_attn=False),                         # x += attn(ln1 x); x += mlp(ln2 x)
    "mha": dict(multi_query=False, bias=True),                       # one K/V per head, biased linears
}


def write_tiny_falcon(path, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides) -> Path:
    """Save a random transformers FalconForCausalLM (TINY_FALCON + overrides) with safetensors to `path`."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(seed)
    model = FalconForCausalLM(FalconConfig(**{**TINY_FALCON, **overrides})).to(dtype)
    with torch.no_grad():  # random LayerNorms and biases catch one applied in the wrong place
        for name, p in model.named_parameters():
            if "ln" in name.split(".")[-2] or "layernorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.2, 0.2)
            elif name.endswith("bias"):
                p.uniform_(-0.2, 0.2)
    path = Path(path)
    kwargs = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def float64_lora_falcon(variant: str = "7b", seed: int = 0, r: int = 4):
    """Our Falcon with the TINY_FALCON config (+ a FALCON_VARIANTS entry), as float64_lora_llama."""
    from falcon.model import Falcon, FalconConfig

    torch.manual_seed(seed)
    model = Falcon(FalconConfig(**{k: v for k, v in {**TINY_FALCON, **FALCON_VARIANTS[variant]}.items()
                                   if k != "initializer_range"}))
    return random_lora_float64(model, r)


@pytest.fixture
def tiny_falcon(tmp_path):
    """A function (variant name or overrides) -> directory of a tiny random HF Falcon checkpoint."""
    def make(variant: str = "7b", **overrides):
        return write_tiny_falcon(tmp_path / f"falcon-{variant}", **{**FALCON_VARIANTS[variant], **overrides})
    return make


# train.py end to end (tests/test_train.py, tests/test_distributed.py): a tiny config.json, 160 built-in
# SQL rows and a 512-piece tokenizer trained on them.
TRAIN_MODEL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
               "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def write_train_inputs(root: Path) -> Path:
    """root/rows.jsonl, root/tiny.json and root/tok.model for train.py runs -> root."""
    import json
    from llama.tokenizer import train_tokenizer
    from qlora.data import format_row
    from qlora.sql_dataset import sql_rows, write_jsonl

    rows = sql_rows(160, seed=1)
    write_jsonl(rows, root / "rows.jsonl")
    (root / "tiny.json").write_text(json.dumps(TRAIN_MODEL))
    train_tokenizer(["".join(format_row(r, "context_qa")) for r in rows], 512, root / "tok.model")
    return root
