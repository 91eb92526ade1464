"""``python -m mlx_eve.caption``: the caption command (``mlx_eve.commands.caption``)."""

import sys

from .commands.caption import main

if __name__ == "__main__":
    sys.exit(main())
