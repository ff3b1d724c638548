"""bitsandbytes' on-disk 4-bit format: what transformers writes for a model loaded in 4-bit, read and
written without dequantizing.

`save_pretrained` of a bitsandbytes 4-bit model stores, for every quantized linear `X`:

    X.weight                                   uint8 [n / 2, 1]   two 4-bit codes per byte (first value high)
    X.weight.absmax                            uint8 [n_blocks]   8-bit codes of the block absmax (double quant)
                                               fp32 [n_blocks]    the absmax itself (no double quant)
    X.weight.quant_map                         fp32 [16]          the NF4 (or FP4) code book
    X.weight.nested_absmax                     fp32 [n_blocks / 256]  second-level scales   } double
    X.weight.nested_quant_map                  fp32 [256]         the dynamic 8-bit code      } quant only
    X.weight.quant_state.bitsandbytes__nf4     uint8 [bytes]      JSON: quant_type, blocksize, dtype, shape,
                                                                  nested_blocksize, nested_dtype, nested_offset

and `quantization_config` (quant_method "bitsandbytes", load_in_4bit) in config.json. These are
exactly the pieces of our QuantState (qlora/nf4.py) under other names, so the round trip is a renaming:
the bytes are the same (tests/test_bnb_format.py checks both directions against transformers).
"""

import json

import torch

from qlora.linear4bit import Linear4bit
from qlora.nf4 import QuantState

SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")   # beside X.weight
STATE_KEY = "quant_state.bitsandbytes__"                                 # + "nf4" or "fp4"


def is_prequantized(config: dict) -> bool:
    """config.json says its linear weights are stored in bitsandbytes' 4-bit format."""
    q = config.get("quantization_config") or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def is_quant_key(name: str) -> bool:
    """A tensor that belongs to a quantized weight's state rather than being a weight itself."""
    return name.rsplit(".", 1)[-1] in SUFFIXES or STATE_KEY in name


def tensor_names(weight_name: str, stored: set[str]) -> dict[str, str]:
    """The state tensors of `weight_name` ("X.weight") among `stored` names: suffix -> full name."""
    found = {s: f"{weight_name}.{s}" for s in SUFFIXES if f"{weight_name}.{s}" in stored}
    state = [n for n in stored if n.startswith(f"{weight_name}.{STATE_KEY}")]
    if len(state) != 1 or "absmax" not in found or "quant_map" not in found:
        raise ValueError(f"{weight_name} is stored in 4-bit but its quantization state is incomplete "
                         f"(need .absmax, .quant_map and one .{STATE_KEY}*): the checkpoint is damaged")
    found["state"] = state[0]
    return found


def linear4bit_from_bnb(packed: torch.Tensor, tensors: dict[str, torch.Tensor], device,
                        compute_dtype: torch.dtype) -> Linear4bit:
    """X.weight (packed uint8) and its state tensors (keys as in tensor_names) -> Linear4bit, bytes as stored."""
    meta = json.loads(bytes(tensors["state"].tolist()).decode("utf-8"))
    shape = torch.Size(meta["shape"])
    if packed.dtype != torch.uint8 or packed.numel() != (shape.numel() + 1) // 2:
        raise ValueError(f"4-bit weight of shape {list(shape)} should hold {(shape.numel() + 1) // 2} uint8 "
                         f"bytes, found {packed.numel()} {packed.dtype}: only bnb_4bit_quant_storage uint8 loads")
    move = lambda t: t.to(device)
    double_quant = "nested_absmax" in tensors
    state = QuantState(
        absmax=move(tensors["absmax"]), shape=shape, dtype=getattr(torch, meta["dtype"]),
        blocksize=meta["blocksize"], code=move(tensors["quant_map"]), quant_type=meta["quant_type"],
        absmax2=move(tensors["nested_absmax"]) if double_quant else None,
        code2=move(tensors["nested_quant_map"]) if double_quant else None,
        # JSON holds the fp32 offset as a Python float, which round-trips through float32 exactly.
        offset=torch.tensor(meta["nested_offset"], dtype=torch.float32, device=device) if double_quant else None,
        **({"blocksize2": meta["nested_blocksize"]} if double_quant else {}))
    return Linear4bit(move(packed.reshape(-1)), state, compute_dtype=compute_dtype)


def bnb_tensors(layer: Linear4bit, weight_name: str) -> dict[str, torch.Tensor]:
    """A Linear4bit -> the tensors transformers + bitsandbytes save for it under `weight_name` ("X.weight")."""
    s = layer.state
    meta = {"quant_type": s.quant_type, "blocksize": s.blocksize, "dtype": str(s.dtype).removeprefix("torch."),
            "shape": list(s.shape)}
    out = {weight_name: layer.packed.reshape(-1, 1), f"{weight_name}.absmax": s.absmax,
           f"{weight_name}.quant_map": s.code}
    if s.double_quant:
        meta.update(nested_blocksize=s.blocksize2, nested_dtype="float32", nested_offset=s.offset.item())
        out[f"{weight_name}.nested_absmax"] = s.absmax2
        out[f"{weight_name}.nested_quant_map"] = s.code2
    out[f"{weight_name}.{STATE_KEY}{s.quant_type}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")),
                                                                    dtype=torch.uint8)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def quantization_config(layer: Linear4bit) -> dict:
    """config.json's quantization_config for a model of such layers, as transformers writes it."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": layer.quant_type, "bnb_4bit_use_double_quant": layer.absmax2 is not None,
            "bnb_4bit_compute_dtype": str(layer.compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None}
