"""LoRA adapters as files, and merged export (QLoRA eq. 5 folded into the weights).

Adapter files use PEFT's layout (adapter_config.json + adapter_model.safetensors) so an adapter
trained here loads in peft.PeftModel, and the other way round. A merged model is written as a
Hugging Face safetensors checkpoint (config.json + model*.safetensors) that from_pretrained loads.
"""

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from qlora import bnb_format
from qlora.atomic import write_dir
from qlora.errors import read_json
from qlora.linear4bit import Linear4bit
from qlora.lora import LoRALinear, apply_lora, base_weight, find_lora_targets, lora_layers

PEFT_PREFIX = "base_model.model."       # PeftModel wraps the CausalLM: base_model.model.<path>
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------- merged export

@torch.no_grad()
def merge_targets(model: nn.Module) -> dict:
    """The outermost LoRALinear / Linear4bit modules by name: each becomes one plain weight (and bias)
    in a merged checkpoint, in place of its internal keys (base.packed, lora_a, ...)."""
    special = {}
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, Linear4bit)) and not any(name.startswith(p + ".") for p in special):
            special[name] = m
    return special


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16, device="cpu") -> dict:
    """Hugging Face-layout tensors of the model with every adapter merged in: `<path>.weight` =
    dequant(W) + scaling * B @ A (computed in fp32, rounded once to `dtype`); 4-bit layers without
    an adapter are dequantized; other floating-point tensors are cast to `dtype`."""
    special = merge_targets(model)
    out, done = {}, set()
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts)) if ".".join(parts[:i]) in special), None)
        if owner is None:
            out[key] = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
        elif owner not in done:
            done.add(owner)
            m = special[owner]
            base = m.base if isinstance(m, LoRALinear) else m
            weight = m.merged_weight() if isinstance(m, LoRALinear) else base_weight(m)
            prefix = owner + "." if owner else ""
            out[prefix + "weight"] = weight.to(device, dtype)
            if base.bias is not None:
                out[prefix + "bias"] = base.bias.detach().to(device, dtype)
    return out


def _parse_size(size) -> int:
    if isinstance(size, int) and size > 0:
        return size
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size {size!r} is not a size: use bytes (int) or a string like '5GB'")
    return int(float(match.group(1)) * units[match.group(2)])


