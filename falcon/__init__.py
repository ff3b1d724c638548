"""A pure-PyTorch Falcon: model and checkpoint loading (optionally NF4); generation is llama/'s."""

from falcon.load import load_falcon, load_model, random_model
from falcon.model import Falcon, FalconConfig

__all__ = ["Falcon", "FalconConfig", "load_falcon", "load_model", "random_model"]
