"""Pieces both EVE families share: the image placeholder id, image/text embedding merge, weight clean-up."""

from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import EVEError
from ..families import Family, family_of

# The reference marks an image position with -200 (EVEv*/eve/constants.py). Our processor repeats it once
# per image embedding, so token count == embedding count and the decoder can tell image rows from text rows.
IMAGE_TOKEN_ID = -200

# Weights the reference only builds for training (CLIP teacher, patch aligning layer) or recomputes (RoPE).
TRAINING_ONLY_PREFIXES = ("model.vision_clip.", "model.vision_tower_compressor.")

# Tensor parallelism as mlx-lm's LLaMA/Qwen2: q/k/v and gate/up split their outputs (heads, MLP features)
# among the ranks; o and down take the split inputs and sum their outputs over the group.
SHARDING = {
    "q_proj": "all-to-sharded",
    "k_proj": "all-to-sharded",
    "v_proj": "all-to-sharded",
    "gate_proj": "all-to-sharded",
    "up_proj": "all-to-sharded",
    "o_proj": "sharded-to-all",
    "down_proj": "sharded-to-all",
}


class ShardingError(EVEError, ValueError):
    """A model that cannot be split over the processes of a distributed group."""


def image_spans(input_ids: mx.array) -> List[tuple]:
    """(start, end) of every run of image placeholders in a 1-D token sequence."""
    is_image = np.asarray(input_ids) == IMAGE_TOKEN_ID
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]])))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def embed_with_images(embed_tokens: nn.Embedding, input_ids: mx.array, image_features: List[mx.array]) -> mx.array:
    """Embed a 1-D prompt, putting each image's features where its placeholder run is.

    Returns ``(L, D)``. Each run must be exactly as long as its image's feature sequence.
    """
    spans = image_spans(input_ids)
    # A quantized embedding stores packed uint32 weights; its float dtype is that of its scales.
    dtype = getattr(embed_tokens, "scales", embed_tokens.weight).dtype
    if len(spans) != len(image_features):
        raise ValueError(
            f"The prompt has {len(spans)} image placeholder runs but {len(image_features)} images were given."
        )
    pieces, position = [], 0
    for (start, end), features in zip(spans, image_features):
        if end - start != features.shape[0]:
            raise ValueError(
                f"An image placeholder run has {end - start} tokens but the image has {features.shape[0]} embeddings."
            )
        if start > position:
            pieces.append(embed_tokens(input_ids[position:start]))
        pieces.append(features.astype(dtype))
        position = end
    if position < input_ids.shape[0]:
        pieces.append(embed_tokens(input_ids[position:]))
    return mx.concatenate(pieces, axis=0)


