"""mlx_eve.evaluate: the record layouts, the metric, categories, the predictions file, --limit, bad records."""

import json

import pytest
from PIL import Image

from mlx_eve import answering, scoring
from mlx_eve.commands import evaluate


@pytest.mark.parametrize(
    "answer, reference, exact, contains",
    [
        ("Square", "square", True, True),
        ("  The square.\n", "square", True, True),
        ("a square!", "A Square", True, True),
        ("An apple", "the apple", True, True),
        ("red, blue", "red blue", True, True),
        ("It's red", "its red", False, False),  # the apostrophe reads as a space: "it s red"
        ("«Yes»", "yes", True, True),
        ("the theory", "theory", True, True),
        ("theory", "ory", False, False),  # articles go as whole words only, and contains wants whole words
        ("There are two shapes.", "two", False, True),
        ("2", "two", False, False),
        ("red", "bored", False, False),
        ("", "red", False, False),
    ],
)
def test_normalised_metrics(answer, reference, exact, contains):
    assert scoring.is_correct(answer, [reference], "exact") == exact
    assert scoring.is_correct(answer, [reference], "contains") == contains


def test_normalise():
    assert scoring.normalise("  The Big  red-circle, on the LEFT!  ") == "big red circle on left"
    assert scoring.normalise("A") == scoring.normalise("...") == ""


@pytest.fixture
def data(tmp_path):
    """A .jsonl with every layout: LLaVA (one and two turns, a system turn), mlx-vlm, VQA answer lists (with
    one answer as a string, and without an image), with and without a category."""
    for name, colour in [("red.png", "red"), ("blue.png", "blue")]:
        Image.new("RGB", (96, 64), colour).save(tmp_path / name)
    records = [
        {
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}],
            "question_type": "colour",
        },
        {
            "images": ["blue.png"],
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": "blue"},
                {"role": "user", "content": "And its shape?"},
                {"role": "assistant", "content": "A rectangle."},
            ],
            "question_type": "shape",
        },
        {"image": "red.png", "question": "How many shapes?", "answers": ["one", "1"], "category": "count"},
        {"image": "blue.png", "question": "How many shapes?", "answers": "one", "category": "count"},
        {"question": "Is the sky blue?", "answers": ["yes"]},
    ]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return tmp_path


def stub_answers(monkeypatch, replies):
    """Answer the n-th question with ``replies[n]`` (an EVEError: a refused request); keeps the requests."""
    requests = []

    def fake(model, processor, asked, params, **kwargs):
        assert params.temperature == 0.0
        for request, reply in zip(asked, replies):
            requests.append(request)
            yield reply if isinstance(reply, Exception) else answering.Answer(reply, usage=None)

    monkeypatch.setattr(scoring, "answer_in_order", fake)
    return requests


def words(text: str):
    return [line.split() for line in text.splitlines()]


def test_layouts_categories_and_the_predictions_file(v2_path, data, monkeypatch, capsys):
    requests = stub_answers(monkeypatch, ["Red.", "a rectangle", "1", "two", "Yes, it is."])
    out = data / "predictions.jsonl"
    argv = ["--model", str(v2_path), "--data", str(data), "--output", str(out)]
    assert evaluate.main(argv) == 0
    shown = capsys.readouterr().out
    assert f"Scoring 5 questions from {data / 'test.jsonl'}" in shown
    rows = words(shown)
    start = rows.index(["category", "questions", "correct", "accuracy"])
    assert rows[start + 1 : start + 6] == [
        ["-", "1", "0", "0.0%"],
        ["colour", "1", "1", "100.0%"],
        ["count", "2", "1", "50.0%"],
        ["shape", "1", "1", "100.0%"],
        ["overall", "5", "3", "60.0%"],
    ]

    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert predictions[1] == {
        "where": f"{data / 'test.jsonl'}:2",
        "question": "And its shape?",
        "answer": "a rectangle",
        "references": ["A rectangle."],
        "correct": True,
        "category": "shape",
    }
    assert [p["references"] for p in predictions[2:]] == [["one", "1"], ["one"], ["yes"]]
    assert [p["correct"] for p in predictions] == [True, True, True, False, False]
    assert [p["category"] for p in predictions] == ["colour", "shape", "count", "count", None]

    # The last question is asked with the conversation before it, reference answers included, and its images.
    history = requests[1]
    assert history.prompt == [
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "And its shape?"},
    ]
    assert history.system_prompt == "Answer in one word." and history.images == [data / "blue.png"]
    assert requests[2].prompt == [{"role": "user", "content": "How many shapes?"}] and requests[4].images == []

    stub_answers(monkeypatch, ["red", "rectangle", "There is one shape.", "one", "yes"])
    assert evaluate.main([*argv, "--metric", "contains", "--limit", "3"]) == 0
    shown = capsys.readouterr().out
    assert "Scoring 3 questions" in shown and ["overall", "3", "3", "100.0%"] in words(shown)
    assert len(out.read_text().splitlines()) == 3


