"""Reading a request body's fields, the same way for every API: each value checked (a 400 naming the field), the
sampling settings they all share, and the refusal of fields the server does not know."""

import json
import re
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import shorten
from ..request import MAX_STOP_LENGTH, MAX_STOPS, SamplingParams, number_limits, of_kind
from ..structured import GrammarError, response_format_grammar
from .errors import APIError

# The fields ``sampling_params`` reads, which every API accepts beside its own.
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "repetition_context_size",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
)
# OpenAI's bookkeeping fields, which do not change the answer: accepted, and left aside.
BOOKKEEPING_FIELDS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
# A UTF-16 half that JSON's "\\ud800" escapes can spell, but that is no character: it cannot be tokenized.
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 (never) to 100 (always)
# How deep a request body may nest (a JSON Schema deeper than this is not one a client means).
MAX_DEPTH = 64


def check_body(body: Dict[str, Any]) -> None:
    """A 400 for a JSON ``body`` that nests deeper than ``MAX_DEPTH``, or that has a string (a key or a value)
    with a lone surrogate, naming where."""
    todo: List[Tuple[str, int, Any]] = [("", 0, body)]
    while todo:  # not recursive: JSON can nest deeper than Python's stack
        where, depth, value = todo.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            message = f"Invalid '{where or 'body'}': the text has a lone surrogate, which is not Unicode."
            raise APIError(400, message, where or None)
        if depth > MAX_DEPTH:
            raise APIError(400, f"Invalid '{where}': the request nests deeper than {MAX_DEPTH} levels.", where)
        if isinstance(value, dict):
            todo += [(where, depth, key) for key in value]
            todo += [(f"{where}.{key}" if where else key, depth + 1, item) for key, item in value.items()]
        elif isinstance(value, list):
            todo += [(f"{where}[{i}]", depth + 1, item) for i, item in enumerate(value)]


def option(
    body: Dict[str, Any],
    name: str,
    kind: type,
    wanted: str,
    ok: Callable[[Any], bool] = lambda v: True,
    default: Any = None,
    where: str = "",
) -> Any:
    """``body[name]`` if it is a ``kind`` (``of_kind``: a float is finite, a bool is no number) that passes ``ok``;
    ``default`` when it is missing or null. ``where``: the path of ``body`` in the request, for the message."""
    value = body.get(name)
    if value is None:
        return default
    if not (of_kind(value, kind) and ok(value)):
        raise APIError(
            400, f"Invalid '{where}{name}': expected {wanted}, got {shorten(json.dumps(value))}.", where + name
        )
    return value


def string_list(body: Dict[str, Any], name: str) -> List[str]:
    """A field that is a string or a list of strings, as a list (empty when missing)."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    message = f"Invalid '{name}': expected a string or a list of strings, got {shorten(json.dumps(value))}."
    raise APIError(400, message, name)


def stop_list(body: Dict[str, Any], name: str) -> List[str]:
    """The stop strings of the field ``name`` (a string or a list), within ``MAX_STOPS`` of ``MAX_STOP_LENGTH``."""
    stops = string_list(body, name)
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_LENGTH for s in stops):
        message = f"Invalid '{name}': expected at most {MAX_STOPS} strings of at most {MAX_STOP_LENGTH} characters."
        raise APIError(400, message, name)
    return stops


def refuse_unknown(body: Dict[str, Any], known: Iterable[str], where: str = "") -> None:
    """A 400 naming the first field of ``body`` not in ``known``: a field the server would otherwise ignore may
    be one that should have changed the answer."""
    known = set(known)
    for name in body:
        if name not in known:
            raise APIError(400, f"Unsupported field '{where}{name}': this server does not implement it.", where + name)


def sampling_params(
    body: Dict[str, Any],
    vocab_size: int,
    *,
    max_tokens: Optional[int],
    stop: Sequence[str] = (),
    grammar: Optional[str] = None,
    top_logprobs: Optional[int] = None,
) -> SamplingParams:
    """The ``SAMPLING_FIELDS`` of ``body``, checked, with what the caller read from its own API's fields."""
    defaults, limits = SamplingParams(), number_limits(vocab_size)

    def number(name: str) -> Any:
        return option(body, name, *limits[name], default=getattr(defaults, name))

    return SamplingParams(
        max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
        temperature=number("temperature"),
        top_p=number("top_p"),
        top_k=number("top_k"),
        min_p=number("min_p"),
        repetition_penalty=number("repetition_penalty"),
        repetition_context_size=number("repetition_context_size"),
        presence_penalty=number("presence_penalty"),
        frequency_penalty=number("frequency_penalty"),
        logit_bias=_logit_bias(body, vocab_size),
        stop=tuple(stop),
        top_logprobs=top_logprobs,
        seed=number("seed"),
        grammar=grammar,
    )


def format_grammar(response_format: Any, name: str) -> Optional[str]:
    """The grammar of an OpenAI-style response format given as the field ``name`` (a 400 naming it if unusable)."""
    try:
        return response_format_grammar(response_format)
    except GrammarError as e:
        raise APIError(400, f"Invalid '{name}': {e}", name) from e


def _logit_bias(body: Dict[str, Any], vocab_size: int) -> tuple:
    """OpenAI's ``logit_bias``: token ids (as strings) to a bias from -100 to 100."""
    biases = option(body, "logit_bias", dict, "an object of token ids to biases", default={})
    pairs = []
    for token in biases:
        if not (token.isascii() and token.isdigit() and len(token) <= 10 and int(token) < vocab_size):
            raise APIError(
                400, f"Invalid 'logit_bias': {shorten(token)!r} is not a token id below {vocab_size}.", "logit_bias"
            )
        wanted = f"a number from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}"
        pairs.append(
            (int(token), option(biases, token, float, wanted, lambda v: abs(v) <= MAX_LOGIT_BIAS, where="logit_bias."))
        )
    return tuple(pairs)
