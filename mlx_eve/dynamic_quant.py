"""``python -m mlx_eve.dynamic_quant``: the dynamic_quant command (``mlx_eve.commands.learned_quant``; the Python
function is in ``mlx_eve.quant.dynamic_quant``)."""

import sys

from .commands.learned_quant import dynamic_quant_main as main

if __name__ == "__main__":
    sys.exit(main())
