"""The ``app`` command: chat with a model about images in the browser (the page is ``mlx_eve.chat_app``).

Ctrl-C stops the answer being generated after its current token and exits with code 130.
"""

import argparse
from typing import List, Optional

from ..arguments import PORT, ArgumentParser, add_model_options
from ..errors import run_cli
from . import require

INSTALL_HINT = "The chat app needs Gradio: pip install 'mlx-eve[app]'"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Chat with an EVE model about images, in your browser.")
    add = p.add_argument
    add_model_options(p, resolution="Default EVEv2 image resolution")
    add("--host", default="127.0.0.1", help="Address to serve on (default 127.0.0.1: this computer only).")
    add(
        "--port",
        type=PORT,
        default=None,
        help="Port (default: 7860, or the next free one).",
    )
    add("--open", action="store_true", help="Open the page in your web browser.")
    add(
        "--share",
        action="store_true",
        help="Also serve the app on a public gradio.live link, through Gradio's share servers: anyone with the "
        "link can use it.",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    require(INSTALL_HINT, "gradio")
    # The library (and mlx-lm with it) once the arguments are good: see the package's docstring.
    from ..chat_app import serve

    serve(args)
