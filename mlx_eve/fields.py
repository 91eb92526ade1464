"""Checking values read from a JSON file against the dataclass they will build, before building it."""

import dataclasses
import types
import typing
from typing import Any, List

# Sizes and counts: a zero or negative one is never meaningful.
POSITIVE = {
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
    "mm_hidden_size",
    "max_position_embeddings",
    "patch_stride",
    "conv_stride",
    "dense_stride",
    "image_size",
    "image_size_clip",
    "patch_stride_clip",
    "max_size",
}


def field_problems(values: dict, cls: type) -> List[str]:
    """What is wrong with ``values`` as ``cls(**values)``: missing required fields, values of the wrong
    type (a string where a number belongs), sizes below 1. Keys ``cls`` does not have are ignored."""
    hints = typing.get_type_hints(cls)
    problems = []
    for field in dataclasses.fields(cls):
        if field.name not in values:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                problems.append(f"{field.name} is missing")
            continue
        value, hint = values[field.name], hints.get(field.name, Any)
        if not _fits(value, hint):
            problems.append(f"{field.name} is {value!r}, which is not {_describe(hint)}")
        elif field.name in POSITIVE and isinstance(value, (int, float)) and value < 1:
            problems.append(f"{field.name} is {value!r}, which is less than 1")
    return problems


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, (list, tuple))
    cls = origin or hint
    return not isinstance(cls, type) or isinstance(value, cls)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}
    return names.get(typing.get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))
