"""Chat with an EVE model about images in your browser: ``python app.py`` (``--model`` for a real checkpoint)."""

import sys

from mlx_eve.commands.app import main

if __name__ == "__main__":
    sys.exit(main())
