"""examples/shapes: the generated answers agree with the saved pixels, and the evaluator scores correctly."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapes_example import import_example

from mlx_eve import answering, scoring

VOCABULARY = {
    "colour": {"red", "green", "blue", "yellow", "purple"},
    "shape": {"circle", "square", "triangle"},
    "count": {"1", "2", "3", "4"},
    "position": {"left", "right"},
    "size": {"big", "small"},
}
ARGS = ["--train", "40", "--valid", "15", "--test", "15", "--image-size", "96", "160", "--workers", "1"]


make_dataset = import_example("make_dataset")
shapes_eval = import_example("evaluate")


def _generate(out: Path, *extra: str) -> Path:
    assert make_dataset.main(["--out", str(out), *ARGS, *extra]) == 0
    return out


# Two questions per training image, so training samples are conversations.
SEED_3 = ("--seed", "3", "--tasks", ",".join(VOCABULARY), "--train-turns", "2")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("shapes"), *SEED_3)


def _samples(root: Path):
    return {split: shapes_eval.load_samples(root / f"{split}.jsonl") for split in ("train", "valid", "test")}


def _regions(mask: np.ndarray):
    """4-connected regions of a boolean mask, grown from a seed pixel until they stop changing."""
    left = mask.copy()
    while left.any():
        region = np.zeros_like(mask)
        region[np.unravel_index(np.argmax(left), mask.shape)] = True
        while True:
            grown = region.copy()
            grown[1:] |= region[:-1]
            grown[:-1] |= region[1:]
            grown[:, 1:] |= region[:, :-1]
            grown[:, :-1] |= region[:, 1:]
            grown &= mask
            if (grown == region).all():
                break
            region = grown
        left &= ~region
        yield region


def _read_objects(path: Path):
    """The shapes in a saved image, recovered from its pixels alone."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    border = np.concatenate([pixels[0], pixels[:, 0]])  # shapes keep off the top row and left column
    assert pixels.min(axis=2).min() < 150 <= border.min(), "background should be light"
    short = min(pixels.shape[:2])
    objects = []
    for region in _regions(pixels.min(axis=2) < 150):
        ys, xs = np.nonzero(region)
        width, height = np.ptp(xs) + 1, np.ptp(ys) + 1
        fill = region.sum() / (width * height)
        mean = pixels[region].mean(axis=0)
        distances = {c: np.abs(mean - rgb).max() for c, rgb in make_dataset.COLOURS.items()}
        colour = min(distances, key=distances.get)
        assert distances[colour] <= 15, f"{path.name}: colour {mean} is not a palette colour"
        assert 0.35 < fill < 0.65 or 0.7 < fill < 0.86 or fill > 0.95, f"{path.name}: fill ratio {fill}"
        assert width <= 0.2 * short or width >= 0.33 * short, f"{path.name}: size {width} of {short}"
        objects.append(
            {
                "kind": "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle",
                "colour": colour,
                "size": "big" if width >= 0.33 * short else "small",
                "x": (xs.min() + xs.max()) / 2,
                "width": width,
            }
        )
    return pixels.shape[1], objects


def _answer_from_pixels(question: str, objects, width: int):
    """(question type, answer) for a question, worked out from the objects seen in the image."""
    words = question.lower().rstrip("?").replace(",", "").split()
    if "how" in words and "many" in words:
        return "count", str(len(objects))
    colour = next((w for w in words if w in VOCABULARY["colour"]), None)
    kind = next((w for w in words if w in VOCABULARY["shape"]), None)
    matches = [o for o in objects if colour in (None, o["colour"]) and kind in (None, o["kind"])]
    assert len(matches) == 1, f"{question!r} is ambiguous or about nothing: {objects}"
    target = matches[0]
    if "left" in words:
        assert abs(target["x"] - width / 2) >= 0.15 * width - 1, f"{question!r}: object too close to the middle"
        return "position", "left" if target["x"] < width / 2 else "right"
    if "big" in words:
        return "size", target["size"]
    if "colour" in words or "color" in words:
        return "colour", target["colour"]
    return "shape", target["kind"]


