"""Load a Hugging Face Llama checkpoint (safetensors) into llama.model.Llama, optionally in NF4; or
build the demo's randomly initialised Llama from a config.json, or a random NF4 Llama of any size
drawn and quantized on the device weight by weight (random_quantized_llama: the 70B benchmark).
load_weights does the loading for any architecture of this project (falcon/load.py uses it for Falcon).

Streaming, so that a 7B model quantizes on a GPU with little more memory than its 4-bit size:
the model is built on the meta device (no memory), then each tensor is read from the memory-
mapped safetensors file, cast to `dtype` and moved to `device`. With load_in_4bit the seven block
projections are quantized on the device a few rows at a time (NF4 + double quantization, QLoRA
paper section 3) and never exist whole in 16 bits there; embeddings, norms and lm_head stay in
`dtype`, as in the paper's setup and in transformers + bitsandbytes.

A checkpoint saved in 4-bit by transformers + bitsandbytes (config.json's quantization_config, e.g. the
`*-bnb-4bit` repos) loads as stored, without dequantizing: its bytes become our Linear4bit's
(qlora/bnb_format.py); its blocksize and double quantization win over the arguments.
"""

from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import snapshot_download
from safetensors import safe_open

from llama.model import Llama, LlamaConfig, rope_inv_freq
from qlora import bnb_format, errors, progress
from qlora.linear4bit import QUANT_CHUNK_NUMEL, Linear4bit
from qlora.nf4 import BLOCKSIZES, FLOAT_DTYPES

HUB_FILES = ["*.safetensors", "*.json", "tokenizer.model"]


def load_llama(path_or_repo_id, device="cpu", dtype: torch.dtype = torch.bfloat16, load_in_4bit: bool = False,
               blocksize: int = 64, double_quant: bool = True, quantize=None, place_stored=None) -> Llama:
    """A local checkpoint directory or a Hub repo id -> Llama on `device`, every parameter frozen.

    load_in_4bit: the q/k/v/o/gate/up/down projections become Linear4bit (NF4, `blocksize`, double
    quantization) with compute dtype `dtype`; everything else is stored in `dtype`. A checkpoint
    stored in 4-bit keeps its own bytes (and is dequantized to `dtype` if load_in_4bit is False).
    quantize: what makes a Linear4bit of a weight (default quantize_weight; FSDP: only this rank's rows);
    place_stored: what a weight stored in 4-bit becomes (load_weights).
    """
    directory = model_dir(path_or_repo_id)
    return load_weights(Llama, LlamaConfig.from_hf, directory, device, dtype, load_in_4bit, blocksize, double_quant,
                        quantize, place_stored)


