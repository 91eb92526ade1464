"""What structured outputs cost per generated token, against unconstrained decoding, on one model in one run.

Every answer is exactly ``--max-tokens`` tokens long, so tokens per second compare per token: decoding is greedy,
a logit bias holds off the end-of-answer tokens and every token that writes "}" (the same bias in every run), and
the schema's last field is a string longer than any answer. Timed: (a) unconstrained, (b)
``response_format={"type": "json_object"}`` and (c) a JSON Schema of five fields, each one request through
``stream_generate`` (decoding only: mlx-lm's generation tokens/s); (d) 8 requests in one ``Engine`` batch, half
with the schema and half without, against 8 without (the engine's prefills subtracted). Also the one-off costs:
llguidance's view of the tokenizer (built once per tokenizer) and compiling a schema (``json_schema_grammar``,
then the first ``GrammarProcessor``). The ways of decoding take turns, each repeat starting with the next one;
the fastest repeat counts. Since on a busy machine the differences can be smaller than the noise, the masks of (b)
and (c) are also timed alone: their answers replayed through a new ``GrammarProcessor``, without the model.

    python benchmarks/structured.py
    python benchmarks/structured.py --model BAAI/EVE-7B-HD-v2.0 --max-tokens 128
"""

import argparse
import functools
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
from speed import machine

from mlx_eve import load, stream_generate, structured
from mlx_eve.demo import BUNDLED_MODEL, EXAMPLE_IMAGES
from mlx_eve.engine import Engine
from mlx_eve.request import SamplingParams

PROMPT = "Describe the image."
IMAGE = EXAMPLE_IMAGES / "shapes.png"
# More than any answer can write before --max-tokens ends it, so the answer never completes the schema.
NOTE_LENGTH = 1 << 20
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue", "yellow", "purple"]},
        "shape": {"enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "filled": {"type": "boolean"},
        "note": {"type": "string", "minLength": NOTE_LENGTH},
    },
    "required": ["colour", "shape", "count", "filled", "note"],
    "additionalProperties": False,
}
FIELDS = len(SCHEMA["properties"])
# The single requests, each with the arguments of ``stream_generate`` that constrain it.
SINGLE = {
    "(a) unconstrained": {},
    "(b) json_object": {"response_format": {"type": "json_object"}},
    f"(c) json_schema, {FIELDS} fields": {"json_schema": SCHEMA},
}
HELD_OFF = -1000.0  # the bias of the tokens that would end an answer


def held_off_tokens(tokenizer) -> Dict[int, float]:
    """The logit bias that keeps every answer going: the end-of-answer tokens, and those that write "}" (which
    could close a JSON object)."""
    ids = set(tokenizer.eos_token_ids)
    ids.update(token for token in tokenizer.vocab.values() if "}" in tokenizer.decode([token]))
    return {token: HELD_OFF for token in sorted(ids)}


