"""``python -m mlx_eve.app``: the chat app (``mlx_eve.commands.app``)."""

import sys

from .commands.app import main

if __name__ == "__main__":
    sys.exit(main())
