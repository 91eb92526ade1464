"""Generate the synthetic "shapes" visual question answering dataset.

Each image shows 1-4 non-overlapping filled circles, squares and triangles in five colours and two clearly
different sizes on a light background; each sample asks one question about it (sometimes two, as a
conversation) with a one-word answer.

    python examples/shapes/make_dataset.py --out data/shapes --train 20000 --valid 500 --test 500

writes data/shapes/images/*.png and data/shapes/{train,valid,test}.jsonl in the LLaVA format
(``--format mlx-vlm`` for mlx-vlm's messages format). The same seed gives the same files.
"""

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from multiprocessing import Pool
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 165, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 65, 185),
}
COLOUR_JITTER = 12
SHAPES = ("circle", "square", "triangle")
# Side length (bounding-box width) as a fraction of the image's shorter side.
SIZES = {"big": (0.35, 0.45), "small": (0.12, 0.18)}
# Close-ups (training only, see --close-ups): one "big" shape filling this fraction of the shorter side.
CLOSE_UP = (0.6, 0.9)
MAX_SHAPES = 4
TASKS = ("colour", "shape", "count", "position", "size")
ANSWERS: Dict[str, Tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(n) for n in range(1, MAX_SHAPES + 1)),
    "position": ("left", "right"),
    "size": ("big", "small"),
}
# A position question is asked only about an object whose centre is at least this fraction of the width
# away from the middle.
OFF_CENTRE = 0.15
MULTI_TURN_RATE = 0.1
SPLITS = ("train", "valid", "test")

QUESTIONS = {
    "colour": ["What colour is the {shape}?", "What is the colour of the {shape}?", "What color is the {shape}?"],
    "colour_single": ["What colour is the shape?", "What colour is the object?"],
    "shape": ["What shape is the {colour} object?", "What is the shape of the {colour} object?"],
    "shape_single": ["What shape is in the image?", "What shape do you see?"],
    "count": [
        "How many shapes are there?",
        "How many shapes are in the picture?",
        "How many shapes are in the image?",
        "How many objects can you see?",
    ],
    "position": [
        "Is the {colour} {shape} on the left or on the right?",
        "Is the {colour} {shape} on the right or on the left?",
        "Is the {colour} {shape} on the left or right side of the image?",
        "Which side is the {colour} {shape} on, left or right?",
    ],
    "describe": [
        "Describe the image.",
        "Describe the picture.",
        "List the shapes from left to right.",
    ],
    "size": [
        "Is the {colour} {shape} big or small?",
        "Is the {colour} {shape} small or big?",
        "How big is the {colour} {shape}, big or small?",
    ],
}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str  # "big" or "small"
    box: Tuple[int, int, int, int]  # left, top, right, bottom (inclusive pixels)

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    shapes: Tuple[Shape, ...]


QA = Tuple[str, str]  # (question, answer)
Sizes = Mapping[str, Tuple[float, float]]  # size name: (smallest, largest) side, as fractions of the shorter side


def random_scene(
    rng: np.random.Generator,
    image_size: Tuple[int, int],
    count: int,
    size: Optional[str] = None,
    sizes: Sizes = SIZES,
) -> Optional[Scene]:
    """``count`` shapes at random non-overlapping places (all of ``size`` if given, else each big or small at
    random, with sides in the ``sizes`` range of the shorter side), or None when they did not fit."""
    width, height = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
    short = min(width, height)
    gap = max(3, round(0.04 * short))
    shapes: List[Shape] = []
    for _ in range(count):
        kind = SHAPES[rng.integers(len(SHAPES))]
        colour = ANSWERS["colour"][rng.integers(len(COLOURS))]
        size_of_this = size or ("big" if rng.random() < 0.5 else "small")
        side = round(short * rng.uniform(*sizes[size_of_this]))
        for _ in range(30):
            box = _random_box(rng, kind, side, width, height)
            if all(_apart(box, other.box, gap) for other in shapes):
                shapes.append(Shape(kind, colour, size_of_this, box))
                break
        else:
            return None
    return Scene(width, height, tuple(shapes))


def close_up(rng: np.random.Generator, image_size: Tuple[int, int]) -> Scene:
    """One shape filling most of the image, at a random place."""
    width, height = (int(v) for v in rng.integers(image_size[0], image_size[1] + 1, size=2))
    kind = SHAPES[rng.integers(len(SHAPES))]
    colour = ANSWERS["colour"][rng.integers(len(COLOURS))]
    side = round(min(width, height) * rng.uniform(*CLOSE_UP))
    return Scene(width, height, (Shape(kind, colour, "big", _random_box(rng, kind, side, width, height)),))


