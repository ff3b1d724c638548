"""Load a Hugging Face Llama checkpoint (safetensors) into llama.model.Llama, optionally in NF4;
load_weights does the same for any architecture of this project (falcon/load.py uses it).

Streaming, so that a 7B model quantizes on a GPU with little more memory than its 4-bit size:
the model is built on the meta device (no memory), then each tensor is read from the memory-
mapped safetensors file, cast to `dtype` and moved to `device`. With load_in_4bit the seven block
projections are quantized on the device a few rows at a time (NF4 + double quantization, QLoRA
paper section 3) and never exist whole in 16 bits there; embeddings, norms and lm_head stay in
`dtype`, as in the paper's setup and in transformers + bitsandbytes.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import snapshot_download
from safetensors import safe_open

from llama.model import Llama, LlamaConfig, rope_inv_freq
from qlora.linear4bit import Linear4bit
from qlora.nf4 import BLOCKSIZES, FLOAT_DTYPES, QuantState, dynamic_code, nf4_code, quantize_blockwise_8bit, quantize_nf4

HUB_FILES = ["*.safetensors", "*.json", "tokenizer.model"]
QUANT_CHUNK_NUMEL = 2**21  # values quantized at once: quantize_nf4 needs ~23 bytes of scratch each


def load_llama(path_or_repo_id, device="cpu", dtype: torch.dtype = torch.bfloat16, load_in_4bit: bool = False,
               blocksize: int = 64, double_quant: bool = True) -> Llama:
    """A local checkpoint directory or a Hub repo id -> Llama on `device`, every parameter frozen.

    load_in_4bit: the q/k/v/o/gate/up/down projections become Linear4bit (NF4, `blocksize`, double
    quantization) with compute dtype `dtype`; everything else is stored in `dtype`.
    """
    directory = checkpoint_dir(path_or_repo_id)
    config = LlamaConfig.from_hf(read_json(directory / "config.json"))
    return load_weights(Llama, config, directory, device, dtype, load_in_4bit, blocksize, double_quant)


def load_weights(model_class, config, directory: Path, device="cpu", dtype: torch.dtype = torch.bfloat16,
                 load_in_4bit: bool = False, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """model_class(config) with the tensors of the safetensors files in `directory`, streamed.

    Works for any model whose state_dict keys are the checkpoint's and whose class names its linear
    layers in LINEAR_NAMES (llama.model.Llama, falcon.model.Falcon): those are quantized when
    load_in_4bit; an lm_head tied to the embedding is not read from the file but tied again.
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported: use torch.bfloat16, torch.float16 or torch.float32")
    if load_in_4bit and blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported: use one of {BLOCKSIZES}")
    files = safetensors_files(directory)
    device = torch.device(device)
    kind = model_class.__name__

    with torch.device("meta"):
        model = model_class(config)                        # shapes only, no memory
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied lm_head counted once
    # The embedding's name when lm_head is tied to it (model.embed_tokens / transformer.word_embeddings).
    tied = next((name for name, p in model.named_parameters() if p is model.lm_head.weight), None)
    tied = None if tied == "lm_head.weight" else tied
    loaded = set()
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):   # a buffer old transformers versions saved
                    continue
                if name == "lm_head.weight" and tied:
                    continue                               # tied: the head is the embedding
                if name not in expected:
                    raise ValueError(f"unexpected tensor {name!r} in {file.name}: the checkpoint does not "
                                     f"match a {kind} with this config.json")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ValueError(f"tensor {name!r} in {file.name} has shape {shape} but config.json implies "
                                     f"{expected[name]}: the weights and config.json do not belong together")
                module_name, _, attr = name.rpartition(".")
                parent_name, _, child = module_name.rpartition(".")
                if load_in_4bit and child in model_class.LINEAR_NAMES and attr == "weight":
                    try:
                        layer = quantize_weight(f.get_tensor(name), device, dtype, blocksize, double_quant)
                    except ValueError as e:
                        raise ValueError(f"cannot quantize {name!r}: {e}") from e
                    bias = model.get_submodule(module_name).bias  # a bias read before its weight moves over
                    if bias is not None and not bias.is_meta:
                        layer.bias = bias
                    setattr(model.get_submodule(parent_name), child, layer)
                else:
                    tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
                loaded.add(name)

    missing = sorted(expected.keys() - loaded)
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint in {directory}, e.g. {missing[0]!r}: "
                         f"the files are incomplete or belong to another config.json")
    if tied:
        model.lm_head.weight = model.get_parameter(tied)
    model.inv_freq = rope_inv_freq(config, device)         # the one buffer not in the checkpoint
    return model


