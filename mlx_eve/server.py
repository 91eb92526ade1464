"""``python -m mlx_eve.server``: the OpenAI-compatible server (``mlx_eve.commands.server``)."""

import sys

from .commands.server import main

if __name__ == "__main__":
    sys.exit(main())
