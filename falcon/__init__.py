"""A pure-PyTorch Falcon: model and checkpoint loading (optionally NF4); generation is llama/'s."""

from falcon.load import load_base, load_falcon, load_model
from falcon.model import Falcon, FalconConfig

__all__ = ["Falcon", "FalconConfig", "load_base", "load_falcon", "load_model"]
