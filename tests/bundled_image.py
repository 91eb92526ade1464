"""What the bundled example image shows, and README's first command about it: the one place tests read them."""

import shlex
from pathlib import Path

from mlx_eve.demo import EXAMPLE_IMAGES

ROOT = Path(__file__).resolve().parent.parent
IMAGE = EXAMPLE_IMAGES / "shapes.png"

# mlx_eve/assets/images/shapes.png, as drawn: a red circle top left, a blue square top right, a green triangle
# at the bottom in the middle. Each question with the answers its type takes, and the right one.
COLOURS, SHAPES = {"red", "green", "blue", "yellow", "purple"}, {"circle", "square", "triangle"}
FACTS = {
    "How many shapes are there?": ({"1", "2", "3", "4"}, "3"),
    "What colour is the circle?": (COLOURS, "red"),
    "What colour is the triangle?": (COLOURS, "green"),
    "What color is the square?": (COLOURS, "blue"),
    "What shape is the blue object?": (SHAPES, "square"),
    "What shape is the green object?": (SHAPES, "triangle"),
    "What shape is the red object?": (SHAPES, "circle"),
    "Is the red circle on the left or on the right?": ({"left", "right"}, "left"),
    "Is the blue square on the left or on the right?": ({"left", "right"}, "right"),
}


def readme_first_command() -> list:
    """The arguments of ``python generate.py`` in the README's first command."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if "python generate.py" in line)
    return shlex.split(line.split("python generate.py", 1)[1])


def readme_question() -> str:
    args = readme_first_command()
    return args[args.index("-p") + 1]


README_QUESTION = readme_question()
README_ANSWER = FACTS[README_QUESTION][1]
