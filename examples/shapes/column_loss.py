"""Fine-tune with an auxiliary loss that teaches every image token where it is in its row.

EVEv2's patch embedding is a convolution, and the decoder reads an image as one long sequence of rows
(1-D rotary positions): a token knows its column only if attention works it out from the row separators.
Trained on answers alone, the small demo model never did, and it answered left/right questions at chance.
This loss adds to the answer loss how badly a linear read-out of the hidden states finds each image token's
place: after layer 1 its index within the row (0 … w, the separator last), after layer 2 which half of the
row it is in (rows after the first: a token of the first row cannot know the row's length yet). The
read-out is the least-squares fit on the batch itself, so it has no weights of its own; by the envelope
theorem the gradient of the fitted error is that of the error with the fitted read-out held fixed.

Knowing its column, a shape's token still has to be found by the question that names it: with two shapes, one
on each side, the demo model answered "left or right" at chance, its last layer looking at both shapes alike.
``--binding-loss`` adds, for each answer to a position question, how little of the last layer's attention from
the answer's position (each head's, among the attention it gives to shapes) lands on the shapes of the colour
the question names: the mean of -log(that share). The shapes are found in the pixels, the colour in the
question's words.

Counting, the model took pieces of one big shape for two. ``--start-loss`` adds how badly a linear read-out of
the hidden states after the layer before the last finds the first image token, in reading order, of each shape
(shapes found in the pixels as connected regions): the last layer can then count what it finds.

    python examples/shapes/column_loss.py --column-loss 0.1 --binding-loss 0.1 --model M --train --data D ...

takes every ``python -m mlx_eve.lora`` option, plus ``--column-loss``: the weight of the two read-out errors
(each the fraction of its targets' variance left unexplained, 1 at the start) beside the mean answer loss,
``--binding-loss``: the weight of the attention error, and ``--start-loss``: the weight of the start read-out's
error (both default 0: none).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_attention_mask

from mlx_eve.commands.lora import resolve_args
from mlx_eve.errors import EVEError, run_cli
from mlx_eve.families import family_of
from mlx_eve.fine_tuning import fine_tune
from mlx_eve.loading import read_config
from mlx_eve.models.base import image_spans
from mlx_eve.models.eve_qwen2 import DecoderLayer, Modality, route
from mlx_eve.processor import read_tokenizer
from mlx_eve.trainer import Batch, Loss, answer_loss, batch_embeddings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dataset import ANSWERS, COLOUR_JITTER, COLOURS  # noqa: E402

RIDGE = 1e-3  # relative to the mean squared hidden state: keeps the fit well posed, barely biased
# A token shows a shape when this share of its pixels does. Shapes are drawn over backgrounds of 226-250 in every
# channel (make_dataset.render), and every colour has a channel below SHAPE_PIXEL; a pixel has a colour within
# its jitter plus what resizing blurs at the shapes' edges.
TOKEN_SHARE, SHAPE_PIXEL, COLOUR_TOLERANCE = 0.15, 150, COLOUR_JITTER + 28
MIN_SHAPE_PIXELS = 40  # fewer connected shape pixels on a token are specks that resizing left, not a shape


def place_targets(batch: Batch, stride: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every image token's (sample, position, index within its row), and the half-of-row targets: (sample,
    position, -1 left / +1 right) for the patches of rows after the first, skipping the one or two patches
    at the middle."""
    places, halves = [np.zeros((0, 3), np.int64)], [np.zeros((0, 3), np.int64)]
    for b, (ids, images) in enumerate(zip(np.asarray(batch.input_ids), batch.pixel_values)):
        for (start, _), pixels in zip(image_spans(ids), images):
            h, w = pixels.shape[0] // stride, pixels.shape[1] // stride
            row, index = np.divmod(np.arange(h * (w + 1)), w + 1)
            position = start + 1 + np.arange(h * (w + 1))  # after the class token
            places.append(np.stack([np.full_like(index, b), position, index], 1))
            centre = index + 0.5 - w / 2
            keep = (row > 0) & (index < w) & (np.abs(centre) >= 0.5)
            halves.append(np.stack([np.full(keep.sum(), b), position[keep], np.sign(centre[keep])], 1))
    places, halves = np.concatenate(places), np.concatenate(halves).astype(np.int64)
    return places[:, 0], places[:, 1], places[:, 2].astype(np.float32), halves


