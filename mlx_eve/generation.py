"""``stream_generate`` and ``generate``: answers through mlx-lm's loop (KV cache, chunked prefill, samplers,
streaming), for a prompt and images or for inputs the processor already prepared."""

from dataclasses import dataclass, fields
from typing import Any, Dict, Generator, List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import GenerationResponse as LMGenerationResponse
from mlx_lm.generate import stream_generate as lm_stream_generate

from .image import ImageInput
from .models.base import EVEModel
from .prefill import Prefill
from .processor import ModelInputs, Processor
from .prompts import Prompt
from .request import SamplingParams
from .structured import requested_grammar


@dataclass
class GenerationResponse(LMGenerationResponse):
    """mlx-lm's response plus the number of prompt tokens that are image embeddings."""

    image_tokens: int = 0


def stream_generate(
    model: EVEModel,
    processor: Processor,
    prompt: Prompt,
    image: Union[None, ImageInput, Sequence[ImageInput]] = None,
    max_tokens: int = 256,
    temp: float = 0.0,
    *,
    system_prompt: Optional[str] = None,
    max_size: Optional[int] = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Answer ``prompt`` (a question, or a list of role/content messages) about ``image`` (one or several).
    ``max_size`` sets the EVEv2 image resolution for this call.

    Yields a response per generated token; the last one carries ``finish_reason`` ("stop" or "length").
    Sampling options: ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``repetition_context_size``,
    ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` (or a ready ``sampler`` / ``logits_processors``);
    ``json_schema=`` or ``response_format=`` for an answer that follows a schema; anything else goes to mlx-lm's
    ``generate_step`` (``max_kv_size``, ``kv_bits``, ``prefill_step_size``, ``prompt_cache``, ...).
    """
    inputs = processor(prompt, image, system_prompt, max_size)
    yield from generate_from_inputs(model, processor, inputs, max_tokens, temp, **kwargs)


def generate(
    model: EVEModel,
    processor: Processor,
    prompt: Prompt,
    image: Union[None, ImageInput, Sequence[ImageInput]] = None,
    **kwargs,
) -> str:
    """The whole answer as a string (same arguments as ``stream_generate``)."""
    return "".join(r.text for r in stream_generate(model, processor, prompt, image, **kwargs))


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
    presence_penalty: Optional[float] = None,
    frequency_penalty: Optional[float] = None,
    logit_bias: Optional[Dict[int, float]] = None,
    response_format: Optional[Dict[str, Any]] = None,
    json_schema: Any = None,
    reused: int = 0,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """``stream_generate`` for inputs the processor already prepared.

    ``json_schema`` (a JSON Schema, or a pydantic model class) or ``response_format`` (OpenAI's, see
    ``structured.response_format_grammar``) holds the answer to a schema by constrained decoding.

    With a ``prompt_cache`` that already holds the first ``reused`` prompt tokens (a conversation so far),
    only the rest is run through the model, and images are only embedded if their tokens are in the rest
    (``Prefill``).
    """
    room = processor.context_length - inputs.input_ids.size
    max_tokens = room if max_tokens < 0 else min(max_tokens, room)
    params = SamplingParams(
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=tuple((logit_bias or {}).items()),
        grammar=requested_grammar(response_format, json_schema),
    )
    params.check(model.num_logits)
    kwargs.setdefault("sampler", params.sampler())
    processors = list(kwargs.pop("logits_processors", None) or []) + params.logits_processors(processor.tokenizer)
    prefill = Prefill(inputs, reused)
    for response in lm_stream_generate(
        model,
        processor.tokenizer,
        prefill.ids,
        max_tokens=max_tokens,
        input_embeddings=prefill.input_embeddings(model),
        logits_processors=_over_text(processors, prefill),
        **kwargs,
    ):
        values = {f.name: getattr(response, f.name) for f in fields(response)}
        yield GenerationResponse(**values, image_tokens=inputs.image_tokens)


def _over_text(processors: List, prefill: Prefill) -> List:
    """Penalties see the prompt's text (``Prefill.text_ids``), then the answer so far, as if nothing were cached:
    mlx-lm hands them only the prompt tokens this call fed plus the answer."""
    text_ids, fed = mx.array(prefill.text_ids), prefill.ids.size

    def over_text(processor):
        return lambda tokens, logits: processor(mx.concatenate([text_ids, tokens[fed:]]), logits)

    return [over_text(p) for p in processors]