def save_merged(model: nn.Module, config_dict: dict, out_dir, max_shard_size="5GB",
                dtype: torch.dtype = torch.bfloat16, overwrite: bool = False, load_in_4bit: bool = False,
                blocksize: int = 64, double_quant: bool = True, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a merged model that transformers' from_pretrained loads: config.json and
    model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json.

    load_in_4bit: each merged linear weight (rounded to `dtype`) is quantized to NF4 again and written
    in bitsandbytes' 4-bit format (qlora/bnb_format.py), which transformers + bitsandbytes load.
    extra_files {name: bytes} (e.g. tokenizer.model) go into the same directory in the same atomic write.
    """
    limit = _parse_size(max_shard_size)
    config = {k: v for k, v in config_dict.items() if k not in ("quantization_config", "torch_dtype")}
    config["dtype"] = str(dtype).removeprefix("torch.")
    state = merged_state_dict(model, dtype)
    if load_in_4bit:                                  # in place, so that the shards keep their order
        targets = {f"{name}.weight" if name else "weight" for name in merge_targets(model)}
        quantized = {}
        for key, tensor in state.items():
            if key not in targets:
                quantized[key] = tensor
                continue
            layer = Linear4bit.from_weight(tensor, blocksize=blocksize, double_quant=double_quant,
                                           compute_dtype=dtype)
            quantized.update(bnb_format.bnb_tensors(layer, key))
            config["quantization_config"] = bnb_format.quantization_config(layer)
        state = quantized
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)             # the loader ties it to embed_tokens again
    shards = split_shards(list(state), lambda key: state[key].numel() * state[key].element_size(), limit)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        write_shards(tmp, shards, lambda keys: {key: state[key] for key in keys})

    return write_dir(out_dir, write, overwrite)


def split_shards(items: list, nbytes, limit: int) -> list[list]:
    """items -> consecutive groups of at most `limit` bytes each (nbytes(item)), greedy, in order, as
    transformers cuts a state_dict into files (an item larger than the limit is a group of its own)."""
    shards, size = [[]], 0
    for item in items:
        n = nbytes(item)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def write_shards(directory: Path, shards: list, tensors_of) -> None:
    """Write the shards as transformers does: model.safetensors for one, else
    model-0000i-of-0000n.safetensors + model.safetensors.index.json. tensors_of(shard) -> {key: tensor}
    is asked for one shard at a time, so a writer can bring a shard's tensors to the host only while
    it is written (a 70B's 4-bit bytes are never all in host memory)."""
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        tensors = tensors_of(shard)
        # safetensors refuses tensors that share memory (a tied head whose config does not say so;
        # the code books 4-bit layers share).
        seen = set()
        for key, tensor in tensors.items():
            ptr = tensor.untyped_storage().data_ptr()
            tensors[key] = tensor.clone() if ptr in seen else tensor.contiguous()
            seen.add(ptr)
        filename = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        weight_map.update({key: filename for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------- PEFT adapter files

def adapter_state_dict(model: nn.Module, values: dict | None = None) -> dict:
    """The adapter weights under PEFT's names: base_model.model.<path>.lora_A.weight / .lora_B.weight.

    values: {parameter name (<path>.lora_a): tensor} to use instead of the layers' own (FSDP2's
    shards, gathered whole by qlora/distributed.py)."""
    out = {}
    for name, layer in lora_layers(model).items():
        a, b = (values[f"{name}.lora_a"], values[f"{name}.lora_b"]) if values else (layer.lora_a, layer.lora_b)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach()
    return out


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: str | None = None,
                 overwrite: bool = False, extra_files: dict[str, bytes] | None = None,
                 values: dict | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads.

    extra_files {name: bytes} go into the same directory in the same atomic write (PEFT ignores them).
    values: the weights to write when not the layers' own (see adapter_state_dict).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: call apply_lora(model, ...) first")
    settings = {(m.r, m.alpha, _dropout_p(m), m.use_rslora) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers differ in (r, alpha, dropout, use_rslora) {sorted(settings)}: "
                         "PEFT's file holds one setting for all layers")
    (r, alpha, dropout, use_rslora), = settings
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
        "target_modules": sorted({name.split(".")[-1] for name in layers}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False, "revision": None,
    }
    tensors = {k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model, values).items()}

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return write_dir(out_dir, write, overwrite)


def _dropout_p(layer: LoRALinear) -> float:
    return layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json, checked for the LoRA features this file implements."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a directory written by save_adapter or "
                                "PEFT's save_pretrained")
    config = read_json(path, "adapter config")
    if not isinstance(config, dict):
        raise ValueError(f"adapter config {path} holds a JSON {type(config).__name__}, not an object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, only 'LORA' adapters load here")
    # PEFT options that change which weights exist or how they combine; plain LoRA leaves them unset.
    for key in ("use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "layers_to_transform",
                "rank_pattern", "alpha_pattern", "exclude_modules", "target_parameters", "trainable_token_indices"):
        if config.get(key) not in (None, False, {}, []):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported here (plain LoRA only)")
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(f"{path}: target_modules is a regular expression ({targets!r}), which is not "
                         "supported here: list the module names instead")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} is not supported here; only bias 'none'")
    return config


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir, dtype: torch.dtype | None = None) -> nn.Module:
    """Apply LoRA to `model` as adapter_config.json says and load the weights; returns the model.

    dtype: adapter storage dtype; None keeps the file's. The model is left untouched on error.
    """
    config = read_adapter_config(adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found (adapter_model.bin is not supported: "
                                "re-save the adapter with safetensors)")
    tensors = _read_safetensors(weights_path)
    hint = f"(adapter made for base model {config.get('base_model_name_or_path')!r})"

    # Which layers the file holds, by module path.
    paths = {}
    for key in tensors:
        match = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", key)
        if not match:
            raise ValueError(f"{weights_path}: unexpected tensor {key!r}; only lora_A/lora_B weights load here")
        paths.setdefault(match.group(1), {})[match.group(2)] = tensors[key]
    targets = config["target_modules"]
    try:
        names = find_lora_targets(model, targets)
    except ValueError as e:
        raise ValueError(f"adapter {adapter_dir} does not fit this model {hint}: {e}") from None
    if set(names) != set(paths):
        n_file, n_model = _layer_count(paths), _layer_count(names)
        extra, missing = sorted(set(paths) - set(names)), sorted(set(names) - set(paths))
        what = f"the adapter has {n_file} layers, the model {n_model}" if n_file != n_model else \
               f"unmatched layers: in file only {extra[:3]}, in model only {missing[:3]}"
        raise ValueError(f"adapter {adapter_dir} does not fit this model {hint}: {what}")

    r = config["r"]
    for name in names:
        base = model.get_submodule(name)
        want = {"A": (r, base.in_features), "B": (base.out_features, r)}
        for ab, shape in want.items():
            got = paths[name].get(ab)
            if got is None:
                raise ValueError(f"{weights_path}: lora_{ab} of {name} is missing")
            if tuple(got.shape) != shape:
                raise ValueError(f"adapter {adapter_dir} does not fit this model {hint}: lora_{ab} of {name} "
                                 f"has shape {list(got.shape)}, the model needs {list(shape)}")

    dtype = dtype or next(iter(tensors.values())).dtype
    apply_lora(model, names, r, config["lora_alpha"], config.get("lora_dropout", 0.0),
               config.get("use_rslora", False), dtype, verbose=False)
    for name, layer in lora_layers(model).items():
        layer.lora_a.copy_(paths[name]["A"])
        layer.lora_b.copy_(paths[name]["B"])
    return model


def _read_safetensors(path: Path) -> dict:
    """Every tensor of a safetensors file; a ValueError naming the file if it is not one."""
    try:
        with safe_open(path, "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, or an OSError for a header too short
        with open(path, "rb") as f:
            head = f.read(2)
        what = ("a pickle file (torch.save), which can run code when loaded" if head[:1] == b"\x80" or head == b"PK"
                else f"not a readable safetensors file ({' '.join(str(e).split())[:120]}): truncated or damaged")
        raise ValueError(f"{path} is {what}; re-save the adapter with save_adapter or PEFT's "
                         "save_pretrained(safe_serialization=True)") from None


def _layer_count(paths) -> int:
    layers = {int(m.group(1)) for p in paths if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", p))}
    return max(layers) + 1 if layers else 0
