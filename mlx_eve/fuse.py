"""``python -m mlx_eve.fuse``: the fuse command (``mlx_eve.commands.fuse``)."""

import sys

from .commands.fuse import main

if __name__ == "__main__":
    sys.exit(main())