def load_weights(model_class, read_config, directory: Path, device="cpu", dtype: torch.dtype = torch.bfloat16,
                 load_in_4bit: bool = False, blocksize: int = 64, double_quant: bool = True,
                 quantize=None, place_stored=None) -> nn.Module:
    """model_class(read_config(config.json)) with the tensors of the safetensors files in `directory`.

    Any model of this project whose state_dict keys are the checkpoint's and whose class names its
    block's linear layers in LINEAR_NAMES (llama.model.Llama, falcon.model.Falcon): those are
    quantized when load_in_4bit (a bias read beside them kept); an lm_head tied to the embedding is
    not read from the file but tied again. quantize(weight, device, dtype, blocksize, double_quant)
    makes each Linear4bit (default quantize_weight); place_stored(layer, device) is what a Linear4bit read
    from a checkpoint stored in 4-bit becomes when load_in_4bit (given on the host; default: the layer
    on `device`; FSDP: qlora.distributed.shard_stored, this rank's rows only).
    """
    quantize = quantize or quantize_weight
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported: use torch.bfloat16, torch.float16 or torch.float32")
    if load_in_4bit and blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported: use one of {BLOCKSIZES}")
    hf_config = read_json(directory / "config.json")
    prequantized = bnb_format.is_prequantized(hf_config)
    if "quantization_config" in hf_config and not prequantized:
        method = hf_config["quantization_config"].get("quant_method")
        raise ValueError(f"{directory} is quantized with {method!r}: only dense checkpoints and bitsandbytes "
                         f"4-bit ones load here; use the model's dense checkpoint")
    config = read_config({k: v for k, v in hf_config.items() if k != "quantization_config"})
    files = safetensors_files(directory)
    device = torch.device(device)
    handles = {file: safe_open(file, framework="pt", device="cpu") for file in files} if prequantized else {}
    stored = {name: file for file, f in handles.items() for name in f.keys()}   # a weight's state may sit
                                                                                 # in another shard

    kind = model_class.__name__
    with torch.device("meta"):
        model = model_class(config)                        # shapes only, no memory
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied lm_head counted once
    # The embedding's name when lm_head is tied to it (model.embed_tokens / transformer.word_embeddings).
    tied = next((name for name, p in model.named_parameters() if p is model.lm_head.weight), None)
    tied = None if tied == "lm_head.weight" else tied
    loaded = set()
    bar = progress.bar(total=_count_tensors(files), desc="quantizing" if load_in_4bit else "loading", unit="tensor")
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                bar.update()
                if name.endswith("rotary_emb.inv_freq"):   # a buffer old transformers versions saved
                    continue
                if name == "lm_head.weight" and tied:
                    continue                               # tied: the head is the embedding
                if prequantized and bnb_format.is_quant_key(name):
                    continue                               # read with its weight below
                if name not in expected:
                    raise ValueError(f"unexpected tensor {name!r} in {file.name}: the checkpoint does not "
                                     f"match a {kind} with this config.json")
                module_name, _, attr = name.rpartition(".")
                parent_name, _, child = module_name.rpartition(".")
                layer = None
                if prequantized and f.get_slice(name).get_dtype() == "U8":
                    names = bnb_format.tensor_names(name, stored.keys())
                    tensors = {k: handles[stored[n]].get_tensor(n) for k, n in names.items()}
                    keep = place_stored if load_in_4bit else None
                    layer = bnb_format.linear4bit_from_bnb(f.get_tensor(name), tensors, "cpu" if keep else device,
                                                           dtype)
                    layer = keep(layer, device) if keep else layer
                    shape = tuple(layer.state.shape)
                else:
                    shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ValueError(f"tensor {name!r} in {file.name} has shape {shape} but config.json implies "
                                     f"{expected[name]}: the weights and config.json do not belong together")
                if layer is not None and load_in_4bit:     # stored in 4-bit: kept as stored
                    _keep_bias(model.get_submodule(module_name), layer)
                    setattr(model.get_submodule(parent_name), child, layer)
                elif layer is not None:                    # stored in 4-bit, asked for dense weights
                    weight = nn.Parameter(layer.dequantize(dtype), requires_grad=False)
                    setattr(model.get_submodule(module_name), attr, weight)
                elif load_in_4bit and child in model_class.LINEAR_NAMES and attr == "weight":
                    try:
                        layer = quantize(f.get_tensor(name), device, dtype, blocksize, double_quant)
                    except ValueError as e:
                        raise ValueError(f"cannot quantize {name!r}: {e}") from e
                    _keep_bias(model.get_submodule(module_name), layer)
                    setattr(model.get_submodule(parent_name), child, layer)
                else:
                    tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
                loaded.add(name)
    bar.close()

    missing = sorted(expected.keys() - loaded)
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint in {directory}, e.g. {missing[0]!r}: "
                         f"the files are incomplete or belong to another config.json")
    if tied:
        model.lm_head.weight = model.get_parameter(tied)
    model.inv_freq = rope_inv_freq(config, device)         # the one buffer not in the checkpoint
    return model


def _keep_bias(linear: nn.Module, layer: Linear4bit) -> None:
    """Move a bias already read into the meta nn.Linear over to the Linear4bit replacing it (a bias
    read later is set on the Linear4bit directly)."""
    bias = getattr(linear, "bias", None)
    if bias is not None and not bias.is_meta:
        layer.bias = bias


def is_random_base(base_model) -> bool:
    """Whether base_model names a config.json (the demo: a random Llama built from it) rather than a
    checkpoint directory or a hub id. The one place that tells the two apart."""
    return str(base_model).endswith(".json")


def config_path(base_model) -> Path:
    """The base model's config.json: the file itself for the demo, else the checkpoint's."""
    return Path(base_model) if is_random_base(base_model) else model_dir(base_model) / "config.json"


def quantize_weight(weight: torch.Tensor, device, dtype: torch.dtype, blocksize: int = 64,
                    double_quant: bool = True, chunk_numel: int = QUANT_CHUNK_NUMEL) -> Linear4bit:
    """A [out, in] weight on any device -> Linear4bit on `device`, quantized there in `dtype` (also
    its compute dtype) a few rows at a time: Linear4bit.from_weight as the loader calls it."""
    return Linear4bit.from_weight(weight, None, blocksize, double_quant, compute_dtype=dtype, device=device,
                                  weight_dtype=dtype, chunk_numel=chunk_numel)