def quantize_weight(weight: torch.Tensor, device, dtype: torch.dtype, blocksize: int = 64,
                    double_quant: bool = True, chunk_numel: int = QUANT_CHUNK_NUMEL) -> Linear4bit:
    """A [out, in] weight on any device -> Linear4bit on `device`, quantized there a few rows at a time.

    The bytes equal Linear4bit.from_weight(weight.to(device, dtype)): chunks hold whole blocks, so
    every block's absmax is the same; the double quantization then runs once on all the absmax.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    n = weight.numel()
    rows_per_block = blocksize // math.gcd(in_features, blocksize)  # rows that end on a block boundary
    rows = max(rows_per_block, chunk_numel // in_features // rows_per_block * rows_per_block)

    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=device)
    for r in range(0, out_features, rows):
        chunk = weight[r:r + rows].to(device=device, dtype=dtype)
        chunk_packed, chunk_state = quantize_nf4(chunk, blocksize, double_quant=False)
        start = r * in_features                             # a multiple of blocksize, so even
        packed[start // 2:start // 2 + chunk_packed.numel()] = chunk_packed
        absmax[start // blocksize:start // blocksize + chunk_state.absmax.numel()] = chunk_state.absmax
        del chunk, chunk_packed, chunk_state

    state = QuantState(absmax=absmax, shape=weight.shape, dtype=dtype, blocksize=blocksize, code=nf4_code(device))
    if double_quant:                                        # paper section 3, "Double Quantization"
        offset = absmax.mean()
        codes, absmax2 = quantize_blockwise_8bit(absmax - offset)
        state = replace(state, absmax=codes, absmax2=absmax2, code2=dynamic_code(device), offset=offset)
    return Linear4bit(packed, state, compute_dtype=dtype)


def quantize_linears(model: nn.Module, dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Replace every nn.Linear named in model.LINEAR_NAMES by its Linear4bit (bias kept), in place."""
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if child in model.LINEAR_NAMES and isinstance(module, nn.Linear):
            layer = quantize_weight(module.weight, module.weight.device, dtype, blocksize, double_quant)
            layer.bias = module.bias
            setattr(model.get_submodule(parent), child, layer)
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied weights counted once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ----------------------------------------------------------------------------- files

def checkpoint_dir(path_or_repo_id) -> Path:
    """A local directory as is; a Hub repo id ("owner/name") downloaded (safetensors, json, tokenizer)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists():
        raise ValueError(f"{text} is a file: pass the checkpoint directory that holds config.json")
    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory {text} does not exist: pass a local directory "
                                f"or a Hugging Face repo id like meta-llama/Llama-2-7b-hf")
    return Path(snapshot_download(text, allow_patterns=HUB_FILES))


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards named by the index, or model.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        for shard in shards:
            if not (directory / shard).is_file():
                raise FileNotFoundError(f"shard {shard} named in {index.name} is missing from {directory}: "
                                        f"download the checkpoint again")
        return [directory / shard for shard in shards]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise ValueError(f"{directory} holds only pickle weights ({pickles[0]}), which can run code when "
                         f"loaded: only safetensors load here; convert them or download the safetensors files")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing from {path.parent}: a Hugging Face checkpoint needs it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): download it again") from e
