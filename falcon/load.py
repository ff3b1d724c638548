"""Load a Hugging Face Falcon checkpoint (optionally in NF4), and pick Llama or Falcon by model_type.

Falcon checkpoints load through llama/load.py's streaming loader (llama.load.load_weights: meta
device, one tensor at a time from the memory-mapped safetensors shards, the four linear layers
quantized on the device as they arrive); only the config differs. Pickle-only checkpoints are
refused there, as for Llama.

Because falcon/ builds on llama/, the functions that choose between the architectures from
config.json's "model_type" live here: load_model (a checkpoint) and load_base (a checkpoint, or a
config.json alone: the demo's randomly initialised base), which train.py and infer.py call.
"""

from pathlib import Path

import torch
import torch.nn as nn

from falcon.model import Falcon, FalconConfig
from llama.load import config_path, is_random_base, load_llama, load_weights, model_dir, quantize_linears, random_llama, read_json
from llama.model import Llama

ARCHITECTURES = {"llama": Llama, "falcon": Falcon}   # config.json's model_type -> the model class


def load_falcon(path_or_repo_id, device="cpu", dtype: torch.dtype = torch.bfloat16, load_in_4bit: bool = False,
                blocksize: int = 64, double_quant: bool = True, quantize=None, place_stored=None) -> Falcon:
    """A local checkpoint directory or a Hub repo id -> Falcon on `device`, every parameter frozen.

    load_in_4bit: query_key_value, dense, dense_h_to_4h and dense_4h_to_h become Linear4bit (NF4,
    double quantization) computing in `dtype`; embeddings (= the tied lm_head) and LayerNorms stay in
    `dtype`, as with transformers + bitsandbytes.
    """
    directory = model_dir(path_or_repo_id)
    return load_weights(Falcon, FalconConfig.from_hf, directory, device, dtype, load_in_4bit, blocksize, double_quant,
                        quantize, place_stored)


def model_class(hf_config: dict) -> type[nn.Module]:
    """The class for a config.json dict: Llama or Falcon, by its model_type."""
    kind = hf_config.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"model_type {kind!r} in config.json is not supported: use a {' or '.join(ARCHITECTURES)} "
                         "checkpoint")
    return ARCHITECTURES[kind]


def load_model(path_or_repo_id, device="cpu", dtype: torch.dtype = torch.bfloat16, load_in_4bit: bool = False,
               blocksize: int = 64, double_quant: bool = True, quantize=None, place_stored=None) -> nn.Module:
    """load_llama or load_falcon, as the checkpoint's config.json says."""
    directory = model_dir(path_or_repo_id)
    load = load_falcon if model_class(read_json(directory / "config.json")) is Falcon else load_llama
    return load(directory, device, dtype, load_in_4bit, blocksize, double_quant, quantize, place_stored)


def random_falcon(config_path: str | Path, device, dtype: torch.dtype, load_in_4bit: bool, seed: int = 0,
                  quantize=None) -> Falcon:
    """A Falcon with N(0, 0.02) weights (as HF initialises them), LayerNorms 1 / 0, frozen, NF4 if asked.

    The output head gets N(0, 1/hidden_size) for the reason llama.load.random_llama gives; tied
    (as Falcon's is), that is the embedding too, which the first LayerNorm rescales anyway.
    """
    config = FalconConfig.from_hf(read_json(Path(config_path)))
    generator = torch.Generator().manual_seed(seed)
    model = Falcon(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif isinstance(model.get_submodule(name.rpartition(".")[0]), nn.LayerNorm):
                p.fill_(1.0)
            else:
                std = config.hidden_size ** -0.5 if p is model.lm_head.weight else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    model = model.to(device=device, dtype=dtype).requires_grad_(False)
    return quantize_linears(model, dtype, quantize) if load_in_4bit else model


def load_base(base_model, device, dtype: torch.dtype, load_in_4bit: bool, seed: int, quantize=None,
              place_stored=None) -> nn.Module:
    """The frozen base model of train.py and infer.py, Llama or Falcon as its config.json says: a
    checkpoint through load_model, or for a config.json the demo's random model drawn with `seed`.
    quantize: what makes each Linear4bit (default llama.load.quantize_weight); place_stored: what a weight a
    checkpoint stores in 4-bit becomes (llama.load.load_weights)."""
    path = config_path(base_model)
    if is_random_base(base_model) and not path.is_file():
        raise FileNotFoundError(f"model config {path} not found: pass a checkpoint directory, a hub id "
                                "or a config.json")
    if not is_random_base(base_model):
        return load_model(base_model, device, dtype, load_in_4bit, quantize=quantize, place_stored=place_stored)
    make = random_falcon if model_class(read_json(path)) is Falcon else random_llama
    return make(path, device, dtype, load_in_4bit, seed, quantize)
