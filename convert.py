"""Convert an original EVE checkpoint to MLX: ``python convert.py --hf-path BAAI/EVE-7B-HD-v2.0 -q``."""

import sys

from mlx_eve.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
