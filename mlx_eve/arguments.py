"""Command-line parsing shared by the tools: option types that refuse a bad value while the arguments are
parsed (the same checks serve YAML configs), and a parser whose mistakes are reported in one line."""

import argparse
import json
import math
from pathlib import Path
from typing import Callable, NoReturn

from .demo import BUNDLED_MODEL


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one ``error:`` line (exit code 2), without the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def number(kind: type, wanted: str, ok: Callable[[float], bool] = lambda value: True) -> Callable[[str], float]:
    """An option type: a finite ``kind`` (int or float) that passes ``ok``; ``wanted`` describes it."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return convert


def size_in_bytes(text: str) -> int:
    """An option type: a number of bytes, or of KiB, MiB, GiB with the suffix K, M or G (``16G``)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    scale = units.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a size in bytes, or with K, M or G (16G), got {text!r}")
    return int(value)


def existing(what: str, exists: Callable[[Path], bool]) -> Callable[[str], Path]:
    """An option type: a path that must exist as ``what``."""

    def convert(text: str) -> Path:
        if not exists(Path(text)):
            raise argparse.ArgumentTypeError(f"no such {what}: {text}")
        return Path(text)

    return convert


# The floating-point types a model can be converted to or loaded in.
DTYPES = ["float16", "bfloat16", "float32"]
# mlx-lm's mixed-precision recipes (mlx_lm.convert.QUANT_RECIPES), named here so that parsing needs no mlx-lm.
QUANT_RECIPES = ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]
# How ``mlx_eve.scoring`` can compare an answer with its references.
METRICS = ("exact", "contains")

NUMBER = number(float, "a number")
POSITIVE = number(float, "a number > 0", lambda v: v > 0)
NON_NEGATIVE = number(float, "a number >= 0", lambda v: v >= 0)
FRACTION = number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
PROBABILITY = number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
COUNT = number(int, "an integer >= 1", lambda v: v >= 1)
COUNT_OR_ALL = number(int, "an integer >= 1, or -1 for all", lambda v: v >= 1 or v == -1)
NON_NEGATIVE_INT = number(int, "an integer >= 0", lambda v: v >= 0)
MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer
SEED = number(int, f"an integer from 0 to {MAX_SEED}", lambda v: 0 <= v <= MAX_SEED)
PORT = number(int, "a port number (1-65535)", lambda v: 1 <= v <= 65535)
FILE = existing("file", Path.is_file)
FOLDER = existing("folder", Path.is_dir)
FILE_OR_FOLDER = existing("file or folder", Path.exists)


def add_model_options(parser: argparse.ArgumentParser, resolution: str = "EVEv2 image resolution") -> None:
    """``--model`` (the bundled demo model by default), ``--adapter-path`` and ``--max-size`` (``resolution``
    names it in the help): what every command that loads a model to answer questions takes."""
    add = parser.add_argument
    add(
        "--model",
        default=str(BUNDLED_MODEL),
        help=f"Model folder or Hugging Face repo (default: the bundled {BUNDLED_MODEL.name}).",
    )
    add("--adapter-path", type=FOLDER, default=None, help="Folder with LoRA adapters to apply.")
    add("--max-size", type=COUNT, default=None, help=f"{resolution} (default: the model's).")


def json_schema_file(text: str) -> dict:
    """An option type: the JSON Schema a file holds. Whether the grammar engine can use it is checked once the
    model's tokenizer is loaded."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text} is not JSON: {e}") from e
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{text} is not a JSON Schema, which is a JSON object")
    return schema