def best_seconds(run: Callable[[], None], repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``run``."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return min(times)


def one_request(model, processor, max_tokens: int, bias: Dict[int, float], **grammar) -> Tuple[int, float]:
    """Generated tokens and decoding tokens/s of one answer through ``stream_generate``."""
    last = list(stream_generate(model, processor, PROMPT, IMAGE, max_tokens, logit_bias=bias, **grammar))[-1]
    return last.generation_tokens, last.generation_tps


def mask_seconds(model, processor, max_tokens: int, bias: Dict[int, float], repeats: int, **grammar) -> float:
    """Seconds per token of the grammar's mask alone: an answer it allowed, replayed token by token through a
    new ``GrammarProcessor`` without the model (fastest of ``repeats``)."""
    responses = list(stream_generate(model, processor, PROMPT, IMAGE, max_tokens, logit_bias=bias, **grammar))
    tokens = [r.token for r in responses]
    logits = mx.zeros((1, responses[0].logprobs.size))
    compiled = structured.requested_grammar(**grammar)

    def replay() -> float:
        mask = structured.GrammarProcessor(compiled, processor.tokenizer)
        tic = time.perf_counter()
        for i in range(len(tokens)):
            # From its second call on, the processor consumes the last token: the one sampled after the call before.
            mx.eval(mask(mx.array(tokens[:i] or [0]), logits))
        return time.perf_counter() - tic

    return min(replay() for _ in range(repeats)) / len(tokens)


def one_batch(engine: Engine, params: List[SamplingParams]) -> Tuple[int, float]:
    """Generated tokens and decoding tokens/s of answers decoded together (wall time less the prefills)."""
    tic = time.perf_counter()
    streams = [engine.submit(PROMPT, [IMAGE], p) for p in params]
    usages = [list(stream)[-1].usage for stream in streams]
    decoding = time.perf_counter() - tic - sum(usage.prompt_seconds for usage in usages)
    tokens = sum(usage.completion_tokens for usage in usages)
    return tokens, tokens / decoding


def benchmark(model_path: str, max_tokens: int, batch: int, repeats: int, warmup: int) -> str:
    model, processor = load(model_path)
    tokenizer = processor.tokenizer
    one_off = one_off_costs(tokenizer, repeats)
    bias = held_off_tokens(tokenizer)
    grammar = structured.json_schema_grammar(SCHEMA)
    plain = SamplingParams(max_tokens=max_tokens, logit_bias=tuple(bias.items()))
    constrained = SamplingParams(max_tokens=max_tokens, logit_bias=tuple(bias.items()), grammar=grammar)
    engine = Engine(model, processor, max_batch_size=batch, max_queued=batch, prompt_cache_bytes=0)
    half = batch // 2
    runs = {
        name: functools.partial(one_request, model, processor, max_tokens, bias, **kwargs)
        for name, kwargs in SINGLE.items()
    }
    runs[f"(d) batch of {batch}, unconstrained"] = lambda: one_batch(engine, [plain] * batch)
    runs[f"(d) batch of {batch}, {half} json_schema + {batch - half} unconstrained"] = lambda: one_batch(
        engine, [constrained] * half + [plain] * (batch - half)
    )
    measured: Dict[str, List[Tuple[int, float]]] = {name: [] for name in runs}
    names = list(runs)
    try:
        for repeat in range(warmup + repeats):
            # Each repeat starts with another run, so that none always follows the same one.
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                result = runs[name]()
                if repeat >= warmup:
                    measured[name].append(result)
    finally:
        engine.close()
    masks = {
        name: mask_seconds(model, processor, max_tokens, bias, repeats, **kwargs)
        for name, kwargs in SINGLE.items()
        if kwargs
    }
    # Each group's first run is the one the others are compared with.
    groups = [list(SINGLE), list(runs)[len(SINGLE) :]]
    return report(model_path, len(tokenizer.vocab), max_tokens, repeats, measured, groups, masks, one_off)


def one_off_costs(tokenizer, repeats: int) -> Dict[str, float]:
    """Seconds (fastest of ``repeats``) of building llguidance's tokenizer and of compiling each grammar."""
    costs = {}

    def build_tokenizer():
        structured._engine_tokenizer.cache_clear()
        structured._engine_tokenizer(tokenizer)

    costs[f"llguidance tokenizer ({len(tokenizer.vocab)} tokens)"] = best_seconds(build_tokenizer, repeats)
    costs[f"json_schema_grammar, {FIELDS} fields"] = best_seconds(
        lambda: structured.json_schema_grammar(SCHEMA), repeats
    )
    for name, grammar in [
        (f"{FIELDS} fields", structured.json_schema_grammar(SCHEMA)),
        ("json_object", structured.response_format_grammar({"type": "json_object"})),
    ]:
        compile_grammar = functools.partial(structured.GrammarProcessor, grammar, tokenizer)
        costs[f"GrammarProcessor (compiles the grammar), {name}"] = best_seconds(compile_grammar, repeats)
    return costs


def report(
    model_path: str,
    vocab: int,
    max_tokens: int,
    repeats: int,
    measured: Dict[str, List[Tuple[int, float]]],
    groups: List[List[str]],
    masks: Dict[str, float],
    one_off: Dict[str, float],
) -> str:
    """Markdown tables: the speeds, each against the first of its group; the masks alone, against the time of an
    unconstrained token; the one-off costs."""
    lines = [
        f"Model {model_path} ({vocab} tokens), {max_tokens} tokens per answer, greedy; fastest of {repeats} repeats.",
        "",
        "| decoding | tokens generated | tokens/s | ÷ unconstrained | ms per token more |",
        "|---|---|---|---|---|",
    ]
    speeds = {name: max(rate for _, rate in results) for name, results in measured.items()}
    for group in groups:
        baseline = speeds[group[0]]
        for name in group:
            tokens = "/".join(str(count) for count in sorted({count for count, _ in measured[name]}))
            more = f"{1e3 / speeds[name] - 1e3 / baseline:.3f}" if name != group[0] else "–"
            lines.append(f"| {name} | {tokens} | {speeds[name]:.1f} | {speeds[name] / baseline:.3f} | {more} |")
    unconstrained = speeds[groups[0][0]]
    lines += [
        "",
        "| mask alone (replayed without the model) | ms per token | share of an unconstrained token's time |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {1e3 * seconds:.3f} | {seconds * unconstrained:.1%} |" for name, seconds in masks.items()]
    lines += ["", "| once | ms |", "|---|---|"]
    lines += [f"| {name} | {1e3 * seconds:.3f} |" for name, seconds in one_off.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="What a JSON Schema costs per generated token against unconstrained decoding, in one run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The defaults (the bundled demo model) run in under a minute on a 2-core CPU.",
    )
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="Model folder or Hugging Face repo (default: the demo).")
    p.add_argument("--max-tokens", type=int, default=128, help="Tokens of every answer (default %(default)s).")
    p.add_argument("--batch", type=int, default=8, help="Requests of the batched runs (default %(default)s).")
    p.add_argument("--repeats", type=int, default=10, help="Timed repeats; the fastest counts (default %(default)s).")
    p.add_argument("--warmup", type=int, default=1, help="Untimed runs before the repeats.")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"mlx-eve structured-output benchmark on {machine()}; load average {os.getloadavg()[0]:.2f}")
    print(benchmark(args.model, args.max_tokens, args.batch, args.repeats, args.warmup))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
