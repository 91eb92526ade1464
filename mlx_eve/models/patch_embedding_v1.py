"""EVEv1 patch embedding layer: conv, 2x2 local cross-attention, global class-token attention, row separators.

Follows ``VisionTokenizer`` in EVEv1/eve/model/multimodal_encoder/vision_tokenizer.py. The image processor
hands over only the region the reference's mask marks valid, so no cropping happens here.
"""

import mlx.core as mx
import mlx.nn as nn

from .base import image_sequence, patchify


class CrossAttention(nn.Module):
    """Queries attend to a context; returns ``queries + proj(attention)``.

    The reference's ``LocalAttention`` and ``GlobalAttention`` share this structure: LayerNorm → Linear for
    the query, LayerNorm → Linear(C, 2C) for keys (first C) and values (last C), split into heads.
    """

    def __init__(self, dims: int, num_heads: int = 8):
        super().__init__()
        self.num_heads = num_heads
        # EVE scales by the full width, not the head width (vision_tokenizer.py: input_size ** -0.5).
        self.scale = dims**-0.5
        self.q = [nn.LayerNorm(dims), nn.Linear(dims, dims, bias=False)]
        self.kv = [nn.LayerNorm(dims), nn.Linear(dims, 2 * dims, bias=False)]
        self.proj = nn.Linear(dims, dims)

    def __call__(self, queries: mx.array, context: mx.array) -> mx.array:
        # queries: (N, Lq, C), context: (N, Lk, C)
        N, Lq, C = queries.shape
        Lk = context.shape[1]
        H = self.num_heads
        q = self.q[1](self.q[0](queries)).reshape(N, Lq, H, -1).transpose(0, 2, 1, 3)
        kv = self.kv[1](self.kv[0](context)).reshape(N, Lk, 2, H, -1)
        k = kv[:, :, 0].transpose(0, 2, 1, 3)
        v = kv[:, :, 1].transpose(0, 2, 1, 3)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return queries + self.proj(out.transpose(0, 2, 1, 3).reshape(N, Lq, C))


class PatchEmbedding(nn.Module):
    def __init__(self, dims: int, patch_stride: int = 14, conv_stride: int = 2, num_heads: int = 8):
        super().__init__()
        self.conv_stride = conv_stride
        self.patch_embedding = nn.Conv2d(3, dims, patch_stride, stride=patch_stride, bias=False)
        self.class_embedding = mx.zeros((dims,))
        self.split_embedding = mx.zeros((dims,))
        self.local_attention = CrossAttention(dims, num_heads)
        self.global_attention = CrossAttention(dims, num_heads)

    def __call__(self, pixels: mx.array) -> mx.array:
        """``pixels``: one normalised image ``(H, W, 3)``. Returns ``(1 + h*(w+1), dims)``."""
        dtype = self.patch_embedding.weight.dtype
        x = patchify(self.patch_embedding, pixels[None].astype(dtype))[0]
        Hp, Wp, C = x.shape
        s = self.conv_stride
        h, w = Hp // s, Wp // s
        # Each window of s×s patches: its mean is the query, the patches are keys/values.
        windows = x[: h * s, : w * s].reshape(h, s, w, s, C).transpose(0, 2, 1, 3, 4).reshape(h * w, s * s, C)
        pooled = mx.mean(windows, axis=1, keepdims=True)
        patches = self.local_attention(pooled, windows).reshape(1, h * w, C)
        cls = self.global_attention(self.class_embedding.reshape(1, 1, C).astype(dtype), patches)
        return image_sequence(cls, patches.reshape(h, w, C), self.split_embedding)
