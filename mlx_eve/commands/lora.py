"""Fine-tune EVE on image+conversation data: LoRA, DoRA, QLoRA (LoRA on a quantized model) or full.

    python -m mlx_eve.lora --model BAAI/EVE-7B-HD-v2.0 --train --data my_data/ --iters 600

Every option can also come from a YAML file (``-c config.yaml``, keys as the long option names with
underscores), checked exactly as on the command line; options given on the command line win. Several
machines: ``mlx.launch ... mlx_eve.lora ...``.
"""

import argparse
import sys
import types
from pathlib import Path
from typing import Callable, List, Optional

import yaml

from ..arguments import (
    COUNT,
    COUNT_OR_ALL,
    FILE,
    FILE_OR_FOLDER,
    FOLDER,
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    NUMBER,
    POSITIVE,
    SEED,
    ArgumentParser,
    number,
)
from ..demo import BUNDLED_MODEL
from ..errors import EVEError, run_cli
from ..families import FAMILIES

# mlx-lm's nesting of the LoRA options in a YAML config.
LORA_PARAMETERS = ("rank", "scale", "dropout")


SIZE = number(int, "an integer >= 32", lambda v: v >= 32)


def build_parser() -> argparse.ArgumentParser:
    """Every option with its default, type, range and help: their one definition (YAML configs too)."""
    p = ArgumentParser(description="LoRA, QLoRA or full fine-tuning of EVE models on image+text data.")
    for add_options in (_model_and_data, _what_trains, _optimisation, _checkpoints_and_reports):
        add_options(p.add_argument)
    return p


def _model_and_data(add: Callable) -> None:
    """The model, what to do, and the data."""
    add(
        "--model",
        default=str(BUNDLED_MODEL),
        help="Model folder or Hugging Face repo; a 4-bit one gives QLoRA (default: the bundled demo model).",
    )
    add("--train", action="store_true", help="Train.")
    add("--test", action="store_true", help="Report the loss on the test split.")
    add(
        "--data",
        type=FILE_OR_FOLDER,
        default=Path("data"),
        help="Folder with train/valid/test.jsonl, or one LLaVA .json/.jsonl file (default ./%(default)s).",
    )
    add("--image-folder", type=FOLDER, help="Where relative image paths point (default: next to the data file).")


def _what_trains(add: Callable) -> None:
    """LoRA, DoRA or every weight, and where."""
    add("--fine-tune-type", choices=["lora", "dora", "full"], default="lora", help="(default %(default)s)")
    add(
        "--targets",
        choices=sorted({t for family in FAMILIES.values() for t in family.lora_targets}),
        help="LoRA on EVEv2's text, visual (moe_*) or both branches (default both); EVEv1: decoder.",
    )
    add("--train-patch-embedding", action="store_true", help="Also train the patch embedding layer fully.")
    add(
        "--freeze-patch-embedding",
        action="store_true",
        help="Full fine-tuning: keep the patch embedding (and EVEv1's projector) as it is.",
    )
    add(
        "--num-layers",
        type=COUNT_OR_ALL,
        default=16,
        help="Adapt the last N decoder layers (-1: all; default %(default)s).",
    )
    add("--lora-rank", type=COUNT, default=8, help="LoRA rank (default %(default)s).")
    add("--lora-scale", type=NUMBER, default=20.0, help="LoRA scale (default %(default)s).")
    add("--lora-dropout", type=FRACTION, default=0.0, help="LoRA dropout, in [0, 1) (default %(default)s).")


def _optimisation(add: Callable) -> None:
    """Batches, steps, the learning rate and its schedule, the optimizer, memory."""
    add("--batch-size", type=COUNT, default=4, help="Global batch size (default %(default)s).")
    add("--iters", type=COUNT, default=1000, help="Training steps (default %(default)s).")
    add("--learning-rate", type=POSITIVE, default=1e-5, help="Peak learning rate (default %(default)s).")
    add(
        "--patch-embedding-lr-scale",
        type=POSITIVE,
        default=1.0,
        help="The patch embedding's learning rate relative to the rest (default %(default)s).",
    )
    add(
        "--lr-schedule",
        choices=["constant", "cosine", "linear"],
        default="constant",
        help="After the warm-up: constant, or decay to 10%% of the peak at the last update (default %(default)s).",
    )
    add(
        "--warmup",
        type=NON_NEGATIVE_INT,
        default=0,
        help="Optimizer updates of linear warm-up from 1%% of the peak (default %(default)s).",
    )
    add("--optimizer", choices=["adam", "adamw"], default="adam", help="(default %(default)s)")
    add("--weight-decay", type=NON_NEGATIVE, default=0.0, help="AdamW weight decay (default %(default)s).")
    add("--max-grad-norm", type=POSITIVE, help="Clip the gradient norm to this (default: no clipping).")
    add("--grad-checkpoint", action="store_true", help="Recompute layer activations to save memory.")
    add("--grad-accumulation-steps", type=COUNT, default=1, help="Batches per optimizer update (default %(default)s).")
    add(
        "--max-seq-length",
        type=COUNT,
        default=2048,
        help="Longest sample in tokens, image tokens included (default %(default)s).",
    )
    add("--max-size", type=SIZE, help="EVEv2 training image resolution (default: the model's).")


