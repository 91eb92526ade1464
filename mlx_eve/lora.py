"""``python -m mlx_eve.lora``: the fine-tuning command (``mlx_eve.commands.lora``)."""

import sys

from .commands.lora import main

if __name__ == "__main__":
    sys.exit(main())