def sanitize_weights(model: nn.Module, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Drop training-only and recomputed weights (and a tied head); PyTorch conv kernels to MLX layout.

    Idempotent: an already sanitized (MLX) checkpoint passes through unchanged.
    """
    weights = {
        k: v
        for k, v in weights.items()
        if not k.startswith(TRAINING_ONLY_PREFIXES) and not k.endswith("rotary_emb.inv_freq")
    }
    if model.args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    expected = dict(tree_flatten(model.parameters()))
    for key, weight in weights.items():
        if weight.ndim == 4 and key in expected:
            weights[key] = _to_mlx_conv_layout(weight, expected[key].shape)
    return weights


def _to_mlx_conv_layout(weight: mx.array, expected_shape: tuple) -> mx.array:
    """PyTorch stores conv kernels as [out, in, kh, kw], MLX as [out, kh, kw, in]."""
    if tuple(weight.shape) != tuple(expected_shape):
        transposed = weight.transpose(0, 2, 3, 1)
        if tuple(transposed.shape) == tuple(expected_shape):
            return transposed
    return weight


def patchify(conv: nn.Conv2d, x: mx.array) -> mx.array:
    """``conv`` (kernel = stride, no padding) applied to ``x`` ``(B, H, W, C)`` as one matmul over the patches:
    the same result, and on the CPU many times faster to train than MLX's convolution."""
    out, k, _, channels = conv.weight.shape
    B, H, W, _ = x.shape
    h, w = H // k, W // k
    patches = x[:, : h * k, : w * k].reshape(B, h, k, w, k, channels).transpose(0, 1, 3, 2, 4, 5)
    y = patches.reshape(B, h, w, k * k * channels) @ conv.weight.reshape(out, -1).T
    return y + conv.bias if "bias" in conv else y


def image_sequence(cls_token: mx.array, grid: mx.array, split_embedding: mx.array) -> mx.array:
    """``[cls; row_1, split; row_2, split; ...]`` from a class token ``(C,)`` and a feature grid ``(h, w, C)``.

    Both EVE versions lay out an image this way, giving ``1 + h*(w+1)`` embeddings.
    """
    h, w, C = grid.shape
    split = mx.broadcast_to(split_embedding.astype(grid.dtype), (h, 1, C))
    rows = mx.concatenate([grid, split], axis=1).reshape(h * (w + 1), C)
    return mx.concatenate([cls_token.astype(grid.dtype).reshape(1, C), rows], axis=0)


class EVEModel(nn.Module):
    """What both families share around their decoder ``self.model``: LM head, vocabulary limit, inputs.

    Subclasses build the decoder (with ``vision_tower`` under it, as the checkpoint keys have it) and
    implement ``encode_image(pixels) -> (tokens, hidden_size)``.
    """

    def __init__(self, args, language_model: nn.Module):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = language_model
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Set by `load` to the tokenizer's length: the reference resizes the vocabulary to it, so rows
        # beyond it must never be sampled.
        self.vocab_limit: Optional[int] = None

    @property
    def num_logits(self) -> int:
        """How many token ids the model answers with: the width of its logits."""
        return min(self.vocab_limit or self.args.vocab_size, self.args.vocab_size)

    @property
    def family(self) -> Family:
        """This model's record in the family table: its name, processor, template, LoRA targets, ..."""
        return family_of(self.model_type)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None) -> mx.array:
        return self.logits(self.model(inputs, cache, input_embeddings))

    def logits(self, hidden: mx.array) -> mx.array:
        """The LM head on the decoder's normed output, cut to the tokenizer's vocabulary."""
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(hidden)
        else:
            logits = self.lm_head(hidden)
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits = logits[..., : self.vocab_limit]
        return logits

    def encode_image(self, pixels: mx.array) -> mx.array:
        raise NotImplementedError

    def embed_inputs(self, input_ids: mx.array, pixel_values: List[mx.array]) -> mx.array:
        """Embeddings ``(L, D)`` for a 1-D prompt whose image placeholders are expanded."""
        features = [self.encode_image(p) for p in pixel_values]
        return embed_with_images(self.model.embed_tokens, input_ids, features)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        return sanitize_weights(self, weights)

    def shard(self, group: Optional[mx.distributed.Group] = None) -> None:
        """Split every decoder linear (EVEv2: of both branches) over ``group``, as mlx-lm shards LLaMA and Qwen2;
        each rank keeps its share of the attention heads. The embedding, the norms, the LM head and the patch
        embedding stay whole on every rank. EVEv2's routing picks rows (tokens) and sharding splits features,
        so each branch's layers shard alike."""
        group = group or mx.distributed.init()
        N = group.size()
        heads, kv_heads = self.args.num_attention_heads, self.args.num_key_value_heads
        if heads % N or kv_heads % N:
            raise ShardingError(
                f"{self.model_type} has {heads} attention heads and {kv_heads} key/value heads: both must be "
                f"multiples of the number of processes ({N})."
            )
        for layer in self.layers:
            try:
                sharded = [
                    (path, shard_linear(module, SHARDING[_projection(path)], group=group))
                    for path, module in layer.named_modules()
                    if _projection(path) in SHARDING
                ]
            except ValueError as e:  # a width that does not split into whole parts, or whole quantization groups
                raise ShardingError(f"{self.model_type} cannot be split over {N} processes: {e}") from e
            layer.update_modules(tree_unflatten(sharded))
            layer.self_attn.n_heads //= N
            layer.self_attn.n_kv_heads //= N

    @property
    def layers(self):
        return self.model.layers


def _projection(path: str) -> str:
    """``self_attn.moe_q_proj`` → ``q_proj``: a layer's name, the same in EVEv2's visual copy."""
    return path.rsplit(".", 1)[-1].removeprefix("moe_")
