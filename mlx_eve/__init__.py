"""mlx-eve: BAAI's encoder-free EVE vision-language models (EVEv1, EVEv2) in MLX."""

import importlib
import warnings

from .generate import generate, stream_generate

# `python -m mlx_eve.generate` runs the module this package has just imported for `generate`; runpy warns about
# that, though the command only uses its own copy.
warnings.filterwarnings("ignore", message="'mlx_eve.generate' found in sys.modules", category=RuntimeWarning)

__version__ = "0.1.0"

# Loaded on first use: mlx-lm imports transformers, which would make every command's --help wait for it.
_LAZY = {"load": "loading", "batch_generate": "engine", "GenerationResponse": "generation"}

__all__ = ["GenerationResponse", "batch_generate", "generate", "load", "stream_generate", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
