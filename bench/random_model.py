"""A Llama-2-7B-shaped checkpoint with random weights, written by transformers, for the GPU benchmarks;
and the config.json shapes of the larger models (bench/large.py builds those on the GPU instead).

    write_random_checkpoint(path)                # 7B shapes, bf16, sharded safetensors (~13.5 GB)
    write_random_checkpoint(path, LLAMA2_13B)    # 13B shapes (~26 GB)
    write_random_checkpoint(path, LLAMA3_8B)     # Llama-3-8B shapes (~16 GB)
    write_random_checkpoint(path, TINY)          # the same code path at test size, on the CPU

The benchmarks load these files through our loader and through transformers + bitsandbytes, so
both sides read the same bytes. Random weights: speed and memory do not depend on their values.
"""

import json
import shutil
from pathlib import Path

import torch

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False)
TINY = dict(LLAMA2_7B, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=8, vocab_size=512)
LLAMA2_13B = dict(LLAMA2_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40)
# CodeLlama-34B's shapes (grouped-query attention, rope_theta 1e6) with Llama 2's vocabulary, as issue 23 asks.
CODELLAMA_34B = dict(LLAMA2_7B, hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                     num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=16384,
                     rope_theta=1000000.0)
# Llama-3-8B: 128256-token vocabulary, grouped-query attention (8 KV heads), rope_theta 5e5 (bench/long_context.py).
LLAMA3_8B = dict(LLAMA2_7B, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0)
LLAMA2_70B = dict(LLAMA2_7B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8)


def write_random_checkpoint(path, shape: dict = LLAMA2_7B, seed: int = 0) -> Path:
    """Write config.json + sharded model safetensors to `path` unless a finished one is there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        written = json.loads((path / "config.json").read_text())
        rope = written.get("rope_parameters") or {}      # transformers 5 keeps rope_theta there
        if all(written.get(key, rope.get(key)) == value for key, value in shape.items()):   # 7B, 8B: one hidden_size
            return path
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, torch_dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):          # initialising 6.7B parameters on the CPU takes minutes
        model = LlamaForCausalLM(config).to(torch.bfloat16)   # 13B: 52 GB in fp32 first, on an H200
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="2GB", safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if path.exists():                   # an unfinished or different checkpoint
        shutil.rmtree(path)
    tmp.replace(path)
    return path
