"""Fine-tune with an auxiliary loss that teaches every image token where it is in its row.

EVEv2's patch embedding is a convolution, and the decoder reads an image as one long sequence of rows
(1-D rotary positions): a token knows its column only if attention works it out from the row separators.
Trained on answers alone, the small demo model never did, and it answered left/right questions at chance.
This loss adds to the answer loss how badly a linear read-out of the hidden states finds each image token's
place: after layer 1 its index within the row (0 … w, the separator last), after layer 2 which half of the
row it is in (rows after the first: a token of the first row cannot know the row's length yet). The
read-out is the least-squares fit on the batch itself, so it has no weights of its own; by the envelope
theorem the gradient of the fitted error is that of the error with the fitted read-out held fixed.

    python examples/shapes/column_loss.py --column-loss 0.1 --model M --train --data D ...

takes every ``python -m mlx_eve.lora`` option, plus ``--column-loss``: the weight of the two read-out errors
(each the fraction of its targets' variance left unexplained, 1 at the start) beside the mean answer loss.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_attention_mask

from mlx_eve.errors import EVEError, run_cli
from mlx_eve.loading import read_config
from mlx_eve.lora import resolve_args, run
from mlx_eve.models.base import image_spans
from mlx_eve.models.eve_qwen2 import Modality
from mlx_eve.trainer import Batch, Loss, answer_loss, batch_embeddings

RIDGE = 1e-3  # relative to the mean squared hidden state: keeps the fit well posed, barely biased


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


def unexplained(states: mx.array, targets: mx.array) -> mx.array:
    """The fraction of ``targets``' variance that the least-squares linear read-out of ``states`` misses."""
    x = mx.concatenate([states, mx.ones((states.shape[0], 1), states.dtype)], axis=1)
    fixed = mx.stop_gradient(x)
    gram = fixed.T @ fixed
    ridge = RIDGE * mx.mean(mx.diag(gram)) * mx.eye(gram.shape[0])
    readout = mx.stop_gradient(mx.linalg.solve(gram + ridge, fixed.T @ targets, stream=mx.cpu))
    error = mx.mean((x @ readout - targets) ** 2)
    return error / mx.maximum(mx.var(targets), 1e-6)


def column_loss(weight: float) -> Loss:
    """The answer loss plus ``weight`` times the two read-out errors, as ``trainer.train``'s ``loss``."""

    def loss(model, batch: Batch) -> Tuple[mx.array, mx.array]:
        embeddings = batch_embeddings(model, batch)[:, :-1]
        inputs = batch.input_ids[:, :-1]
        samples, positions, index, halves = place_targets(batch, model.args.patch_stride * model.args.dense_stride)
        modality, mask = Modality.of(inputs), create_attention_mask(embeddings, None)
        h, errors = embeddings, []
        for depth, layer in enumerate(model.model.layers, 1):
            h = layer(h, mask, None, modality)
            if depth == 1 and len(index) > 1:  # a batch without images (or rows to halve) adds nothing
                errors.append(unexplained(h[mx.array(samples), mx.array(positions)], mx.array(index)[:, None]))
            elif depth == 2 and len(halves) > 1:
                side = mx.array(halves[:, 2].astype(np.float32))[:, None]
                errors.append(unexplained(h[mx.array(halves[:, 0]), mx.array(halves[:, 1])], side))
        answer, tokens = answer_loss(model.logits(model.model.norm(h)), batch)
        return answer + weight * sum(errors, mx.array(0.0)) * tokens, tokens

    return loss


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--column-loss", type=float, required=True)

    def go():
        known, rest = parser.parse_known_args(argv)
        if not 0 <= known.column_loss <= 10:
            raise EVEError(f"--column-loss must be in [0, 10], not {known.column_loss}.")
        args = resolve_args(rest)
        if read_config(Path(args.model)).get("model_type") != "eve-qwen2":
            raise EVEError("The column loss is for EVEv2 models in a local folder (model_type eve-qwen2).")
        run(args, loss=column_loss(known.column_loss))

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
