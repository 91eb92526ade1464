"""Streamed generation through mlx-lm (KV cache, chunked prefill, samplers), and the ``generate`` CLI."""

import argparse
import sys
from dataclasses import dataclass, fields
from typing import Generator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationResponse as LMGenerationResponse
from mlx_lm.generate import stream_generate as lm_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .arguments import COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, PROBABILITY, ArgumentParser, number
from .demo import BUNDLED_MODEL
from .errors import PromptError, run_cli
from .image import ImageInput
from .loading import load
from .models import IMAGE_TOKEN_ID
from .models.base import EVEModel
from .processor import ModelInputs, Processor, Prompt

# Asked when images come without a question.
DESCRIBE = "Describe the image."


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
    Sampling options: ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``repetition_context_size``
    (or a ready ``sampler`` / ``logits_processors``); anything else goes to mlx-lm's ``generate_step``
    (``max_kv_size``, ``kv_bits``, ``prefill_step_size``, ``prompt_cache``, ...).
    """
    inputs = processor(prompt, image, system_prompt, max_size)
    yield from generate_from_inputs(model, processor, inputs, max_tokens, temp, **kwargs)


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


def generate(
    model: EVEModel,
    processor: Processor,
    prompt: Prompt,
    image: Union[None, ImageInput, Sequence[ImageInput]] = None,
    **kwargs,
) -> str:
    """The whole answer as a string (same arguments as ``stream_generate``)."""
    return "".join(r.text for r in stream_generate(model, processor, prompt, image, **kwargs))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Ask an EVE model about one or more images, streaming the answer.")
    add = p.add_argument
    add("--model", default=None, help=f"Model folder or Hugging Face repo (default: {BUNDLED_MODEL.name}).")
    add("--image", nargs="+", default=[], help="Image paths or URLs, in the order of <image> in the prompt.")
    add("--prompt", "-p", default=None, help=f"The question ('-' reads stdin; with images: {DESCRIBE!r}).")
    add("--system-prompt", default=None, help="Replace the template's system prompt.")
    add("--max-tokens", "-m", type=COUNT, default=256, help="Maximum number of tokens to generate.")
    add("--temp", "--temperature", dest="temp", type=NON_NEGATIVE, default=0.0, help="Sampling temperature.")
    add(
        "--top-p",
        type=number(float, "a number in (0, 1]", lambda v: 0 < v <= 1),
        default=1.0,
        help="Nucleus sampling threshold.",
    )
    add("--top-k", type=NON_NEGATIVE_INT, default=0, help="Sample from the k most likely tokens (0: all).")
    add("--min-p", type=PROBABILITY, default=0.0, help="Minimum probability relative to the top token.")
    add("--repetition-penalty", type=POSITIVE, default=None, help="Penalty for repeated tokens (>1).")
    add("--repetition-context-size", type=COUNT, default=20, help="Tokens the penalty looks back at.")
    add("--seed", type=NON_NEGATIVE_INT, default=None, help="Random seed for sampling.")
    add("--max-size", type=COUNT, default=None, help="EVEv2 image resolution (default: the model's).")
    add("--adapter-path", default=None, help="Folder with LoRA adapters to apply.")
    add("--max-kv-size", type=COUNT, default=None, help="Keep at most this many tokens in the KV cache.")
    add(
        "--kv-bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=None, help="Quantize the KV cache to this many bits."
    )
    add("--kv-group-size", type=int, choices=[32, 64, 128], default=64, help="Group size for KV cache quantization.")
    add("--quantized-kv-start", type=NON_NEGATIVE_INT, default=5000, help="Quantize the KV cache from this step.")
    add("--prefill-step-size", type=COUNT, default=2048, help="Prompt tokens processed per step.")
    add("--verbose", action="store_true", help="Show the templated prompt and image details.")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def read_prompt(prompt: Optional[str], with_images: bool) -> str:
    """The question: ``-p`` text (``\\n`` for a new line), standard input for ``-``; with images and no
    question, a request to describe them."""
    if prompt is None:
        if not with_images:
            raise PromptError("Give a question with -p/--prompt (or an --image to describe).")
        return DESCRIBE
    if prompt != "-":
        return prompt.replace("\\n", "\n")
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(
            f"The prompt read from standard input is not UTF-8 text ({e.reason} at byte {e.start})."
        ) from e


def run(args: argparse.Namespace) -> None:
    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt = read_prompt(args.prompt, bool(args.image))
    model_path = args.model or str(BUNDLED_MODEL)
    model, processor = load(model_path, adapter_path=args.adapter_path, max_size=args.max_size)
    inputs = processor(prompt, args.image, args.system_prompt)
    if args.verbose:
        print(f"Prompt template {processor.template.name}:\n{inputs.prompt}")
        for path, pixels in zip(args.image, inputs.pixel_values):
            print(f"Image {path}: resized to {pixels.shape[1]}x{pixels.shape[0]}")
        print("=" * 10)
    response = None
    for response in generate_from_inputs(
        model,
        processor,
        inputs,
        args.max_tokens,
        args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
        max_kv_size=args.max_kv_size,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
        prefill_step_size=args.prefill_step_size,
    ):
        print(response.text, end="", flush=True)
    print()
    print("=" * 10)
    print(
        f"Prompt: {response.prompt_tokens} tokens ({response.image_tokens} image tokens), "
        f"{response.prompt_tps:.3f} tokens-per-sec"
    )
    print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
    print(f"Peak memory: {response.peak_memory:.3f} GB")


if __name__ == "__main__":
    sys.exit(main())
