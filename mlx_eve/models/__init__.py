"""The EVE model files; ``mlx_eve.families`` says which ``model_type`` each one serves."""

from .base import IMAGE_TOKEN_ID

__all__ = ["IMAGE_TOKEN_ID"]
