"""mlx-eve: BAAI's encoder-free EVE vision-language models (EVEv1, EVEv2) in MLX."""

import importlib

__version__ = "0.1.0"

# Loaded on first use: mlx-lm imports transformers, which would make every command's --help wait for it.
_LAZY = {
    "load": "loading",
    "generate": "generation",
    "stream_generate": "generation",
    "GenerationResponse": "generation",
    "batch_generate": "answering",
}

__all__ = ["GenerationResponse", "batch_generate", "generate", "load", "stream_generate", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
