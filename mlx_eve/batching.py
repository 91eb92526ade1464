"""mlx-lm's ``BatchGenerator`` prefilling EVE's prompts, images included, together.

mlx-lm prefills the prompts that arrive together as one batch, in chunks interleaved with the decode steps of the
requests already answering, and feeds its model token ids only. An image's tokens need their image's embeddings
instead: each is given to the generator as a token id of its own beyond the vocabulary, a *virtual id* that says
which request's image embeddings hold it (``ImageEmbeddings``), and the model that prefills (``PrefillModel``)
embeds them from there. EVEv2's split layers still see image rows as image rows (their ids go back to the image
placeholder id), and penalties never see them (``TextTokens``). Decode steps, whose tokens are all text, run on the
model itself.
"""

from typing import Dict, Iterable, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator

from .models import IMAGE_TOKEN_ID
from .models.base import EVEModel

# A virtual id is FIRST_VIRTUAL_ID + slot * SLOT_SIZE + the token's index among its request's image tokens.
FIRST_VIRTUAL_ID = 1 << 30
SLOT_SIZE = 1 << 20  # more image tokens than any context holds


class ImageEmbeddings:
    """The image embeddings of the requests being prefilled, each in a slot of its own."""

    def __init__(self, slots: int):
        self.free = list(range(slots))
        self.embeddings: Dict[int, mx.array] = {}

    def add(self, input_ids: np.ndarray, embeddings: mx.array) -> tuple:
        """A slot for a prompt's image ``embeddings`` (its image tokens' rows, in order); returns the slot and the
        prompt's ids with each image token's virtual id."""
        slot = self.free.pop(0)
        self.embeddings[slot] = embeddings
        ids = input_ids.astype(np.int64)
        is_image = ids == IMAGE_TOKEN_ID
        ids[is_image] = FIRST_VIRTUAL_ID + slot * SLOT_SIZE + np.arange(int(is_image.sum()))
        return slot, ids

    def release(self, slot: Optional[int]) -> None:
        if slot is not None and slot in self.embeddings:
            del self.embeddings[slot]
            self.free.append(slot)

    def embed(self, model: EVEModel, ids: np.ndarray) -> mx.array:
        """``(B, L, D)`` embeddings of a chunk of ids, virtual ones taken from their slots."""
        virtual = ids >= FIRST_VIRTUAL_ID
        h = model.model.embed_tokens(mx.array(np.where(virtual, 0, ids), dtype=mx.int32))
        for b in np.flatnonzero(virtual.any(axis=1)):
            columns = np.flatnonzero(virtual[b])
            offsets = ids[b, columns] - FIRST_VIRTUAL_ID
            slot = int(offsets[0] // SLOT_SIZE)  # a row is one request's
            rows = self.embeddings[slot][mx.array(offsets % SLOT_SIZE, dtype=mx.int32)]
            h[int(b), mx.array(columns, dtype=mx.int32)] = rows.astype(h.dtype)
        return h


class PrefillModel:
    """The model as the generator's prompt batches call it: ids in, logits out, virtual ids embedded."""

    def __init__(self, model: EVEModel, images: ImageEmbeddings):
        self.model, self.images = model, images

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        ids = np.asarray(inputs)  # prompt chunks are made of Python ints: nothing waits here
        if not (ids >= FIRST_VIRTUAL_ID).any():
            return self.model(inputs, cache=cache)
        routing = mx.array(np.where(ids >= FIRST_VIRTUAL_ID, IMAGE_TOKEN_ID, ids), dtype=mx.int32)
        return self.model(routing, cache=cache, input_embeddings=self.images.embed(self.model, ids))


class TextTokens(list):
    """A request's token context for its penalties: the prompt ids the generator adds to it keep only text ids, as
    the penalties of a request prefilled alone see them."""

    def __iadd__(self, ids: Iterable[int]) -> "TextTokens":
        self.extend(t for t in ids if t < FIRST_VIRTUAL_ID and t != IMAGE_TOKEN_ID)
        return self


class EVEBatchGenerator(BatchGenerator):
    """``BatchGenerator`` whose prompt batch prefills with ``PrefillModel``; its decode batch keeps the model."""

    def __init__(self, model: EVEModel, images: ImageEmbeddings, **kwargs):
        super().__init__(model, **kwargs)
        # The prompt batch takes in the prompts that join, and hands its model to the decode rows it starts (for
        # their first step, fed the last prompt token, a Python int); they then join the generation batch, which
        # was made with the model itself.
        self._prompt_batch.model = PrefillModel(model, images)


def text_ids(ids: Sequence[int]) -> TextTokens:
    """``TextTokens`` of ``ids``, virtual ones among them: a prompt cache's part of a prompt whose image tokens
    were all made virtual."""
    tokens = TextTokens()
    tokens += ids
    return tokens
