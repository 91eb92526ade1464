"""mlx-eve: BAAI's encoder-free EVE vision-language models (EVEv1, EVEv2) in MLX."""

from .engine import batch_generate
from .generate import GenerationResponse, generate, stream_generate
from .loading import load

__version__ = "0.1.0"

__all__ = ["GenerationResponse", "batch_generate", "generate", "load", "stream_generate", "__version__"]
