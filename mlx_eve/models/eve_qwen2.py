"""EVEv2: a Qwen2 decoder with a text and a visual (``moe_*``) copy of each layer's norms, q/k/v/o and MLP.

Image tokens go through the ``moe_*`` copies, text tokens through the originals, and attention is one joint
causal pass over both. The reference (EVEv2/eve/model/language_model/qwen2/modeling_qwen2.py,
``moe_function``) runs both copies on every token and blends them with the mask; here each copy only sees
its own rows. Single-token steps are always text, as in the reference.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.rope_utils import initialize_rope

from .base import IMAGE_TOKEN_ID, EVEModel
from .patch_embedding_v2 import PatchEmbedding


@dataclass
class ModelArgs(qwen2.ModelArgs):
    tie_word_embeddings: bool = False
    mm_hidden_size: int = 1024
    add_moe: bool = True
    moe_part: str = "layernorm-self_attn-mlp"
    patch_stride: int = 16
    dense_stride: int = 2


class Modality:
    """The runs of text and image rows in a ``(B, L)`` chunk, read row by row; runs each branch on its own rows.

    An image is one contiguous run of rows, so a branch's rows are a few slices (views, no gather) and the
    branches' outputs go back in order with one concatenation.
    """

    def __init__(self, is_image: np.ndarray):
        self.shape = is_image.shape
        flat = is_image.reshape(-1)
        bounds = [0, *(np.flatnonzero(np.diff(flat)) + 1).tolist(), flat.size]
        self.runs = [(bool(flat[s]), s, e) for s, e in zip(bounds[:-1], bounds[1:])]

    @classmethod
    def of(cls, inputs: mx.array) -> Optional["Modality"]:
        """None when the chunk is all text (then the layers run exactly like Qwen2's)."""
        if inputs.shape[-1] <= 1:
            return None
        is_image = np.asarray(inputs == IMAGE_TOKEN_ID)
        return cls(is_image) if is_image.any() else None

    def rows(self, x: mx.array, image: bool) -> mx.array:
        """The rows of ``x`` (``(B, L, D)``) that belong to one branch, as ``(N, D)``."""
        x = x.reshape(-1, x.shape[-1])
        pieces = [x[s:e] for is_image, s, e in self.runs if is_image == image]
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)

    def merge(self, text: mx.array, image: mx.array) -> mx.array:
        """Branch outputs ``(N, D)`` back into one ``(B, L, D)`` in row order."""
        pieces, taken = [], {False: 0, True: 0}
        for is_image, s, e in self.runs:
            start = taken[is_image]
            pieces.append((image if is_image else text)[start : start + e - s])
            taken[is_image] += e - s
        return mx.concatenate(pieces).reshape(*self.shape, -1)


def route(modality: Optional[Modality], branch: Callable, *xs: mx.array):
    """``branch(False, ...)`` on the text rows and ``branch(True, ...)`` on the image rows of every x."""
    if modality is None:
        return branch(False, *xs)
    if len(modality.runs) == 1:  # all image
        return branch(True, *xs)
    text = branch(False, *(modality.rows(x, False) for x in xs))
    image = branch(True, *(modality.rows(x, True) for x in xs))
    if isinstance(text, tuple):
        return tuple(modality.merge(t, i) for t, i in zip(text, image))
    return modality.merge(text, image)


def pick(owner: nn.Module, name: str, image: bool) -> nn.Module:
    """The visual copy ``moe_<name>`` for image rows when the checkpoint has one, else the text module."""
    visual = "moe_" + name
    return owner[visual] if image and visual in owner else owner[name]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, with_visual_copy: bool):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        head_dim = dim // self.n_heads
        self.scale = head_dim**-0.5
        prefixes = ["", "moe_"] if with_visual_copy else [""]
        for p in prefixes:
            setattr(self, p + "q_proj", nn.Linear(dim, self.n_heads * head_dim, bias=True))
            setattr(self, p + "k_proj", nn.Linear(dim, self.n_kv_heads * head_dim, bias=True))
            setattr(self, p + "v_proj", nn.Linear(dim, self.n_kv_heads * head_dim, bias=True))
            setattr(self, p + "o_proj", nn.Linear(self.n_heads * head_dim, dim, bias=False))
        self.rope = initialize_rope(
            head_dim,
            base=args.rope_theta,
            traditional=args.rope_traditional,
            scaling_config=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def heads(self, queries, keys, values, offset: int = 0):
        """Projected q/k/v ``(B, L, heads*head_dim)`` as ``(B, heads, L, head_dim)``, q and k rotated from
        position ``offset``."""
        B, L, _ = queries.shape
        queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.rope(queries, offset=offset), self.rope(keys, offset=offset), values

    def __call__(self, queries, keys, values, mask=None, cache=None) -> mx.array:
        """Joint causal attention over already projected q/k/v ``(B, L, heads*head_dim)``."""
        B, L, _ = queries.shape
        queries, keys, values = self.heads(queries, keys, values, cache.offset if cache is not None else 0)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        output = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=self.scale, mask=mask)
        return output.transpose(0, 2, 1, 3).reshape(B, L, -1)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        parts = set(args.moe_part.split("-")) if args.add_moe else set()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, with_visual_copy="self_attn" in parts)
        self.mlp = qwen2.MLP(dim, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        if "mlp" in parts:
            self.moe_mlp = qwen2.MLP(dim, args.intermediate_size)
        if "layernorm" in parts:
            self.moe_input_layernorm = nn.RMSNorm(dim, eps=eps)
            self.moe_post_attention_layernorm = nn.RMSNorm(dim, eps=eps)

    def _project(self, image: bool, x: mx.array):
        x = pick(self, "input_layernorm", image)(x)
        return tuple(pick(self.self_attn, n, image)(x) for n in ("q_proj", "k_proj", "v_proj"))

    def _finish(self, image: bool, x: mx.array, attention: mx.array) -> mx.array:
        h = x + pick(self.self_attn, "o_proj", image)(attention)
        return h + pick(self, "mlp", image)(pick(self, "post_attention_layernorm", image)(h))

    def __call__(self, x, mask=None, cache=None, modality: Optional[Modality] = None) -> mx.array:
        queries, keys, values = route(modality, self._project, x)
        attention = self.self_attn(queries, keys, values, mask, cache)
        return route(modality, self._finish, x, attention)


class EVEQwen2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.vision_tower = PatchEmbedding(args.mm_hidden_size, args.hidden_size, args.patch_stride, args.dense_stride)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        if input_embeddings is None:
            h = self.embed_tokens(inputs)
        elif inputs.size != input_embeddings.shape[0] * input_embeddings.shape[1]:
            raise ValueError("EVEv2 needs the prompt token ids with input_embeddings to route image tokens.")
        else:
            h = input_embeddings
        modality = Modality.of(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c, modality)
        return self.norm(h)


class Model(EVEModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args, EVEQwen2Model(args))

    def encode_image(self, pixels: mx.array) -> mx.array:
        return self.model.vision_tower(pixels)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        # Early EVEv2 code called the row separator `end_embedding`.
        old = "model.vision_tower.end_embedding"
        if old in weights:
            weights = dict(weights)
            weights["model.vision_tower.split_embedding"] = weights.pop(old)
        return super().sanitize(weights)