def random_llama(config_path: str | Path, device, dtype: torch.dtype, load_in_4bit: bool,
                 seed: int = 0, quantize=None) -> Llama:
    """A Llama with N(0, 0.02) weights (as HF initialises them) built from a config.json, frozen,
    projections in NF4 if asked: the demo's base model, which knows nothing before training.

    Only lm_head differs: N(0, 1/hidden_size), rows of norm ~1. With 0.02 a small model's logits
    could never leave about +-1 (the final RMSNorm fixes the hidden norm), so a frozen random head
    would cap how far the loss can fall whatever the adapters learn.
    """
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} not found: pass a checkpoint directory, a hub id "
                                "or a config.json")
    config = LlamaConfig.from_hf(errors.read_json(path, "model config"))
    generator = torch.Generator().manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = _init_std(name, config)
            if std is None:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    model = model.to(device=device, dtype=dtype).requires_grad_(False)
    return quantize_linears(model, dtype, quantize) if load_in_4bit else model


def _init_std(name: str, config: LlamaConfig) -> float | None:
    """The random models' init of parameter `name`: None for a norm weight (all ones), else the std
    of its normal draw (lm_head 1 / sqrt(hidden): see random_llama)."""
    if name.endswith("norm.weight") or "layernorm" in name:
        return None
    return config.hidden_size ** -0.5 if name == "lm_head.weight" else 0.02


def _random_tensor(shape, std: float | None, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """N(0, std^2) in `dtype` on the generator's device, or ones where std is None (a norm weight)."""
    if std is None:
        return torch.ones(shape, device=generator.device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).mul_(std)


def random_quantized_llama(config: LlamaConfig, device, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           blocksize: int = 64, double_quant: bool = True) -> Llama:
    """A frozen Llama of `config`'s shapes with random weights (random_llama's init), built on `device`
    one weight at a time: each block projection is drawn in `dtype` and quantized to NF4 (+ double
    quantization, compute dtype `dtype`) before the next is drawn; the rest stays dense in `dtype`.

    For benchmarking models whose 16-bit checkpoint would not fit the disk (Llama-2-70B: 138 GB): the
    device never holds more than the 4-bit model, one 16-bit weight and quantize_weight's scratch.
    The weights come from one `device` generator seeded with `seed`, in parameter order.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = Llama(config)                                  # shapes only, no memory
    generator = torch.Generator(device).manual_seed(seed)
    for name, p in list(model.named_parameters()):             # a tied lm_head is listed once
        module_name, _, attr = name.rpartition(".")
        parent_name, _, child = module_name.rpartition(".")
        w = _random_tensor(p.shape, _init_std(name, config), generator, dtype)
        if child in Llama.LINEAR_NAMES and attr == "weight":
            setattr(model.get_submodule(parent_name), child, quantize_weight(w, device, dtype, blocksize, double_quant))
        else:
            setattr(model.get_submodule(module_name), attr, nn.Parameter(w, requires_grad=False))
        del w                                                  # before the next draw: one 16-bit weight at a time
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config, device)             # the one buffer not drawn
    return model


def quantize_linears(model: nn.Module, dtype: torch.dtype, quantize=None) -> nn.Module:
    """Replace every nn.Linear named in model.LINEAR_NAMES by its Linear4bit (bias kept), in place
    (made by quantize(weight, device, dtype), default quantize_weight)."""
    quantize = quantize or quantize_weight
    for name, module in progress.bar(list(model.named_modules()), desc="quantizing", unit="module"):
        parent, _, child = name.rpartition(".")
        if child in model.LINEAR_NAMES and isinstance(module, nn.Linear):
            layer = quantize(module.weight, module.weight.device, dtype)
            layer.bias = module.bias
            setattr(model.get_submodule(parent), child, layer)
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (tied weights counted once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ----------------------------------------------------------------------------- files

def model_dir(path_or_repo_id) -> Path:
    """The directory of a model's weights (a Hugging Face checkpoint): a local directory as is; a Hub repo id ("owner/name") downloaded (safetensors, json, tokenizer)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists():
        raise ValueError(f"{text} is a file: pass the checkpoint directory that holds config.json")
    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory {text} does not exist: pass a local directory "
                                f"or a Hugging Face repo id like meta-llama/Llama-2-7b-hf")
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown or gated repository, network failure
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"cannot get model {text!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
                              "check the repo id, log in for a gated model (huggingface-cli login), or pass a "
                              "local checkpoint directory") from None


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


def _count_tensors(files: list[Path]) -> int:
    """How many tensors the files hold (read from their headers only): the loading bar's total."""
    total = 0
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            total += len(f.keys())
    return total


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} is missing from {path.parent}: a Hugging Face checkpoint needs it")
    return errors.read_json(path)
