"""``python -m mlx_eve.awq``: the awq command (``mlx_eve.commands.learned_quant``; the Python function is in
``mlx_eve.quant.awq``)."""

import sys

from .commands.learned_quant import awq_main as main

if __name__ == "__main__":
    sys.exit(main())
