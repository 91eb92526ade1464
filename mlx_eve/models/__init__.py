"""The EVE model families, keyed by the ``model_type`` of their ``config.json``."""

import importlib
from types import ModuleType

from .base import IMAGE_TOKEN_ID

MODEL_TYPES = {"eve": "eve_llama", "eve-qwen2": "eve_qwen2"}


def model_module(model_type: str) -> ModuleType:
    if model_type not in MODEL_TYPES:
        known = ", ".join(repr(k) for k in MODEL_TYPES)
        raise ValueError(f"Unknown model_type {model_type!r} in config.json: mlx-eve supports {known}.")
    return importlib.import_module(f"{__name__}.{MODEL_TYPES[model_type]}")


__all__ = ["IMAGE_TOKEN_ID", "MODEL_TYPES", "model_module"]
