"""EVEv1: a LLaMA (Vicuna-7B-v1.5) decoder fed by the v1 patch embedding layer and an MLP projector.

The decoder is mlx-lm's LLaMA, unchanged; the image modules hang off ``model.`` so the keys match the
reference checkpoints (``model.vision_tower.*``, ``model.mm_projector.*``).
"""

import re
from dataclasses import dataclass
from typing import List

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

from .base import EVEModel
from .patch_embedding_v1 import PatchEmbedding


@dataclass
class ModelArgs(llama.ModelArgs):
    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    patch_stride: int = 14
    conv_stride: int = 2
    tie_word_embeddings: bool = False


def build_projector(kind: str, in_dims: int, out_dims: int) -> List[nn.Module]:
    """``linear`` or ``mlp{N}x_gelu``, as EVEv1/eve/model/multimodal_projector/builder.py builds them."""
    if kind == "linear":
        return [nn.Linear(in_dims, out_dims)]
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match is None:
        raise ValueError(f"Unsupported mm_projector_type {kind!r} (expected 'linear' or 'mlpNx_gelu').")
    layers = [nn.Linear(in_dims, out_dims)]
    for _ in range(1, int(match.group(1))):
        layers += [nn.GELU(), nn.Linear(out_dims, out_dims)]
    return layers


class EVELlamaModel(llama.LlamaModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.vision_tower = PatchEmbedding(args.mm_hidden_size, args.patch_stride, args.conv_stride)
        layers = build_projector(args.mm_projector_type, args.mm_hidden_size, args.hidden_size)
        # A lone Linear is stored as `mm_projector.weight`, a stack as `mm_projector.0.weight`, ...
        self.mm_projector = layers[0] if len(layers) == 1 else layers


class Model(EVEModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args, EVELlamaModel(args))

    def encode_image(self, pixels: mx.array) -> mx.array:
        features = self.model.vision_tower(pixels)
        projector = self.model.mm_projector
        for layer in projector if isinstance(projector, list) else [projector]:
            features = layer(features)
        return features
