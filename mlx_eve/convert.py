"""``python -m mlx_eve.convert``: the convert command (``mlx_eve.commands.convert``)."""

import sys

from .commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
