"""The ``server`` command: an OpenAI-compatible HTTP server for an EVE model (the library is ``mlx_eve.api``).

python -m mlx_eve.server --model BAAI/EVE-7B-HD-v2.0    # http://127.0.0.1:8080/v1
"""

import argparse
import os
from pathlib import Path
from typing import List, Optional

from ..arguments import COUNT, NON_NEGATIVE_INT, PORT, POSITIVE, ArgumentParser, add_model_options, size_in_bytes
from ..errors import run_cli
from . import require

INSTALL_HINT = "The server needs FastAPI, uvicorn and prometheus-client: pip install 'mlx-eve[server]'"
API_KEY_ENV = "MLX_EVE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Serve an EVE model with an OpenAI-compatible API (chat completions with images).")
    add = p.add_argument
    add_model_options(p)
    add("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1: this computer only).")
    add(
        "--port",
        type=PORT,
        default=8080,
        help="Port to listen on (default 8080).",
    )
    add(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_ENV),
        help=f"Require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV}, else no key).",
    )
    add(
        "--allow-local-images",
        action="store_true",
        help="Let requests name images by local path or file:// URL (files this process can read), and by URLs of "
        "loopback, private and link-local addresses.",
    )
    add("--no-image-urls", action="store_true", help="Refuse http(s) image URLs: images come inline (data: URIs).")
    add(
        "--keep-image-positions",
        action="store_true",
        help="Keep images where a message has them; by default a message's images go before its text, as EVE "
        "was trained.",
    )
    add(
        "--prompt-cache-bytes",
        type=NON_NEGATIVE_INT,
        default=2**30,
        help="Memory for KV caches kept for reuse by later requests (default 1 GiB; 0: none).",
    )
    add(
        "--prompt-cache-dir",
        type=Path,
        metavar="FOLDER",
        help="Keep the KV caches of image prompts in FOLDER too, across restarts (default: none).",
    )
    add(
        "--prompt-cache-dir-bytes",
        type=COUNT,
        default=10 * 2**30,
        help="Largest size of --prompt-cache-dir; the least recently used files go first (default 10 GiB).",
    )
    add(
        "--max-memory",
        type=size_in_bytes,
        metavar="SIZE",
        help="Memory the server may use (bytes, or 24G): a request is admitted only when the KV cache it may grow to "
        "and its prefill fit beside the model, the prompt cache and the others; one that never can is refused (413). "
        "Default: 75%% of the machine's (Metal: of its recommended working set).",
    )
    add("--max-batch-size", type=COUNT, default=8, help="Requests decoded together (default 8).")
    add("--max-queued", type=COUNT, default=64, help="Requests waiting beyond the batch before 503 (default 64).")
    add("--max-body-bytes", type=COUNT, default=64 * 2**20, help="Largest request body (default 64 MiB; else 413).")
    add("--max-image-bytes", type=COUNT, default=20 * 2**20, help="Largest image file (default 20 MiB).")
    add("--image-timeout", type=POSITIVE, default=30.0, help="Seconds to download an image URL (default 30).")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> None:
    require(INSTALL_HINT, "fastapi", "uvicorn", "prometheus_client")
    # The library (and mlx-lm with it) once the arguments are good: see the package's docstring.
    from ..api.lifecycle import serve

    serve(args)