def test_records_are_well_formed_and_balanced(dataset):
    ids = set()
    for split, samples in _samples(dataset).items():
        assert len(samples) == {"train": 40, "valid": 15, "test": 15}[split]
        types = Counter(s["question_type"] for s in samples)
        assert set(types) == set(VOCABULARY) and max(types.values()) - min(types.values()) <= 1
        for kind in VOCABULARY:
            answers = Counter(s["conversations"][-1]["value"] for s in samples if s["question_type"] == kind)
            assert max(answers.values()) - min(answers.values()) <= 1, (split, kind, answers)
        for s in samples:
            assert set(s) == {"id", "image", "conversations", "question_type"}
            assert s["id"] not in ids and s["image"].startswith("images/")
            assert all(96 <= side <= 160 for side in Image.open(dataset / s["image"]).size)
            ids.add(s["id"])
            turns = s["conversations"]
            assert len(turns) in (2, 4) and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1
            for answer in turns[1::2]:
                assert answer["value"] in set().union(*VOCABULARY.values())
            assert turns[-1]["value"] in VOCABULARY[s["question_type"]]
    assert any(len(s["conversations"]) == 4 for samples in _samples(dataset).values() for s in samples)


def _answers_checked_against_pixels(root: Path, sample: dict):
    """Assert each answer of ``sample`` is what its image shows; returns its question kinds and the objects."""
    width, objects = _read_objects(root / sample["image"])
    turns, kinds = sample["conversations"], []
    for question, answer in zip(turns[::2], turns[1::2], strict=True):
        kind, expected = _answer_from_pixels(question["value"].replace("<image>\n", ""), objects, width)
        assert answer["value"] == expected, f"{sample['image']}: {question['value']!r} → {answer['value']!r}"
        kinds.append(kind)
    return kinds, objects


def test_answers_agree_with_the_pixels(dataset):
    checked = Counter()
    for samples in _samples(dataset).values():
        for s in samples:
            kinds, objects = _answers_checked_against_pixels(dataset, s)
            assert 1 <= len(objects) <= 4
            checked.update(kinds)
            assert kinds[-1] == s["question_type"]
    assert set(checked) == set(VOCABULARY)


def test_close_ups_show_one_filling_shape_in_training_only(tmp_path):
    root = _generate(
        tmp_path / "close", "--seed", "5", "--tasks", ",".join(VOCABULARY), "--train-turns", "2", "--close-ups", "0.5"
    )
    widest = {}
    for split, samples in _samples(root).items():
        widest[split] = []
        for s in samples:
            kinds, objects = _answers_checked_against_pixels(root, s)
            assert kinds[-1] == s["question_type"]
            short = min(Image.open(root / s["image"]).size)
            widest[split].append(max(o["width"] for o in objects) / short if len(objects) == 1 else 0)
    close_ups = sum(w >= 0.59 for w in widest["train"])
    assert 10 <= close_ups <= 30, close_ups
    assert max(widest["valid"] + widest["test"]) < 0.5


def test_position_drills_ask_one_or_two_shapes_their_sides(tmp_path):
    extra = ("--seed", "7", "--train-turns", "3", "--lone-positions", "0.3", "--paired-positions", "0.3")
    root = _generate(tmp_path / "drills", *extra)
    drills = Counter()
    for s in _samples(root)["train"]:
        kinds, objects = _answers_checked_against_pixels(root, s)
        if set(kinds) == {"position"}:  # every other conversation asks another type too (count always can)
            assert len(kinds) == len(objects) and s["question_type"] == "position"
            short = min(Image.open(root / s["image"]).size)
            assert max(o["width"] for o in objects) / short < 0.5  # the usual sizes, not a close-up
            assert len({m["value"] for m in s["conversations"][1::2]}) == len(objects)  # a pair: one on each side
            drills[len(objects)] += 1
    assert set(drills) == {1, 2} and all(5 <= n <= 20 for n in drills.values()), drills
    with pytest.raises(SystemExit, match="add up to at most 1"):
        make_dataset.main(["--out", str(tmp_path / "x"), "--close-ups", "0.6", "--paired-positions", "0.5"])
    with pytest.raises(SystemExit, match="must be >= 0"):
        make_dataset.main(["--out", str(tmp_path / "x"), "--paired-positions", "-0.1"])


