"""What a request will hold in memory, estimated before the engine admits it, and the budget requests share.

A request holds its KV cache, which grows to its prompt plus ``max_tokens`` (mlx-lm's caches grow by 256 tokens),
and while it is prefilled the activations of a chunk of its prompt (its attention scores over the whole prompt
among them) and its images' embeddings. The estimates are upper bounds in float32 for the activations, so that a
server admitting requests within ``MemoryBudget.for_requests`` does not run out of memory under load.
"""

import math
import os
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from .models.base import EVEModel

KV_STEP = 256  # mlx-lm's KV caches allocate this many tokens at a time
DEFAULT_SHARE = 0.75  # of the machine's memory (Metal: of its recommended working set), by default


def machine_memory() -> int:
    """What the device may use: Metal's recommended working set, else the machine's physical memory."""
    info = mx.device_info() if mx.metal.is_available() else {}
    size = info.get("max_recommended_working_set_size") or info.get("memory_size")
    return int(size) if size else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_limit() -> int:
    return int(DEFAULT_SHARE * machine_memory())


def model_bytes(model: EVEModel) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


@dataclass(frozen=True)
class MemoryBudget:
    """``limit`` bytes in all, of which the model's weights and the prompt cache's bound take ``fixed``."""

    limit: int
    fixed: int
    kv_per_token: int  # every layer's keys and values of one token
    activations_per_token: int  # a prefilled token's hidden states and MLP, in float32
    heads: int
    hidden_size: int
    prefill_step: int

    @classmethod
    def of(cls, model: EVEModel, limit: int, prompt_cache_bytes: int, prefill_step: int) -> "MemoryBudget":
        args = model.args
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        dtype_size = model.model.embed_tokens.weight.dtype.size
        if hasattr(model.model.embed_tokens, "scales"):  # quantized: the activations are in the scales' dtype
            dtype_size = model.model.embed_tokens.scales.dtype.size
        return cls(
            limit=limit,
            fixed=model_bytes(model) + prompt_cache_bytes,
            kv_per_token=2 * args.num_hidden_layers * args.num_key_value_heads * head_dim * dtype_size,
            activations_per_token=4 * (6 * args.hidden_size + 3 * args.intermediate_size),
            heads=args.num_attention_heads,
            hidden_size=args.hidden_size,
            prefill_step=prefill_step,
        )

    @property
    def for_requests(self) -> int:
        """What the requests in the batch may hold together."""
        return self.limit - self.fixed

    def request_bytes(self, prompt_tokens: int, max_tokens: int, image_tokens: int) -> int:
        """An upper bound of what a request holds at its peak: its KV cache at ``max_tokens``, the prefill of a
        chunk of its prompt (attention scores included), and its images' embeddings."""
        kv = math.ceil((prompt_tokens + max_tokens) / KV_STEP) * KV_STEP * self.kv_per_token
        chunk = min(prompt_tokens, self.prefill_step)
        prefill = chunk * self.activations_per_token + 4 * self.heads * chunk * prompt_tokens
        return kv + prefill + 4 * self.hidden_size * image_tokens


def describe(size: int) -> str:
    """``size`` bytes in MiB or GiB, for a message."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
