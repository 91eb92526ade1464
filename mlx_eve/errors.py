"""Errors a user can act on. The command-line tools print their message without a traceback."""

import sys
from typing import Callable


class EVEError(Exception):
    pass


class ImageError(EVEError, ValueError):
    """An image that cannot be read or used (corrupt, empty, too large, unsupported)."""


class PromptError(EVEError, ValueError):
    """A prompt or conversation that cannot be rendered: empty, wrong roles or content, misplaced images."""


class PromptTooLongError(EVEError, ValueError):
    """The prompt (text plus image tokens) does not fit in the model's context."""


class CheckpointError(EVEError, ValueError):
    """A checkpoint that does not match the model: unknown type, missing, unexpected or mis-shaped weights."""


class ModelNotFoundError(EVEError, FileNotFoundError):
    """Neither a local model folder nor a Hugging Face repo that could be downloaded."""


class MissingDependencyError(EVEError, ImportError):
    """An optional package is needed for this input (e.g. torch for ``.bin`` checkpoints)."""


def run_cli(command: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Run a command-line tool: an ``EVEError`` becomes one line on stderr (exit 1), Ctrl-C exit 130."""
    try:
        command()
    except EVEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    return 0


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis) for an error message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