def test_even_counts_ask_the_number_of_shapes_all_of_one_size(tmp_path):
    root = _generate(tmp_path / "even", "--seed", "8", "--train-turns", "2", "--even-counts", "1")
    sizes, numbers, held_out = Counter(), Counter(), Counter()
    for split, samples in _samples(root).items():
        for s in samples:
            kinds, objects = _answers_checked_against_pixels(root, s)
            if split == "train":
                assert kinds[-1] == "count" == s["question_type"]
                assert len({o["size"] for o in objects}) == 1, objects
                sizes[objects[0]["size"]] += 1
                numbers[len(objects)] += 1
            else:
                held_out[s["question_type"]] += 1
    assert set(numbers) == {1, 2, 3, 4}, numbers
    assert len(held_out) == 4, held_out  # validation and test images are never drills
    assert sizes["big"] >= 8 and sizes["small"] >= 8 and min(numbers.values()) >= 4, (sizes, numbers)
    with pytest.raises(SystemExit, match="add up to at most 1"):
        make_dataset.main(["--out", str(tmp_path / "x"), "--even-counts", "0.6", "--paired-positions", "0.5"])
    with pytest.raises(SystemExit, match="must be >= 0"):
        make_dataset.main(["--out", str(tmp_path / "x"), "--even-counts", "-0.1"])


def test_largest_lets_big_training_shapes_grow_and_leaves_held_out_images_alone(tmp_path):
    root = _generate(tmp_path / "large", "--seed", "9", "--largest", "0.6")
    widest = {}
    for split, samples in _samples(root).items():
        for s in samples:
            _, objects = _answers_checked_against_pixels(root, s)
            short = min(Image.open(root / s["image"]).size)
            widest[split] = max(widest.get(split, 0), *(o["width"] / short for o in objects))
    assert widest["train"] > 0.5 and max(widest["valid"], widest["test"]) <= 0.46, widest
    with pytest.raises(SystemExit, match="--largest must be"):
        make_dataset.main(["--out", str(tmp_path / "x"), "--largest", "0.3"])


def test_descriptions_list_the_shapes_left_to_right_and_eval_turns_add_history(tmp_path):
    root = _generate(tmp_path / "described", "--seed", "6", "--descriptions", "0.5", "--eval-turns", "2")
    described = 0
    for split, samples in _samples(root).items():
        for s in samples:
            width, objects = _read_objects(root / s["image"])
            turns = s["conversations"]
            questions = [q["value"].replace("<image>\n", "") for q in turns[::2]]
            if split != "train":
                assert len(questions) == 2
            if questions[-1] in make_dataset.QUESTIONS["describe"]:
                assert split == "train" and s["question_type"] == "describe"
                names = [f"a {o['colour']} {o['kind']}" for o in sorted(objects, key=lambda o: o["x"])]
                expected = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
                assert turns[-1]["value"] == expected, s["image"]
                described += 1
                turns, questions = turns[:-2], questions[:-1]
            for question, answer in zip(questions, turns[1::2], strict=True):
                assert answer["value"] == _answer_from_pixels(question, objects, width)[1], s["image"]
    assert 10 <= described <= 30, described  # about half of the 40 training conversations


def test_generation_is_deterministic_and_splits_hold_different_images(dataset, tmp_path):
    again = _generate(tmp_path / "again", *SEED_3)
    other = _generate(tmp_path / "other", "--seed", "4", *SEED_3[2:])
    digests = {}
    for path in sorted((dataset / "images").iterdir()):
        assert path.read_bytes() == (again / "images" / path.name).read_bytes()
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(set(digests.values())) == len(digests) == 70
    for split in ("train", "valid", "test"):
        assert (dataset / f"{split}.jsonl").read_text() == (again / f"{split}.jsonl").read_text()
        assert (dataset / f"{split}.jsonl").read_text() != (other / f"{split}.jsonl").read_text()


def test_default_tasks_and_mlx_vlm_format(tmp_path):
    llava = _samples(_generate(tmp_path / "llava"))
    vlm = _samples(_generate(tmp_path / "vlm", "--format", "mlx-vlm"))
    for split in llava:
        assert {s["question_type"] for s in llava[split]} == {"colour", "shape", "count", "position"}
        for a, b in zip(llava[split], vlm[split], strict=True):
            assert set(b) == {"images", "messages", "question_type"} and b["images"] == [a["image"]]
            assert shapes_eval.messages_of(a) == shapes_eval.messages_of(b) == b["messages"]


