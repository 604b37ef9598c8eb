"""The three FFCLIP stages as PyTorch modules."""

from .encoder import Encoder4Editing
from .face_parser import FaceParser
from .generator import Generator
from .identity import IdentityNet
from .mapper import Mapper
from .text_encoder import TextEncoder

__all__ = ["Generator", "Mapper", "TextEncoder"]
__all__ += ["Encoder4Editing", "FaceParser", "IdentityNet"]
