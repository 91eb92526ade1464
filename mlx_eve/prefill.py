"""What a prompt's prefill runs through the model when a KV cache already holds the prompt's first tokens.

``generate_from_inputs`` (a ``ChatSession``'s conversation so far) and the ``Engine`` (its prompt cache) both
prefill prompts whose start may be cached, and decide alike, here. The cache keeps the longest prefix it shares
with the prompt, less one token at least: the first answer token is computed from the last prompt token, which
must be fed. Only the rest runs through the model, and the images are embedded only if their tokens are in it,
so a follow-up question does not process the image again. Penalties see the whole prompt's text ids, cached or
not, and never the image placeholder ids, so an answer is the same whether its prompt was cached or not.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Any, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.utils import common_prefix_len

from .models import IMAGE_TOKEN_ID
from .models.base import EVEModel
from .processor import ModelInputs


def reuse_prefix(prompt_cache: List[Any], cached_ids: Sequence, ids: Sequence) -> int:
    """How many tokens of ``prompt_cache``, which holds ``cached_ids``, the prompt ``ids`` reuses: the prefix
    they share, less one token at least; the cache is cut back to them. 0 when nothing is reused or the cache
    cannot be cut: then prefill into a new cache."""
    common = min(common_prefix_len(cached_ids, ids), len(ids) - 1)
    if common < len(cached_ids):
        if not can_trim_prompt_cache(prompt_cache):
            return 0
        trim_prompt_cache(prompt_cache, len(cached_ids) - common)
    return common


@dataclass
class Prefill:
    """The prompt ``inputs``, of which a KV cache already holds the first ``reused`` tokens."""

    inputs: ModelInputs
    reused: int = 0

    @property
    def ids(self) -> mx.array:
        """The prompt tokens to run through the model: those not cached."""
        return self.inputs.input_ids[self.reused :]

    @cached_property
    def image_tokens(self) -> int:
        """How many of ``ids`` are image tokens."""
        return int((np.asarray(self.ids) == IMAGE_TOKEN_ID).sum())

    def input_embeddings(self, model: EVEModel) -> Optional[mx.array]:
        """The embeddings of ``ids``, computed (mlx-lm prefills on its own stream), when they hold image tokens;
        ``None`` when they are all text, which the model embeds itself."""
        if not self.image_tokens:
            return None
        embeddings = model.embed_inputs(self.inputs.input_ids, self.inputs.pixel_values)[self.reused :]
        mx.eval(embeddings)
        return embeddings

    @cached_property
    def text_ids(self) -> List[int]:
        """What penalties see of the prompt: all its text ids, cached or not, without the image placeholders."""
        return [t for t in self.inputs.input_ids.tolist() if t != IMAGE_TOKEN_ID]
