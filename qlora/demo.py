"""What the built-in demo job needs when no real checkpoint is given: a randomly initialised Llama
built from a config.json, and a small sentencepiece tokenizer trained on the dataset itself.

The demo model knows nothing before training; it shows that every part of the QLoRA pipeline runs
(and that the loss falls) in a few minutes on a laptop CPU. For a real job pass a checkpoint.
"""

import json
import os
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from llama.load import quantize_linears
from llama.model import Llama, LlamaConfig


def random_llama(config_path: str | Path, device, dtype: torch.dtype, load_in_4bit: bool,
                 seed: int = 0) -> Llama:
    """A Llama with N(0, 0.02) weights (as HF initialises them), frozen, projections in NF4 if asked.

    Only lm_head differs: N(0, 1/hidden_size), rows of norm ~1. With 0.02 a small model's logits
    could never leave about +-1 (the final RMSNorm fixes the hidden norm), so a frozen random head
    would cap how far the loss can fall whatever the adapters learn.
    """
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} not found: pass a checkpoint directory, a hub id "
                                "or a config.json")
    config = LlamaConfig.from_hf(json.loads(path.read_text()))
    generator = torch.Generator().manual_seed(seed)
    model = Llama(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                std = config.hidden_size ** -0.5 if name == "lm_head.weight" else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    model = model.to(device=device, dtype=dtype).requires_grad_(False)
    return quantize_linears(model, dtype) if load_in_4bit else model


def train_tokenizer(texts: list[str], vocab_size: int, out_path: str | Path) -> Path:
    """Train a BPE sentencepiece model on `texts` with Llama's special ids (unk 0, bos 1, eos 2)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(t.replace("\n", " ") for t in texts))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tok"), vocab_size=vocab_size,
            model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
            character_coverage=1.0, num_threads=2, minloglevel=2)
        tmp_out = out_path.with_suffix(".tmp")
        tmp_out.write_bytes((Path(tmp) / "tok.model").read_bytes())
        os.replace(tmp_out, out_path)
    return out_path
