"""The ``generate`` command: ask a model about images, streaming the answer, then mlx-lm's closing lines."""

import argparse
import os
import sys
from pathlib import Path
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
from ..errors import EVEError, PromptError, run_cli
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
    add(
        "--prompt-cache-file",
        type=prompt_cache_file,
        default=None,
        metavar="FILE",
        help="A .safetensors file keeping the KV cache of the prompt up to its last image, for the next question.",
    )
    add("--verbose", action="store_true", help="Show the templated prompt and image details.")
    return p


def prompt_cache_file(text: str) -> Path:
    """An option type: a ``.safetensors`` file that exists or can be made."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name ending in .safetensors")
    if path.exists() and not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a regular file")
    if path.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"{text} does not end in .safetensors")
    folder = path.parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {folder}")
    return path


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
    prompt_cache = PromptCacheFile(args.prompt_cache_file, args, group) if args.prompt_cache_file else None
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
        **(prompt_cache.generation_arguments(model, processor, inputs) if prompt_cache else {}),
    ):
        show(response.text, end="", flush=True)
    show()
    if args.json_schema is not None and response.finish_reason == "length":
        show("[WARNING] The answer reached --max-tokens before its JSON was complete.", file=sys.stderr)
    show("=" * 10)
    reused = prompt_cache.reused if prompt_cache else 0
    show(
        f"Prompt: {response.prompt_tokens + reused} tokens ({response.image_tokens} image tokens), "
        f"{response.prompt_tps:.3f} tokens-per-sec"
    )
    if prompt_cache:
        show(prompt_cache.save())
    show(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
    show(f"Peak memory: {response.peak_memory:.3f} GB")


class PromptCacheFile:
    """``--prompt-cache-file``: the KV cache of a prompt's start, for the next question about the same images.

    It holds the prompt up to the end of its last image (the system prompt, the images and the text between
    them), which a new question about the same images shares, so that they are not read again; a text-only
    prompt keeps all but its last token. A file of this model whose prompt starts the same way is used, and
    only the rest of the prompt is prefilled; otherwise (another model, images or text, a damaged file) it is
    computed again, then written (atomically) after the answer.
    """

    def __init__(self, path: Path, args: argparse.Namespace, group):
        if args.kv_bits is not None or args.max_kv_size is not None:
            raise EVEError(
                "--prompt-cache-file keeps the whole KV cache, unquantized: leave out --kv-bits and --max-kv-size."
            )
        if group.size() > 1:
            raise EVEError("--prompt-cache-file cannot be used with a model split over processes.")
        self.path, self.adapter_path = path, args.adapter_path
        self.reused = 0

    def generation_arguments(self, model, processor, inputs) -> dict:
        """``prompt_cache`` (the file's, if it holds the start of this prompt, else a new one) and ``reused``."""
        from mlx_lm.models.cache import make_prompt_cache

        from ..disk_cache import UnusableCacheFile, model_identity, read_cache
        from ..engine import cache_key
        from ..models.base import image_spans

        self.identity = model_identity(model, processor, self.adapter_path)
        key = cache_key(inputs)
        spans = image_spans(inputs.input_ids)
        self.prefix = key[: min(spans[-1][1] if spans else len(key), len(key) - 1)]
        self.cache = None
        if self.path.exists():
            try:
                stored, cache = read_cache(self.path, self.identity)
                if list(stored) != self.prefix:
                    raise UnusableCacheFile("it holds the start of another prompt (other images or text)")
                self.cache, self.reused = cache, len(stored)
            except UnusableCacheFile as e:
                print(f"[WARNING] {self.path} is not used but made again: {e}.", file=sys.stderr)
        if self.cache is None:
            self.cache = make_prompt_cache(model)
        return {"prompt_cache": self.cache, "reused": self.reused}

    def save(self) -> str:
        """Write the cache cut back to the prompt's start (unless it came from the file); what was done, in words."""
        from mlx_lm.models.cache import trim_prompt_cache

        from ..disk_cache import save_atomically

        if self.reused:
            return f"Prompt cache: {self.reused} tokens read from {self.path}"
        trim_prompt_cache(self.cache, self.cache[0].offset - len(self.prefix))
        try:
            save_atomically(self.path, self.cache, self.identity, self.prefix)
        except OSError as e:
            return f"[WARNING] The prompt cache could not be written to {self.path}: {e.strerror or e}"
        return f"Prompt cache: {len(self.prefix)} tokens saved to {self.path}"