def position_drill(
    rng: np.random.Generator, image_size: Tuple[int, int], count: int, sizes: Sizes = SIZES
) -> Tuple[Scene, List[QA]]:
    """``count`` shapes (1 or 2) of the usual sizes away from the middle, two on opposite sides, and the question
    of each one's side, in random order."""
    while True:
        scene = random_scene(rng, image_size, count, sizes=sizes)
        found = questions(scene, "position", rng) if scene else []
        if len(found) == count and len({side for _, side in found}) == count:
            return scene, [found[i] for i in rng.permutation(count)]


def _random_box(rng: np.random.Generator, kind: str, side: int, width: int, height: int) -> Tuple[int, int, int, int]:
    """A random place for a shape ``side`` pixels wide (triangles are equilateral, so less tall), off the border."""
    box_height = round(side * math.sqrt(3) / 2) if kind == "triangle" else side
    left = int(rng.integers(1, width - side))
    top = int(rng.integers(1, height - box_height))
    return left, top, left + side - 1, top + box_height - 1


def _apart(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def questions(scene: Scene, task: str, rng: np.random.Generator) -> List[QA]:
    """Every unambiguous question of type ``task`` about ``scene``, each in a randomly chosen phrasing."""

    def ask(key: str, **names: str) -> str:
        return QUESTIONS[key][rng.integers(len(QUESTIONS[key]))].format(**names)

    shapes = scene.shapes
    if task == "count":
        return [(ask("count"), str(len(shapes)))]
    kinds = Counter(s.kind for s in shapes)
    colours = Counter(s.colour for s in shapes)
    objects = Counter((s.colour, s.kind) for s in shapes)
    single = len(shapes) == 1
    found = []
    for s in shapes:
        if task == "colour" and kinds[s.kind] == 1:
            use_generic = single and rng.random() < 0.5
            found.append((ask("colour_single") if use_generic else ask("colour", shape=s.kind), s.colour))
        elif task == "shape" and colours[s.colour] == 1:
            use_generic = single and rng.random() < 0.5
            found.append((ask("shape_single") if use_generic else ask("shape", colour=s.colour), s.kind))
        elif task in ("position", "size") and objects[s.colour, s.kind] == 1:
            if task == "size":
                found.append((ask("size", colour=s.colour, shape=s.kind), s.size))
            elif abs(s.centre_x - scene.width / 2) >= OFF_CENTRE * scene.width:
                side = "left" if s.centre_x < scene.width / 2 else "right"
                found.append((ask("position", colour=s.colour, shape=s.kind), side))
    return found


def description(scene: Scene) -> str:
    """The shapes from left to right, e.g. "a red circle, a blue square and a green triangle" (no sizes: size is
    the held-out task)."""
    names = [f"a {s.colour} {s.kind}" for s in sorted(scene.shapes, key=lambda s: s.centre_x)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def make_sample(
    rng: np.random.Generator,
    task: str,
    answer: str,
    tasks: Sequence[str],
    image_size: Tuple[int, int],
    turns: int = 1,
    size: Optional[str] = None,
    sizes: Sizes = SIZES,
) -> Tuple[Scene, List[QA]]:
    """A scene (of shapes all of ``size`` if given) with a ``task`` question whose answer is ``answer``, preceded
    by up to ``turns - 1`` questions of the other types (with ``turns == 1``, by one such question now and then)."""
    for _ in range(10_000):
        count = int(answer) if task == "count" else int(rng.integers(1, MAX_SHAPES + 1))
        scene = random_scene(rng, image_size, count, size, sizes)
        if scene is None:
            continue
        matching = [qa for qa in questions(scene, task, rng) if qa[1] == answer]
        if matching:
            break
    else:
        raise RuntimeError(f"Could not make a {task!r} question answered {answer!r} at image size {image_size}.")
    extra = turns - 1 if turns > 1 else int(rng.random() < MULTI_TURN_RATE)
    others = [qa for t in tasks if t != task for qa in questions(scene, t, rng)] if extra else []
    chosen = [others[i] for i in rng.permutation(len(others))[:extra]]
    return scene, chosen + [matching[rng.integers(len(matching))]]


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """A light background with a gentle gradient, and the shapes in slightly jittered colours."""
    base = rng.integers(226, 250, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(-1, 1, scene.width)
    ys = np.linspace(-1, 1, scene.height)[:, None]
    ramp = rng.uniform(0, 6) * (math.cos(angle) * xs + math.sin(angle) * ys)
    background = np.clip(base + ramp[..., None], 0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(np.add(COLOURS[s.colour], jitter), 0, 255))
        left, top, right, bottom = s.box
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        else:
            draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    return image


def make_record(
    index: int,
    *,
    split: str,
    out: Path,
    seed: int,
    tasks: Sequence[str],
    image_size: Tuple[int, int],
    fmt: str,
    turns: int = 1,
    close_ups: float = 0.0,
    lone_positions: float = 0.0,
    paired_positions: float = 0.0,
    even_counts: float = 0.0,
    descriptions: float = 0.0,
    sizes: Sizes = SIZES,
) -> dict:
    # The type and answer of sample i cycle through all combinations, so both are balanced exactly.
    task = tasks[index % len(tasks)]
    answers = ANSWERS[task]
    answer = answers[(index // len(tasks)) % len(answers)]
    # Every sample has its own random stream: results do not depend on the number of samples or workers.
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    curriculum = np.random.default_rng([seed, SPLITS.index(split), index, 1]).random()
    if curriculum < close_ups:
        scene = close_up(rng, image_size)
        typed = [(t, qa) for t in tasks for qa in questions(scene, t, rng)]
        typed = [typed[i] for i in rng.permutation(len(typed))[:turns]]
        task, qas = typed[-1][0], [qa for _, qa in typed]
    elif curriculum < close_ups + lone_positions + paired_positions:
        task = "position"
        scene, qas = position_drill(rng, image_size, 1 if curriculum < close_ups + lone_positions else 2, sizes)
    elif curriculum < close_ups + lone_positions + paired_positions + even_counts:
        # Every shape big, or every one small: the area the shapes cover no longer tells their number.
        task, size = "count", list(sizes)[rng.integers(len(sizes))]
        answer = ANSWERS[task][rng.integers(len(ANSWERS[task]))]
        scene, qas = make_sample(rng, task, answer, tasks, image_size, turns, size, sizes)
    else:
        scene, qas = make_sample(rng, task, answer, tasks, image_size, turns, sizes=sizes)
    if np.random.default_rng([seed, SPLITS.index(split), index, 2]).random() < descriptions:
        # Last, so that the questions before it are answered without its help, as at inference.
        phrasings = QUESTIONS["describe"]
        qas.append((phrasings[rng.integers(len(phrasings))], description(scene)))
        task = "describe"
    name = f"{split}-{index:06d}"
    image = f"images/{name}.png"
    render(scene, rng).save(out / image, compress_level=1)
    texts = [text for question, reply in qas for text in (question, reply)]
    texts[0] = "<image>\n" + texts[0]
    if fmt == "mlx-vlm":
        messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(texts)]
        return {"images": [image], "messages": messages, "question_type": task}
    conversations = [{"from": ("human", "gpt")[i % 2], "value": text} for i, text in enumerate(texts)]
    return {"id": name, "image": image, "conversations": conversations, "question_type": task}


def write_split(
    out: Path,
    split: str,
    count: int,
    *,
    seed: int,
    tasks: Sequence[str],
    image_size: Tuple[int, int] = (96, 256),
    fmt: str = "llava",
    workers: int = 1,
    turns: int = 1,
    close_ups: float = 0.0,
    lone_positions: float = 0.0,
    paired_positions: float = 0.0,
    even_counts: float = 0.0,
    descriptions: float = 0.0,
    sizes: Sizes = SIZES,
) -> Path:
    """Write ``count`` samples of ``split`` (images and ``<split>.jsonl``, in shuffled order) into ``out``."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    make = partial(
        make_record,
        split=split,
        out=out,
        seed=seed,
        tasks=tuple(tasks),
        image_size=image_size,
        fmt=fmt,
        turns=turns,
        close_ups=close_ups,
        lone_positions=lone_positions,
        paired_positions=paired_positions,
        even_counts=even_counts,
        descriptions=descriptions,
        sizes=sizes,
    )
    if workers > 1:
        with Pool(workers) as pool:
            records = pool.map(make, range(count), chunksize=64)
    else:
        records = [make(i) for i in range(count)]
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(count)
    path = out / f"{split}.jsonl"
    with open(path, "w") as f:
        for i in order:
            f.write(json.dumps(records[i]) + "\n")
    return path


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate the synthetic shapes VQA dataset.", add_help=add_help)
    p.add_argument("--out", required=True, type=Path, help="Output folder.")
    p.add_argument("--train", type=int, default=20000, help="Number of training samples.")
    p.add_argument("--valid", type=int, default=500, help="Number of validation samples.")
    p.add_argument("--test", type=int, default=500, help="Number of test samples.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="colour,shape,count,position", help=f"Comma-separated, from {','.join(TASKS)}.")
    p.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        default=[96, 256],
        metavar=("MIN", "MAX"),
        help="Range of image widths and heights (each drawn independently).",
    )
    p.add_argument("--format", choices=["llava", "mlx-vlm"], default="llava", help="JSONL record layout.")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Processes drawing images.")
    p.add_argument(
        "--train-turns",
        type=int,
        default=1,
        help="Questions per training image: more supervision per image (valid/test keep one scored question).",
    )
    p.add_argument(
        "--eval-turns",
        type=int,
        default=1,
        help="Questions per validation and test image: the last is scored, the others (with their answers) come "
        "first as conversation history (1: one question, with one question before it now and then).",
    )
    p.add_argument(
        "--close-ups",
        type=float,
        default=0.0,
        help="Fraction of training images showing one shape that fills most of the image (a curriculum aid for "
        "training from scratch; validation and test images never are).",
    )
    p.add_argument(
        "--lone-positions",
        type=float,
        default=0.0,
        help="Fraction of training images showing one shape of the usual sizes, asked only which side it is on "
        "(a curriculum aid for position questions; validation and test images never are).",
    )
    p.add_argument(
        "--paired-positions",
        type=float,
        default=0.0,
        help="Fraction of training images showing two shapes on opposite sides, each asked which side it is on "
        "(a curriculum aid for finding the shape a position question names; validation and test images never are).",
    )
    p.add_argument(
        "--even-counts",
        type=float,
        default=0.0,
        help="Fraction of training images whose shapes are all big or all small, asked how many there are (a "
        "curriculum aid: the area the shapes cover no longer tells their number; validation and test images "
        "never are).",
    )
    p.add_argument(
        "--largest",
        type=float,
        default=SIZES["big"][1],
        help="Side of the largest big shape in *training* images, as a fraction of the shorter side (default: "
        "%(default)s, as in validation and test images).",
    )
    p.add_argument(
        "--descriptions",
        type=float,
        default=0.0,
        help="Fraction of training conversations that end by listing every shape from left to right (dense "
        "supervision: colour, shape, count and order of all shapes in one answer).",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        sys.exit(f"error: unknown or missing task(s) {unknown}; choose from {', '.join(TASKS)}")
    curricula = (args.close_ups, args.lone_positions, args.paired_positions, args.even_counts)
    if min(curricula) < 0 or sum(curricula) > 1:
        sys.exit(
            "error: --close-ups, --lone-positions, --paired-positions and --even-counts must be >= 0 and add up to "
            "at most 1"
        )
    if not SIZES["big"][0] < args.largest <= 0.7:
        sys.exit(f"error: --largest must be above {SIZES['big'][0]} (the smallest big shape) and at most 0.7")
    low, high = args.image_size
    if not 64 <= low <= high:
        sys.exit("error: --image-size needs 64 <= MIN <= MAX")
    for split in SPLITS:
        count = getattr(args, split)
        start = time.perf_counter()
        path = write_split(
            args.out,
            split,
            count,
            seed=args.seed,
            tasks=tasks,
            image_size=(low, high),
            fmt=args.format,
            workers=args.workers,
            turns=args.train_turns if split == "train" else args.eval_turns,
            close_ups=args.close_ups if split == "train" else 0.0,
            lone_positions=args.lone_positions if split == "train" else 0.0,
            paired_positions=args.paired_positions if split == "train" else 0.0,
            even_counts=args.even_counts if split == "train" else 0.0,
            descriptions=args.descriptions if split == "train" else 0.0,
            sizes={**SIZES, "big": (SIZES["big"][0], args.largest)} if split == "train" else SIZES,
        )
        seconds = time.perf_counter() - start
        print(f"{path}: {count} samples in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
