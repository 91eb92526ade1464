"""Structured outputs: answers held to a JSON Schema, a regex or a Lark grammar by constrained decoding.

The grammar engine is llguidance. After each token it computes the set of tokens that keep the answer inside
the grammar, and ``GrammarProcessor``, an mlx-lm logits processor, sets every other logit to -inf. Each request
has its own processor, so in the engine's batch requests with different grammars, and requests without one,
decode together. llguidance rather than xgrammar or outlines-core: it computes each mask on the fly from a trie
of the vocabulary, so a new schema costs no ahead-of-time pass over the vocabulary (outlines-core indexes the
vocabulary against each schema's automaton, xgrammar compiles each schema against it) — a server sees a new
schema with nearly every client — and it needs neither torch nor a GPU kernel. ``benchmarks/structured.py``
measures what a schema costs.

A grammar travels as llguidance's serialized form (a string), so ``SamplingParams`` stays plain data.
"""

import functools
import json
from typing import Any, Dict, Optional, Union

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import EVEError

# Compact JSON (no whitespace between tokens): a model that does not write JSON by itself could otherwise
# spend its whole budget on spaces and new lines between two keys.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(EVEError, ValueError):
    """A schema, regex or grammar that cannot constrain an answer (invalid, or using what llguidance lacks)."""


def json_schema_grammar(schema: Union[Dict[str, Any], bool, str, type]) -> str:
    """The grammar of JSON values valid against ``schema``: a dict, ``true``, its JSON text, or a pydantic model
    class (its ``model_json_schema()``)."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"The JSON Schema is not valid JSON: {e}") from e
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"A JSON Schema must be an object, not {type(schema).__name__}.")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(closed(schema), defaults=_JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"Invalid JSON Schema: {e}") from e


# Where a JSON Schema holds other schemas: maps of them, lists of them, and single ones.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else")


def closed(schema: Any) -> Any:
    """``schema`` with ``"additionalProperties": false`` in each object that lists its ``properties`` and says
    nothing of other keys. An answer to it still validates against ``schema``, and a model cannot wander off into
    keys of its own (JSON Schema allows any by default). Branches of ``allOf`` are left as they are: closing each
    would forbid the other branches' keys."""
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            schema[key] = {name: closed(s) for name, s in schema[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            schema[key] = [closed(s) for s in schema[key]]
    for key in _SCHEMAS:
        if key in schema:
            schema[key] = closed(schema[key])
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")
    if isinstance(schema.get("properties"), dict) and not any(key in schema for key in open_keys):
        schema["additionalProperties"] = False
    return schema


def regex_grammar(pattern: str) -> str:
    """The grammar of the strings that match ``pattern`` (the whole answer, Rust regex syntax)."""
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def lark_grammar(lark: str) -> str:
    """A grammar written in llguidance's Lark syntax (``%json {...}`` embeds a JSON Schema)."""
    return llguidance.LLMatcher.grammar_from_lark(lark)


def response_format_grammar(response_format: Optional[Dict[str, Any]]) -> Optional[str]:
    """The grammar of an OpenAI ``response_format``: ``{"type": "json_schema", "json_schema": {"schema": ...}}``,
    ``{"type": "json_object"}`` (any JSON object), ``{"type": "regex", "regex": ...}``, or ``{"type": "text"}``
    and ``None`` (no constraint). ``GrammarError`` for anything else."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("The response format must be an object with a 'type'.")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise GrammarError("A 'json_schema' response format needs 'json_schema': {'name': ..., 'schema': {...}}.")
        return json_schema_grammar(spec["schema"])
    if kind == "regex":
        pattern = response_format.get("regex")
        if not isinstance(pattern, str):
            raise GrammarError("A 'regex' response format needs 'regex': a pattern string.")
        return regex_grammar(pattern)
    raise GrammarError(f"Unknown response format type {kind!r}: use text, json_object, json_schema or regex.")


def requested_grammar(response_format: Optional[Dict[str, Any]] = None, json_schema: Any = None) -> Optional[str]:
    """The grammar of the Python API's ``response_format=`` or ``json_schema=`` (at most one of them)."""
    if response_format is not None and json_schema is not None:
        raise GrammarError("Give json_schema or response_format, not both.")
    return json_schema_grammar(json_schema) if json_schema is not None else response_format_grammar(response_format)


def check_grammar(grammar: str, tokenizer: TokenizerWrapper) -> None:
    """``GrammarError`` with llguidance's reason when ``grammar`` cannot be used with ``tokenizer``."""
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, _engine_tokenizer(tokenizer))
    if failed:
        raise GrammarError(_one_line(f"The grammar cannot be used: {'; '.join(messages)}"))


class GrammarProcessor:
    """An mlx-lm logits processor that allows only the tokens that keep the answer inside a grammar.

    mlx-lm calls it once per generated token with the tokens so far; from the second call on, the last of them
    is the token sampled after the previous call, which the grammar consumes first. Once the grammar is
    complete only the end-of-answer tokens are allowed.
    """

    def __init__(self, grammar: str, tokenizer: TokenizerWrapper):
        self.tokenizer = _engine_tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(_one_line(f"The grammar cannot be used: {self.matcher.get_error()}"))
        self.started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            self.matcher.consume_token(tokens[-1].item())
        self.started = True
        if self.matcher.is_error():  # cannot happen when the sampled token was allowed; end the answer
            allowed = np.zeros(logits.shape[-1], bool)
            allowed[self.tokenizer.eos_tokens] = True
        else:
            bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
            allowed = np.unpackbits(bits, bitorder="little").astype(bool)
            allowed = np.pad(allowed, (0, max(0, logits.shape[-1] - allowed.size)))[: logits.shape[-1]]
        return mx.where(mx.array(allowed), logits, -mx.inf)


def _one_line(message: str) -> str:
    """llguidance's message on one line (a regex error draws the pattern and a caret under it)."""
    return " ".join(message.split())


@functools.lru_cache(maxsize=4)
def _engine_tokenizer(tokenizer: TokenizerWrapper) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer (built once: about a second for a 150k vocabulary), ending on
    any of the model's end-of-answer tokens."""
    try:
        return llguidance.hf.from_tokenizer(tokenizer._tokenizer, eos_token=sorted(tokenizer.eos_token_ids))
    except ValueError as e:
        raise GrammarError(f"Structured outputs need a fast (tokenizer.json) tokenizer: {e}") from e
