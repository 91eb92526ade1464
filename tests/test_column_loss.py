"""examples/shapes/column_loss.py: the auxiliary loss that teaches image tokens their column, and the
trainer's ``loss`` hook it goes through."""

import mlx.core as mx
import numpy as np
import pytest
from shapes_example import import_example
from test_finetune import _training_args, write_dataset

from mlx_eve import load
from mlx_eve.data import load_splits
from mlx_eve.models import IMAGE_TOKEN_ID
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--column-loss", "-1"], "--column-loss must be in [0, 10]"),
        (["--column-loss", "0.1", "--model", "v1"], "for EVEv2 models"),
    ],
)
def test_bad_options_are_one_error_line(argv, message, v1_path, dataset, tmp_path, capsys):
    argv = [str(v1_path) if a == "v1" else a for a in argv]
    rest = ["--train", "--data", str(dataset), "--adapter-path", str(tmp_path / "a")]
    assert column_loss.main([*argv, *rest]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
