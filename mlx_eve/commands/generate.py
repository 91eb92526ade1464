"""The ``generate`` command: ask a model about images, streaming the answer, then mlx-lm's closing lines."""

import argparse
import sys
from typing import List, Optional

from ..arguments import (
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    PROBABILITY,
    SEED,
    ArgumentParser,
    add_model_options,
    json_schema_file,
    number,
)
from ..errors import PromptError, run_cli
from ..prompts import DESCRIBE


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Ask an EVE model about one or more images, streaming the answer.")
    add = p.add_argument
    add_model_options(p)
    add("--image", nargs="+", default=[], help="Image paths or URLs, in the order of <image> in the prompt.")
    add("--prompt", "-p", default=None, help=f"The question ('-' reads stdin; with images: {DESCRIBE!r}).")
    add("--system-prompt", default=None, help="Replace the template's system prompt.")
    add("--max-tokens", "-m", type=COUNT, default=256, help="Maximum number of tokens to generate.")
    add(
        "--json-schema",
        type=json_schema_file,
        default=None,
        metavar="FILE",
        help="A JSON Schema file: the answer is JSON that follows it (constrained decoding).",
    )
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
    add("--seed", type=SEED, default=None, help="Random seed for sampling.")
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
    # The library (and mlx-lm with it) once the arguments are good: see the package's docstring.
    import mlx.core as mx

    from ..generation import generate_from_inputs
    from ..loading import load

    # Under `mlx.launch` every process runs this, with its part of the model; rank 0 shows the answer.
    group = mx.distributed.init()

    def show(*values, **kwargs) -> None:
        if group.rank() == 0:
            print(*values, **kwargs)

    prompt = read_prompt(args.prompt, bool(args.image))
    model_path = args.model
    model, processor = load(model_path, adapter_path=args.adapter_path, max_size=args.max_size, group=group)
    # Seeded after loading, which draws random numbers only when sharding. All ranks must sample alike:
    # without --seed they take rank 0's.
    if args.seed is not None:
        mx.random.seed(args.seed)
    elif group.size() > 1:
        seed = mx.random.randint(0, 2**31 - 1, ()) if group.rank() == 0 else mx.array(0)
        mx.random.seed(mx.distributed.all_sum(seed, group=group, stream=mx.cpu).item())
    inputs = processor(prompt, args.image, args.system_prompt)
    if args.verbose:
        show(f"Prompt template {processor.template.name}:\n{inputs.prompt}")
        for path, pixels in zip(args.image, inputs.pixel_values):
            show(f"Image {path}: resized to {pixels.shape[1]}x{pixels.shape[0]}")
        show("=" * 10)
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
        json_schema=args.json_schema,
    ):
        show(response.text, end="", flush=True)
    show()
    if args.json_schema is not None and response.finish_reason == "length":
        show("[WARNING] The answer reached --max-tokens before its JSON was complete.", file=sys.stderr)
    show("=" * 10)
    show(
        f"Prompt: {response.prompt_tokens} tokens ({response.image_tokens} image tokens), "
        f"{response.prompt_tps:.3f} tokens-per-sec"
    )
    show(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
    show(f"Peak memory: {response.peak_memory:.3f} GB")
