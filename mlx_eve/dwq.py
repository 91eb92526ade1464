"""``python -m mlx_eve.dwq``: the dwq command (``mlx_eve.commands.learned_quant``; the Python function is in
``mlx_eve.quant.dwq``)."""

import sys

from .commands.learned_quant import dwq_main as main

if __name__ == "__main__":
    sys.exit(main())
