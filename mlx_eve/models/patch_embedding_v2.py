"""EVEv2 patch embedding layer: conv → GELU → conv, a separator after every row, a class token in front.

Follows ``VisionTokenizer`` in EVEv2/eve/model/multimodal_encoder/vision_tokenizer.py.
"""

import mlx.core as mx
import mlx.nn as nn

from .base import image_sequence, patchify


class PatchEmbedding(nn.Module):
    def __init__(self, vision_dims: int, dims: int, patch_stride: int = 16, dense_stride: int = 2):
        super().__init__()
        self.patch_embedding = [
            nn.Conv2d(3, vision_dims, patch_stride, stride=patch_stride),
            nn.GELU(),
            nn.Conv2d(vision_dims, dims, dense_stride, stride=dense_stride),
        ]
        self.class_embedding = mx.zeros((dims,))
        self.split_embedding = mx.zeros((dims,))

    def __call__(self, pixels: mx.array) -> mx.array:
        """``pixels``: one normalised image ``(H, W, 3)``. Returns ``(1 + h*(w+1), dims)``."""
        dtype = self.patch_embedding[0].weight.dtype
        patches, activation, merge = self.patch_embedding
        x = patchify(merge, activation(patchify(patches, pixels[None].astype(dtype))))
        return image_sequence(self.class_embedding, x[0], self.split_embedding)
