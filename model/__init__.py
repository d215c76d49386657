"""Fathom's model: `from model import Transformer, ModelConfig`."""

from configs.schema import ModelConfig
from model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer"]
