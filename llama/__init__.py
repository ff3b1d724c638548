"""A pure-PyTorch Llama: model, checkpoint loading (optionally NF4), tokenizer and generation."""

from llama.generate import generate
from llama.load import load_llama, resident_bytes
from llama.model import Llama, LlamaConfig
from llama.tokenizer import Tokenizer

__all__ = ["Llama", "LlamaConfig", "Tokenizer", "generate", "load_llama", "resident_bytes"]
