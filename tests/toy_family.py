"""A toy EVE family for tests/test_families.py: the EVEv2 patch embedding in front of mlx-lm's Qwen3
decoder. It is the whole model file a new family needs (``ModelArgs`` and ``Model``); its record is
registered by the test."""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models import qwen3

from mlx_eve.models.base import EVEModel
from mlx_eve.models.patch_embedding_v2 import PatchEmbedding


@dataclass
class ModelArgs(qwen3.ModelArgs):
    mm_hidden_size: int = 32
    patch_stride: int = 16
    dense_stride: int = 2


class ToyModel(qwen3.Qwen3Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.vision_tower = PatchEmbedding(args.mm_hidden_size, args.hidden_size, args.patch_stride, args.dense_stride)


class Model(EVEModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args, ToyModel(args))

    def encode_image(self, pixels: mx.array) -> mx.array:
        return self.model.vision_tower(pixels)
