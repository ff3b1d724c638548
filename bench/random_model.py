"""A Llama-2-7B-shaped checkpoint with random weights, written by transformers, for the GPU benchmarks;
and the config.json shapes of the larger models (bench/large.py builds those on the GPU instead).

    write_random_checkpoint(path)                # 7B shapes, bf16, sharded safetensors (~13.5 GB)
    write_random_checkpoint(path, LLAMA2_13B)    # 13B shapes (~26 GB)
    write_random_checkpoint(path, LLAMA3_8B)     # Llama-3-8B shapes (~16 GB)
    write_random_checkpoint(path, TINY)          # the same code path at test size, on the CPU
    write_prequantized_checkpoint(path, LLAMA2_70B)   # 70B already in NF4 (bitsandbytes' format, ~37 GB)

The benchmarks load these files through our loader and through transformers + bitsandbytes, so
both sides read the same bytes. Random weights: speed and memory do not depend on their values.
A 70B checkpoint in bf16 is 138 GB, more than the devices' disks; write_prequantized_checkpoint draws
the model on the GPU one weight at a time, quantized as it goes (llama.load.random_quantized_llama),
and writes it in bitsandbytes' 4-bit format, which train.py loads as it is (issue #19's 70B run).
"""

import json
import shutil
from pathlib import Path

import torch
from qlora import bnb_format
from qlora.adapter import split_shards, write_shards
from qlora.atomic import write_dir
from qlora.linear4bit import Linear4bit

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


def write_prequantized_checkpoint(path, shape: dict = LLAMA2_70B, seed: int = 0, shard_bytes: int = 4 * 2**30,
                                  device=None) -> Path:
    """Write a random model of `shape` in NF4 + double quantization (bitsandbytes' format, bf16 for the
    rest) to `path` unless a finished one of that shape is there. The 4-bit model is built on `device`
    (default: the GPU if there is one); each shard's tensors come to the host only while it is written."""
    from llama.load import random_quantized_llama
    from llama.model import LlamaConfig

    path = Path(path)
    if (path / "config.json").is_file():
        written = json.loads((path / "config.json").read_text())
        if all(written.get(key) == value for key, value in shape.items()) and "quantization_config" in written:
            return path
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = random_quantized_llama(LlamaConfig.from_hf(shape), device, torch.bfloat16, seed)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    parts = [*layers.items(), *model.named_parameters()]          # (name, Linear4bit or dense tensor)
    shards = split_shards(parts, lambda item: item[1].packed.numel() if isinstance(item[1], Linear4bit)
                          else item[1].numel() * item[1].element_size(), shard_bytes)
    config = dict(shape, model_type="llama", architectures=["LlamaForCausalLM"], dtype="bfloat16",
                  quantization_config=bnb_format.quantization_config(next(iter(layers.values()))))

    def tensors(shard) -> dict[str, torch.Tensor]:                 # on the host, one shard at a time
        out = {}
        for name, part in shard:
            if isinstance(part, Linear4bit):
                out.update(bnb_format.bnb_tensors(part, f"{name}.weight"))
            else:
                out[name] = part.detach().cpu()
        return out

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_shards(tmp, shards, tensors)

    write_dir(path, write, overwrite=True)
    del model, layers, parts, shards
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return path
