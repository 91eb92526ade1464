"""``python -m mlx_eve.generate``: the generate command (``mlx_eve.commands.generate``)."""

import sys

from .commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
