"""Generation through mlx-lm's loop (KV cache, chunked prefill, samplers, streaming) for prepared inputs."""

from dataclasses import dataclass, fields
from typing import Generator, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationResponse as LMGenerationResponse
from mlx_lm.generate import stream_generate as lm_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .models import IMAGE_TOKEN_ID
from .models.base import EVEModel
from .processor import ModelInputs, Processor


@dataclass
class GenerationResponse(LMGenerationResponse):
    """mlx-lm's response plus the number of prompt tokens that are image embeddings."""

    image_tokens: int = 0


def generate_from_inputs(
    model: EVEModel,
    processor: Processor,
    inputs: ModelInputs,
    max_tokens: int = 256,
    temp: float = 0.0,
    *,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    reused: int = 0,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """``stream_generate`` for inputs the processor already prepared.

    With a ``prompt_cache`` that already holds the first ``reused`` prompt tokens (a conversation so far),
    only the rest is run through the model, and images are only embedded if their tokens are in the rest.
    """
    room = processor.context_length - inputs.input_ids.size
    max_tokens = room if max_tokens < 0 else min(max_tokens, room)
    kwargs.setdefault("sampler", make_sampler(temp, top_p, min_p, top_k=top_k))
    processors = list(kwargs.pop("logits_processors", None) or [])
    processors += make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    new = inputs.input_ids[reused:]
    if (np.asarray(new) == IMAGE_TOKEN_ID).any():
        kwargs["input_embeddings"] = model.embed_inputs(inputs.input_ids, inputs.pixel_values)[reused:]
        # mlx-lm prefills on its own stream: compute the image rows here first.
        mx.eval(kwargs["input_embeddings"])
    for response in lm_stream_generate(
        model,
        processor.tokenizer,
        new,
        max_tokens=max_tokens,
        logits_processors=_over_text(processors, inputs.input_ids, new.size),
        **kwargs,
    ):
        values = {f.name: getattr(response, f.name) for f in fields(response)}
        yield GenerationResponse(**values, image_tokens=inputs.image_tokens)


def _over_text(processors: List, input_ids: mx.array, fed: int) -> List:
    """Penalties see the whole prompt's text (not image placeholder ids), then the answer so far, as if
    nothing were cached: mlx-lm hands them only the ``fed`` prompt tokens of this call plus the answer."""
    ids = np.asarray(input_ids)
    text_ids = mx.array(ids[ids != IMAGE_TOKEN_ID])

    def over_text(processor):
        return lambda tokens, logits: processor(mx.concatenate([text_ids, tokens[fed:]]), logits)

    return [over_text(p) for p in processors]
