"""examples/shapes/column_loss.py: the auxiliary loss that teaches image tokens their column, and the
trainer's ``loss`` hook it goes through."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import create_attention_mask
from PIL import Image
from shapes_example import import_example
from test_finetune import _training_args, write_dataset

from mlx_eve import load
from mlx_eve.data import load_splits
from mlx_eve.models import IMAGE_TOKEN_ID
from mlx_eve.models.eve_qwen2 import Modality, route
from mlx_eve.trainer import Batch, loss_sum, train

column_loss = import_example("column_loss")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("colours"))


def test_each_image_token_gets_its_place_in_its_row():
    # Sample 1: 3 text tokens, then a 96x64 image at stride 32: 3 patches and a separator in each of 2 rows.
    ids = np.zeros((2, 14), np.int32)
    ids[1, 3:12] = IMAGE_TOKEN_ID  # the class token, then 2 * (3 + 1)
    batch = Batch(mx.array(ids), mx.zeros((2, 13), mx.bool_), [[], [mx.zeros((64, 96, 3))]], [0, 14])
    samples, positions, index, halves = column_loss.place_targets(batch, stride=32)
    assert samples.tolist() == [1] * 8
    assert positions.tolist() == list(range(4, 12))
    assert index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # Second row only, separator left out, the middle patch (centre 1.5 of a 3-wide row) skipped.
    assert halves.tolist() == [[1, 8, -1], [1, 10, 1]]
    text_only = Batch(mx.array(ids[:1]), mx.zeros((1, 13), mx.bool_), [[]], [14])
    assert [len(a) for a in column_loss.place_targets(text_only, stride=32)] == [0, 0, 0, 0]


def test_a_batch_without_images_costs_the_answer_loss_alone(v2_model):
    model, _ = v2_model
    ids = mx.array([[5, 6, 7, 8, 9, 10]])
    batch = Batch(ids, mx.array([[False, False, True, True, True]]), [[]], [6])
    total, tokens = column_loss.column_loss(1.0)(model, batch)
    expected, expected_tokens = loss_sum(model, batch)
    assert tokens.item() == expected_tokens.item() == 3
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def _refitted_error(states: np.ndarray, targets: np.ndarray) -> float:
    """The unexplained variance with a least-squares read-out fitted by numpy (no ridge)."""
    x = np.concatenate([states, np.ones((len(states), 1))], axis=1)
    readout = np.linalg.lstsq(x, targets, rcond=None)[0]
    return float(np.mean((x @ readout - targets) ** 2) / np.var(targets))


def test_the_read_out_error_and_its_gradient_match_a_refitted_read_out():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(400, 12)).astype(np.float32)
    encoded = states @ rng.normal(size=(12, 1)) + 3.0
    noise = rng.normal(size=(400, 1))
    half = 0.5 * encoded + noise * np.std(encoded)
    for targets in (encoded, noise, half):
        got = column_loss.unexplained(mx.array(states), mx.array(targets.astype(np.float32))).item()
        assert got == pytest.approx(_refitted_error(states, targets), abs=2e-3)
    assert column_loss.unexplained(mx.array(states), mx.array(encoded.astype(np.float32))).item() < 1e-3
    # The read-out is held fixed in the gradient: right, because it is the optimum (envelope theorem), so
    # the gradient equals the refitted error's finite difference along any direction.
    targets = mx.array(half.astype(np.float32))
    gradient = np.asarray(mx.grad(lambda s: column_loss.unexplained(s, targets))(mx.array(states)))
    direction = rng.normal(size=states.shape)
    step = 1e-3
    numeric = (_refitted_error(states + step * direction, half) - _refitted_error(states - step * direction, half)) / (
        2 * step
    )
    assert float(np.sum(gradient * direction)) == pytest.approx(numeric, rel=2e-2)


def test_each_shape_starts_on_its_first_token_in_reading_order():
    # A 96x64 image, 3 tokens by 2 at stride 32. A "U" whose arms stand on tokens (0, 1) and (0, 2) and join at
    # the bottom: one shape, so only (0, 1) starts one. A speck in token (0, 0): too small to be a shape. A
    # 10x10 block in token (1, 0): under TOKEN_SHARE of any token, so it starts on its most covered one.
    pixels = np.full((64, 96, 3), 240.0)
    pixels[2:62, 34:41] = pixels[2:62, 70:77] = pixels[52:62, 34:77] = (40, 90, 220)
    pixels[5:8, 5:8] = (220, 45, 45)
    pixels[40:50, 10:20] = (60, 160, 60)
    labels = column_loss.shape_labels(pixels.min(-1) < column_loss.SHAPE_PIXEL)
    assert labels.max() == 3
    assert len(np.unique(labels[2:62, 34:77][pixels[2:62, 34:77, 0] == 40])) == 1  # the U is one shape
    assert labels[2, 34] == 1 and labels[5, 5] == 2 and labels[40, 10] == 3  # numbered in reading order
    np.testing.assert_array_equal(column_loss.start_targets(pixels, 32), [[0, 1, 0], [1, 0, 0]])


def test_the_binding_targets_are_the_named_and_the_other_shapes_tokens():
    # A 96x64 image (3 tokens and a separator in each of 2 rows, after the class token at position 1): a red
    # block fills token (0, 1), a blue one token (1, 0). Then two questions naming red and blue, answered by a
    # side word (60), and one answered by another word (61).
    red, blue, side, other = 50, 51, 60, 61
    binding = column_loss.Binding(
        1.0,
        {red: (220, 45, 45), blue: (40, 90, 220)},
        {side},
        column_loss.Normalisation(np.full(3, 0.5), np.full(3, 0.5)),
    )
    pixels = np.full((64, 96, 3), 240.0)
    pixels[0:32, 32:64] = (220, 45, 45)
    pixels[32:64, 0:32] = (40, 90, 220)
    pixels[40:44, 4:8] = (220, 45, 45)  # 16 red pixels in token (1, 0): too few to count
    ids = [7, IMAGE_TOKEN_ID] + [IMAGE_TOKEN_ID] * 8 + [7, red, 8, side, 9, blue, 8, side, 9, red, 8, other, 9]
    targets = np.zeros(len(ids) - 1, bool)
    for answer in (13, 17, 21):  # the answers' tokens, each predicted from the position before it
        targets[answer - 1 : answer + 1] = True
    batch = Batch(mx.array([ids]), mx.array(targets[None]), [[mx.array((pixels / 255 - 0.5) / 0.5)]], [len(ids)])
    found = binding.targets(batch, stride=32)
    assert [(b, j) for b, j, _, _ in found] == [(0, 12), (0, 16)]
    red_token, blue_token = 1 + 1 + 0 * 4 + 1, 1 + 1 + 1 * 4 + 0
    for (_, _, named, others), (n, o) in zip(found, [(red_token, blue_token), (blue_token, red_token)]):
        assert np.flatnonzero(named).tolist() == [n] and np.flatnonzero(others).tolist() == [o]


def test_the_binding_error_is_minus_log_the_named_share():
    attention = mx.array([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]])  # one answer, two heads
    named, others = mx.array([[0.0, 1.0, 0.0, 0.0]]), mx.array([[0.0, 0.0, 1.0, 1.0]])
    expected = (-math.log(0.2 / 0.9) - math.log(0.25 / 0.75)) / 2
    assert column_loss.binding_error(attention, named, others).item() == pytest.approx(expected, rel=1e-3)


def test_the_attention_read_is_the_layers_own(v2_model):
    """Weighting the layer's values by the probabilities gives the output of its fused attention."""
    model, processor = v2_model
    inputs = processor("What is it?", [Image.new("RGB", (96, 64), (200, 30, 30))])
    ids = mx.array(inputs.input_ids)[None]
    x = model.embed_inputs(ids[0], inputs.pixel_values)[None]
    modality, layer = Modality.of(ids), model.model.layers[-1]
    queries, keys, values = route(modality, layer._project, x)
    fused = layer.self_attn(queries, keys, values, create_attention_mask(x, None))
    attention = layer.self_attn
    positions = mx.array([ids.shape[1] - 1, 5])
    probabilities = column_loss.attention_from(layer, x, modality, mx.array([0, 0]), positions)
    values = mx.repeat(values.reshape(1, -1, attention.n_kv_heads, values.shape[-1] // attention.n_kv_heads), 2, 2)
    read = mx.einsum("nhl,lhd->nhd", probabilities, values[0]).reshape(2, -1)
    np.testing.assert_allclose(np.asarray(read), np.asarray(fused[0, positions]), atol=1e-4)
    assert np.asarray(probabilities)[1, :, 6:].max() == 0  # causal


def test_the_trainer_minimises_the_loss_it_is_given(v2_path, dataset, tmp_path):
    model, processor = load(str(v2_path))
    model.freeze()
    model.lm_head.unfreeze()
    before = np.asarray(model.lm_head.weight)
    splits = load_splits(dataset, processor, 4096)
    args = _training_args(batch_size=4, iters=3, steps_per_eval=100, save_every=3, optimizer="adam")
    flat = lambda m, batch: (loss_sum(m, batch)[0] * 0.0, batch.targets.sum())  # noqa: E731
    train(model, processor.image_processor, splits["train"], None, args, tmp_path / "flat", loss=flat)
    np.testing.assert_array_equal(np.asarray(model.lm_head.weight), before)
    train(model, processor.image_processor, splits["train"], None, args, tmp_path / "answers")
    assert np.abs(np.asarray(model.lm_head.weight) - before).max() > 1e-4


def _first_loss(argv, capsys) -> float:
    assert column_loss.main(argv) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "Train loss" in line)
    return float(line.split("Train loss ")[1].split(",")[0])


def test_the_command_adds_the_column_errors_to_the_answer_loss(v2_path, dataset, tmp_path, capsys):
    common = ["--model", str(v2_path), "--train", "--data", str(dataset), "--fine-tune-type", "full"]
    common += ["--batch-size", "4", "--iters", "1", "--steps-per-report", "1", "--val-batches", "1"]
    answers = _first_loss([*common, "--adapter-path", str(tmp_path / "a"), "--column-loss", "0"], capsys)
    both = _first_loss([*common, "--adapter-path", str(tmp_path / "b"), "--column-loss", "1"], capsys)
    # Same weights and batch at step 1: the difference is the two read-out errors, each between 0 and 1.
    assert 0.05 < both - answers < 2
    assert (tmp_path / "b" / "adapters.safetensors").is_file()
    # Each image shows one circle: the start read-out's error, between 0 and 1, is added at its weight.
    starts = _first_loss(
        [*common, "--adapter-path", str(tmp_path / "c"), "--column-loss", "0", "--start-loss", "1"], capsys
    )
    assert 0.05 < starts - answers < 1.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--column-loss", "-1"], "--column-loss must be in [0, 10]"),
        (["--column-loss", "0.1", "--binding-loss", "11"], "--binding-loss must be in [0, 10]"),
        (["--column-loss", "0.1", "--start-loss", "-0.5"], "--start-loss must be in [0, 10]"),
        (["--column-loss", "0.1", "--model", "v1"], "for EVEv2 models"),
    ],
)
def test_bad_options_are_one_error_line(argv, message, v1_path, dataset, tmp_path, capsys):
    argv = [str(v1_path) if a == "v1" else a for a in argv]
    rest = ["--train", "--data", str(dataset), "--adapter-path", str(tmp_path / "a")]
    assert column_loss.main([*argv, *rest]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
