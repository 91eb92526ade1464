"""``python -m mlx_eve.gptq``: the gptq command (``mlx_eve.commands.learned_quant``; the Python function is in
``mlx_eve.quant.gptq``)."""

import sys

from .commands.learned_quant import gptq_main as main

if __name__ == "__main__":
    sys.exit(main())
