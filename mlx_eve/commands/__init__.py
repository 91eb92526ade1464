"""The command-line tools, one module each: its ``build_parser`` and its ``main``.

``main`` parses the arguments first and only then imports the library it runs (and with it mlx-lm,
transformers, Gradio or FastAPI), so that ``--help`` and a mistyped option answer at once. Each command also
runs as ``python -m mlx_eve.<command>`` (the three-line ``mlx_eve/<command>.py``) and as the ``mlx_eve.<command>``
script.
"""

import importlib

from ..errors import MissingDependencyError

COMMANDS = ["generate", "convert", "lora", "fuse", "app", "server", "caption", "evaluate"]


def require(hint: str, *packages: str) -> None:
    """``MissingDependencyError(hint)`` unless each of ``packages`` (an optional extra's) imports."""
    try:
        for package in packages:
            importlib.import_module(package)
    except ImportError as e:
        raise MissingDependencyError(hint) from e