def token_places(start: int, h: int, w: int) -> np.ndarray:
    """(h, w): the sequence positions of the patches of an image whose embeddings begin at ``start`` (its class
    token), skipping the separator that ends each row."""
    return start + 1 + np.arange(h)[:, None] * (w + 1) + np.arange(w)


def unexplained(states: mx.array, targets: mx.array) -> mx.array:
    """The fraction of ``targets``' variance that the least-squares linear read-out of ``states`` misses."""
    x = mx.concatenate([states, mx.ones((states.shape[0], 1), states.dtype)], axis=1)
    fixed = mx.stop_gradient(x)
    gram = fixed.T @ fixed
    ridge = RIDGE * mx.mean(mx.diag(gram)) * mx.eye(gram.shape[0])
    readout = mx.stop_gradient(mx.linalg.solve(gram + ridge, fixed.T @ targets, stream=mx.cpu))
    error = mx.mean((x @ readout - targets) ** 2)
    return error / mx.maximum(mx.var(targets), 1e-6)


def shape_labels(shape: np.ndarray) -> np.ndarray:
    """Each pixel of the boolean ``shape`` mask numbered by the connected shape it belongs to (pixels touching
    on a side connect), 1, 2, ... in the order their first pixels come in reading order; 0 off the mask."""
    runs, parent = [], []  # each row's runs of shape pixels (row, start, end), and their union-find parents

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above: List[int] = []
    for y, row in enumerate(shape):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        here = []
        for start, end in zip(edges[::2], edges[1::2]):
            parent.append(len(runs))
            here.append(len(runs))
            runs.append((y, start, end))
            for j in above:
                if runs[j][1] < end and start < runs[j][2]:
                    parent[root(j)] = root(here[-1])
        above = here
    labels, numbers = np.zeros(shape.shape, np.int32), {}
    for i, (y, start, end) in enumerate(runs):
        labels[y, start:end] = numbers.setdefault(root(i), len(numbers) + 1)
    return labels


def start_targets(pixels: np.ndarray, stride: int) -> np.ndarray:
    """(h, w): 1 for each token that is the first, in reading order, to show a shape, else 0. ``pixels``: the
    image as the model sees it, in 0-255. A shape shows on a token when TOKEN_SHARE of its pixels are the shape's
    (or on its most covered token, for a shape too small to cover that much of any)."""
    h, w = pixels.shape[0] // stride, pixels.shape[1] // stride
    labels = shape_labels(pixels[: h * stride, : w * stride].min(-1) < SHAPE_PIXEL)
    starts = np.zeros(h * w, np.float32)
    for number in range(1, labels.max() + 1):
        share = (labels == number).reshape(h, stride, w, stride).mean((1, 3)).ravel()
        if share.max() * stride * stride >= MIN_SHAPE_PIXELS:
            starts[np.argmax(share >= min(TOKEN_SHARE, share.max()))] = 1
    return starts.reshape(h, w)


@dataclass
class Normalisation:
    """The image processor's normalisation, to see a batch's images in 0-255 again."""

    image_mean: np.ndarray
    image_std: np.ndarray

    def rgb(self, pixels: mx.array) -> np.ndarray:
        return (np.asarray(pixels) * self.image_std + self.image_mean) * 255