def _checkpoints_and_reports(add: Callable) -> None:
    """Where adapters and checkpoints go, how often the run reports, the config file."""
    add("--adapter-path", default="adapters", help="Where adapters and checkpoints go (default ./%(default)s).")
    add("--resume-adapter-file", type=FILE, help="Start from these adapter weights (fresh optimizer).")
    add("--resume", action="store_true", help="Continue from the checkpoint in --adapter-path.")
    add("--save-every", type=COUNT, default=100, help="Checkpoint every N steps (default %(default)s).")
    add("--steps-per-report", type=COUNT, default=10, help="Training loss every N steps (default %(default)s).")
    add("--steps-per-eval", type=COUNT, default=200, help="Validation loss every N steps (default %(default)s).")
    add("--val-batches", type=COUNT_OR_ALL, default=25, help="Validation batches (-1: all; default %(default)s).")
    add("--test-batches", type=COUNT_OR_ALL, default=500, help="Test batches (-1: all; default %(default)s).")
    add("--seed", type=SEED, default=0, help="Random seed (default %(default)s).")
    add("-c", "--config", type=FILE, help="YAML file of any of these options, as learning_rate: 1e-4.")


def resolve_args(argv: Optional[List[str]] = None) -> types.SimpleNamespace:
    """The command line, over the YAML config, over the defaults. A bad value on the command line exits
    with argparse's usage error; one in the config raises ``EVEError`` naming the file and key."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        # The config's values as flags in front of the command line's: parsed by the same rules, and
        # argparse keeps the last occurrence, so the command line wins.
        args = parser.parse_args(config_flags(args.config) + argv)
    return types.SimpleNamespace(**{k: v for k, v in vars(args).items() if k != "config"})


def config_flags(path: Path) -> List[str]:
    """A YAML config as command-line flags (``learning_rate: 1e-4`` → ``--learning-rate=1e-4``), each value
    checked by its option's type, choices and range. ``null`` leaves the default; mlx-lm's nested
    ``lora_parameters: {rank, scale, dropout}`` works too."""
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise EVEError(f"{path}: not valid YAML{where}: {problem}") from None
    if config is None:
        return []
    if not isinstance(config, dict):
        raise EVEError(f"{path}: expected 'option: value' lines, not a {type(config).__name__}")
    nested = config.pop("lora_parameters", None) or {}
    if not isinstance(nested, dict):
        raise EVEError(f"{path}: lora_parameters: expected rank, scale and/or dropout under it")
    twice = [f"lora_{k}" for k in nested if f"lora_{k}" in config]
    if twice:
        raise EVEError(f"{path}: {', '.join(twice)} given both on its own and under lora_parameters")
    # (name in messages, option, value)
    entries = [(str(k), str(k), v) for k, v in config.items()]
    entries += [(f"lora_parameters.{k}", f"lora_{k}" if k in LORA_PARAMETERS else None, v) for k, v in nested.items()]
    checker = build_parser()
    checker.exit_on_error = False  # raise, so the message can name the file and key
    defaults = vars(checker.parse_args([]))
    del defaults["config"]  # no config within a config
    unknown = [name for name, dest, _ in entries if dest not in defaults]
    if unknown:
        raise EVEError(f"{path}: unknown option(s): {', '.join(unknown)}")
    flags = []
    for name, dest, value in entries:
        if value is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if isinstance(defaults[dest], bool):  # a switch
            if not isinstance(value, bool):
                raise EVEError(f"{path}: {name}: expected true or false, got {value!r}")
            flags += [flag] if value else []
            continue
        if isinstance(value, (dict, list)):
            raise EVEError(f"{path}: {name}: expected a single value, got {value!r}")
        try:
            checker.parse_args([f"{flag}={value}"])
        except argparse.ArgumentError as e:
            raise EVEError(f"{path}: {name}: {e.message}") from None
        flags.append(f"{flag}={value}")
    return flags


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(lambda: run(resolve_args(argv)))


def run(args: types.SimpleNamespace) -> None:
    # The library (and mlx-lm with it) once the arguments are good: see the package's docstring.
    from ..fine_tuning import fine_tune

    fine_tune(args)
