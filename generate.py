"""Ask an EVE model about images: ``python generate.py --image photo.jpg -p "What is in the picture?"``."""

import sys

from mlx_eve.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
