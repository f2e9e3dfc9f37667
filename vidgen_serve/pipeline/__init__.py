"""The three generation stages as plain classes, and the in-process pipeline composing them."""

from .decoder import Decoder
from .denoiser import Denoiser
from .inprocess import GenerationResult, VideoPipeline
from .text_encoder import PromptEmbeddings, TextEncoder

__all__ = ["Decoder", "Denoiser", "GenerationResult", "PromptEmbeddings", "TextEncoder", "VideoPipeline"]
