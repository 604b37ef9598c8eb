"""The three FFCLIP stages as PyTorch modules."""

from .generator import Generator
from .mapper import Mapper
from .text_encoder import TextEncoder

__all__ = ["Generator", "Mapper", "TextEncoder"]