@dataclass
class Starts:
    """What the start loss needs: its weight and the image processor's normalisation."""

    weight: float
    normalisation: Normalisation

    def targets(self, batch: Batch, stride: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every image token's (sample, position, 1 if it is the first token of a shape else 0)."""
        found = [np.zeros((0, 3), np.int64)]
        for b, (ids, images) in enumerate(zip(np.asarray(batch.input_ids), batch.pixel_values)):
            for (start, _), pixels in zip(image_spans(ids), images):
                starts = start_targets(self.normalisation.rgb(pixels), stride)
                place = token_places(start, *starts.shape).ravel()
                found.append(np.stack([np.full(place.size, b), place, starts.ravel()], 1).astype(np.int64))
        found = np.concatenate(found)
        return found[:, 0], found[:, 1], found[:, 2].astype(np.float32)


@dataclass
class Binding:
    """What the binding loss needs to know: its weight, the token ids of the colour words (each with the colour
    it names, RGB) and of the first token of each position answer, and the image processor's normalisation."""

    weight: float
    colours: Dict[int, Tuple[int, int, int]]
    sides: Set[int]
    normalisation: Normalisation

    def targets(self, batch: Batch, stride: int) -> List[Tuple[int, int, np.ndarray, np.ndarray]]:
        """For each answer to a position question: (sample, the position that predicts the answer, mask over
        the positions of the tokens showing a shape of the named colour, mask of those showing another shape).
        The named colour is the last colour word before the answer: the question's."""
        ids, supervised = np.asarray(batch.input_ids), np.asarray(batch.targets)
        found = []
        for b, (row, images) in enumerate(zip(ids, batch.pixel_values)):
            spans = image_spans(row)
            if len(spans) != 1:
                continue
            start, pixels = spans[0][0], self.normalisation.rgb(images[0])
            h, w = pixels.shape[0] // stride, pixels.shape[1] // stride
            cells = pixels[: h * stride, : w * stride].reshape(h, stride, w, stride, 3)
            shape = (cells.min(-1) < SHAPE_PIXEL).mean((1, 3)) >= TOKEN_SHARE
            place = token_places(start, h, w)
            for j in np.flatnonzero(supervised[b, 1:] & ~supervised[b, :-1]) + 1:  # each answer's first target
                colours = [self.colours[t] for t in row[:j] if t in self.colours]
                if row[j + 1] not in self.sides or not colours:
                    continue
                close = np.abs(cells - np.array(colours[-1])).max(-1) <= COLOUR_TOLERANCE
                named = close.mean((1, 3)) >= TOKEN_SHARE
                masks = [np.zeros(ids.shape[1] - 1, np.float32) for _ in range(2)]
                masks[0][place[named]], masks[1][place[shape & ~named]] = 1, 1
                if masks[0].any() and masks[1].any():
                    found.append((b, int(j), *masks))
        return found


def attention_from(layer: DecoderLayer, x: mx.array, modality: Modality, rows: mx.array, positions: mx.array):
    """(n, heads, L): the attention probabilities of each of ``layer``'s heads, on input ``x``, from position
    ``positions[i]`` of sample ``rows[i]`` to every position (causal; the same scores its fused attention uses)."""
    attention = layer.self_attn
    queries, keys, _ = attention.heads(*route(modality, layer._project, x))
    L = queries.shape[2]
    keys = mx.repeat(keys, attention.n_heads // attention.n_kv_heads, axis=1)[rows]  # (n, heads, L, d)
    scores = (keys @ queries[rows, :, positions][..., None])[..., 0] * attention.scale
    scores = mx.where(mx.arange(L) <= positions[:, None, None], scores.astype(mx.float32), -mx.inf)
    return mx.softmax(scores, axis=-1)


def binding_error(attention: mx.array, named: mx.array, others: mx.array) -> mx.array:
    """The mean over answers and heads of -log(the named shapes' share of the attention on shapes)."""
    on_named, on_others = (attention * named[:, None]).sum(-1), (attention * others[:, None]).sum(-1)
    return mx.mean(-mx.log(on_named / (on_named + on_others + 1e-6) + 1e-4))


def column_loss(weight: float, binding: Optional[Binding] = None, starts: Optional[Starts] = None) -> Loss:
    """The answer loss plus ``weight`` times the two read-out errors (plus the binding error and the start
    read-out's error, each at its weight), as ``trainer.train``'s ``loss``."""

    def loss(model, batch: Batch) -> Tuple[mx.array, mx.array]:
        embeddings = batch_embeddings(model, batch)[:, :-1]
        inputs = batch.input_ids[:, :-1]
        stride = model.args.patch_stride * model.args.dense_stride
        samples, positions, index, halves = place_targets(batch, stride)
        bound = binding.targets(batch, stride) if binding and binding.weight else []
        first = starts.targets(batch, stride) if starts and starts.weight else None
        modality, mask = Modality.of(inputs), create_attention_mask(embeddings, None)
        h, errors = embeddings, []
        for depth, layer in enumerate(model.model.layers, 1):
            if depth == len(model.model.layers) and bound:
                rows, at, named, others = (mx.array(np.stack(parts)) for parts in zip(*bound))
                attention = attention_from(layer, h, modality, rows, at)
                errors.append(binding.weight * binding_error(attention, named, others))
            h = layer(h, mask, None, modality)
            if depth == 1 and len(index) > 1:  # a batch without images (or rows to halve) adds nothing
                errors.append(weight * unexplained(h[mx.array(samples), mx.array(positions)], mx.array(index)[:, None]))
            elif depth == 2 and len(halves) > 1:
                side = mx.array(halves[:, 2].astype(np.float32))[:, None]
                errors.append(weight * unexplained(h[mx.array(halves[:, 0]), mx.array(halves[:, 1])], side))
            if depth == len(model.model.layers) - 1 and first is not None and first[2].any():
                # Before the last layer, whose attention can then count the starts.
                start_of = mx.array(first[2])[:, None]
                errors.append(starts.weight * unexplained(h[mx.array(first[0]), mx.array(first[1])], start_of))
        answer, tokens = answer_loss(model.logits(model.model.norm(h)), batch)
        return answer + sum(errors, mx.array(0.0)) * tokens, tokens

    return loss


def normalisation_of(model_path: Path) -> Normalisation:
    config = read_config(model_path)
    image_processor = family_of(config["model_type"]).image_processor.from_pretrained(model_path, config, None)
    return Normalisation(*(np.array(v, np.float32) for v in (image_processor.image_mean, image_processor.image_std)))


def binding_for(model_path: Path, weight: float, normalisation: Normalisation) -> Binding:
    """The binding loss for the model in ``model_path``: its tokenizer must spell each colour and side word,
    with and without a space before it, as one token."""
    tokenizer = read_tokenizer(model_path)
    ids = {}
    for word in [*COLOURS, *ANSWERS["position"]]:
        spellings = [tokenizer.encode(text, add_special_tokens=False) for text in (word, " " + word)]
        if any(len(tokens) != 1 for tokens in spellings):
            raise EVEError(
                f"The binding loss needs {word!r} and ' {word}' to be one token each in {model_path}'s tokenizer."
            )
        ids[word] = {tokens[0] for tokens in spellings}
    colours = {t: COLOURS[c] for c in COLOURS for t in ids[c]}
    sides = set().union(*(ids[side] for side in ANSWERS["position"]))
    return Binding(weight, colours, sides, normalisation)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--column-loss", type=float, required=True)
    parser.add_argument("--binding-loss", type=float, default=0.0)
    parser.add_argument("--start-loss", type=float, default=0.0)

    def go():
        known, rest = parser.parse_known_args(argv)
        for name in ("column_loss", "binding_loss", "start_loss"):
            if not 0 <= getattr(known, name) <= 10:
                raise EVEError(f"--{name.replace('_', '-')} must be in [0, 10], not {getattr(known, name)}.")
        args = resolve_args(rest)
        if read_config(Path(args.model)).get("model_type") != "eve-qwen2":
            raise EVEError("The column loss is for EVEv2 models in a local folder (model_type eve-qwen2).")
        model = Path(args.model)
        normalisation = normalisation_of(model) if known.binding_loss or known.start_loss else None
        binding = binding_for(model, known.binding_loss, normalisation) if known.binding_loss else None
        starts = Starts(known.start_loss, normalisation) if known.start_loss else None
        fine_tune(args, loss=column_loss(known.column_loss, binding, starts))

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
