"""``python -m mlx_eve.evaluate``: the evaluate command (``mlx_eve.commands.evaluate``)."""

import sys

from .commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
