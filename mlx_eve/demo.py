"""The demo model and example image shipped inside the package, so an installed wheel works offline."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
# The small model used when no --model is given (trained by examples/shapes/train.py).
BUNDLED_MODEL = ASSETS / "eve-shapes"
# Pictures of the world the demo model knows, offered as examples by the chat app.
EXAMPLE_IMAGES = ASSETS / "images"