def _stub_answers(monkeypatch, reply):
    calls = []

    def fake_answer_in_order(model, processor, requests, params, **kwargs):
        assert params.max_tokens == 8 and params.temperature == 0.0
        for request in requests:
            (image,) = request.images
            assert Path(image).is_file()
            prompt = request.prompt
            assert [m["role"] for m in prompt] == ["user", "assistant"] * (len(prompt) // 2) + ["user"]
            calls.append(prompt)
            yield answering.Answer(reply(prompt, image), usage=None)

    monkeypatch.setattr(scoring, "answer_in_order", fake_answer_in_order)
    return calls


def test_evaluate_scores_a_perfect_model_at_100_percent(dataset, monkeypatch):
    samples = shapes_eval.load_samples(dataset / "train.jsonl")
    conversations = {Path(s["image"]).name: shapes_eval.messages_of(s) for s in samples}

    def perfect(prompt, image):
        *history, answer = conversations[Path(image).name]
        assert prompt == history
        return f" {answer['content'].title()}.\n"

    calls = _stub_answers(monkeypatch, perfect)
    result = shapes_eval.evaluate(None, None, samples, dataset)
    assert result["accuracy"] == 1.0 and result["wrong"] == []
    assert result["by_type"] == {kind: 1.0 for kind in sorted(VOCABULARY)}
    assert sum(result["counts"].values()) == len(samples) == len(calls)
    multi_turn = [s for s in samples if len(s["conversations"]) == 4]
    assert sum(len(prompt) == 3 for prompt in calls) == len(multi_turn) > 0


def test_evaluate_scores_a_model_that_always_says_red(dataset, monkeypatch):
    samples = shapes_eval.load_samples(dataset / "test.jsonl")
    _stub_answers(monkeypatch, lambda prompt, image: "Red")
    result = shapes_eval.evaluate(None, None, samples, dataset)
    red = Counter(s["question_type"] for s in samples if s["conversations"][-1]["value"] == "red")
    total = Counter(s["question_type"] for s in samples)
    assert result["by_type"] == {kind: red[kind] / total[kind] for kind in sorted(total)}
    assert 0 < result["by_type"]["colour"] < 1
    assert result["accuracy"] == pytest.approx(sum(red.values()) / len(samples))
    assert len(result["wrong"]) == len(samples) - sum(red.values())
    assert {w["answer"] for w in result["wrong"]} == {"red"}


def test_training_continues_at_a_new_resolution(tmp_path):
    """train.py --init MODEL --max-size N trains a copy of MODEL that reads images at N; MODEL stays as it was."""
    from mlx_eve import load
    from mlx_eve.demo import BUNDLED_MODEL

    train = import_example("train")
    stored = json.loads((BUNDLED_MODEL / "preprocessor_config.json").read_text())["max_size"]
    assert train.at_resolution(BUNDLED_MODEL, stored, tmp_path / "same") == BUNDLED_MODEL
    assert not (tmp_path / "same").exists()

    copy = train.at_resolution(BUNDLED_MODEL, 320, tmp_path / "init")
    assert copy == tmp_path / "init" and sorted(p.name for p in tmp_path.iterdir()) == ["init"]  # no staging left
    # 300x150 at about 320² pixels: scale sqrt(45000)/320 = 0.663, sides 452.5 and 226.3 rounded up to 32s.
    assert load(str(copy))[1].image_processor.target_size(300, 150) == (480, 256)
    assert json.loads((copy / "config.json").read_text())["mm_vision_tower"].endswith("-res320-patch16")
    assert (copy / "model.safetensors").read_bytes() == (BUNDLED_MODEL / "model.safetensors").read_bytes()
    assert json.loads((BUNDLED_MODEL / "preprocessor_config.json").read_text())["max_size"] == stored


def test_train_takes_make_datasets_options_and_passes_them_on():
    """train.py's dataset options are make_dataset.py's: given to train.py, they reach make_dataset.py as given;
    not given, make_dataset.py gets train.py's defaults (more turns and close-ups, a larger test split) or its own."""
    train, make_dataset = import_example("train"), import_example("make_dataset")
    given = ["--train-samples", "64", "--seed", "5", "--even-counts", "0.3", "--image-size", "80", "120"]
    flags = train.dataset_flags(train.build_parser().parse_args([*given, "--iters", "3"]), Path("data"))
    dataset = vars(make_dataset.build_parser().parse_args(flags))
    defaults = vars(make_dataset.build_parser().parse_args(["--out", "data"]))
    assert dataset == {
        **defaults,
        "train": 64,
        "test": 1000,
        "seed": 5,
        "train_turns": 4,
        "close_ups": 0.25,
        "even_counts": 0.3,
        "image_size": [80, 120],
    }
    assert train.build_parser().parse_args(["--train", "7", "--out", "model"]).out == Path("model")  # not the data