def test_the_real_engine_answers_every_question_and_a_bad_image_is_counted_wrong(v2_path, data, capsys):
    (data / "blue.png").write_bytes(b"no longer a PNG")
    out = data / "predictions.jsonl"
    argv = ["--model", str(v2_path), "--data", str(data / "test.jsonl"), "-o", str(out), "-m", "3"]
    assert evaluate.main(argv) == 0
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["where"].rsplit(":", 1)[1] for p in predictions] == ["1", "2", "3", "4", "5"]
    failed = [p for p in predictions if "error" in p]
    assert [p["where"][-1] for p in failed] == ["2", "4"] and all("blue.png" in p["error"] for p in failed)
    assert all(p["answer"] is None and not p["correct"] for p in failed)
    assert all(isinstance(p["answer"], str) for p in predictions if "error" not in p)
    assert "2 could not be asked, counted as wrong" in capsys.readouterr().out


def test_a_folder_without_a_test_split_uses_valid(data):
    (data / "test.jsonl").rename(data / "valid.jsonl")
    assert scoring.data_file(data) == data / "valid.jsonl"
    (data / "valid.jsonl").rename(data / "train.jsonl")
    with pytest.raises(scoring.DataError, match="neither test.jsonl nor valid.jsonl"):
        scoring.data_file(data)


def test_every_bad_record_is_reported_with_its_line(data, capsys):
    good = (data / "test.jsonl").read_text().splitlines()
    bad = [
        "{not json",
        json.dumps({"image": "missing.png", "question": "Q?", "answers": ["a"]}),
        json.dumps({"image": "red.png", "question": "Q?", "answers": []}),
        json.dumps({"image": "red.png", "question": "", "answers": ["a"]}),
        json.dumps({"image": "red.png", "conversations": [{"from": "human", "value": "Q?"}]}),
        json.dumps({"image": "red.png", "question": "Q?", "answers": ["a"], "category": ["x"]}),
        json.dumps(["a", "list"]),
    ]
    file = data / "bad.jsonl"
    file.write_text("\n".join([good[0], *bad]) + "\n")
    assert evaluate.main(["--data", str(file)]) == 1
    err = capsys.readouterr().err
    assert "7 problem(s) in the data; nothing was evaluated" in err
    for line, message in enumerate(
        [
            "invalid JSON",
            "image not found",
            '"answers" must be',
            '"question" must be',
            "no assistant turn",
            '"question_type" or "category"',
            "a record must be a JSON object",
        ],
        2,
    ):
        assert f"{file}:{line}: {message}" in err


def test_bad_options_are_refused_when_parsed(data, capsys):
    for bad in (["--limit", "0"], ["--metric", "fuzzy"], ["--batch-size", "0"], ["--data", str(data / "nothing")]):
        with pytest.raises(SystemExit) as exit:
            evaluate.main(["--data", str(data), *bad])
        assert exit.value.code == 2 and capsys.readouterr().err.startswith("error: argument")
