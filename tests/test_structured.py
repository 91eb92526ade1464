"""Structured outputs: answers held to a JSON Schema, a pydantic model, ``json_object`` or a regex on both families
and on the demo model (which never writes JSON by itself), alone and batched with other grammars and none, cut
by ``max_tokens``, streamed, from the prompt cache; bad schemas; ``--json-schema`` of generate and caption run
as a user runs them; the benchmark's answers all of one length."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Literal

import jsonschema
import pytest
from bundled_image import IMAGE
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mlx_eve import generate, load, stream_generate
from mlx_eve.demo import BUNDLED_MODEL
from mlx_eve.engine import Engine
from mlx_eve.request import SamplingParams
from mlx_eve.structured import GrammarError, json_schema_grammar, regex_grammar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import structured as benchmark  # noqa: E402

# Every kind of value, each bounded, so that an answer ends within MAX_TOKENS even from random weights.
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "round": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "name": {"type": "string", "maxLength": 4},
        "at": {
            "type": "object",
            "properties": {"side": {"enum": ["left", "right"]}},
            "required": ["side"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["colour", "round", "count", "name", "at", "tags"],
    "additionalProperties": False,
}
OTHER_SCHEMA = {
    "type": "object",
    "properties": {"shape": {"enum": ["circle", "square"]}, "big": {"type": "boolean"}},
    "required": ["shape", "big"],
    "additionalProperties": False,
}
PATTERN = r"(red|green|blue) (circle|square), [0-9]{1,2}"
MAX_TOKENS = 128
RED = Image.new("RGB", (320, 240), (200, 30, 30))


class Side(BaseModel):
    model_config = ConfigDict(extra="forbid")
    side: Literal["left", "right"]


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")
    colour: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=9)
    name: str = Field(max_length=4)
    at: Side
    tags: List[Literal["a", "b"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def demo_model():
    return load(str(BUNDLED_MODEL))


@pytest.fixture(params=["v1", "v2", "demo"])
def model(request, v1_model, v2_model, demo_model):
    return {"v1": v1_model, "v2": v2_model, "demo": demo_model}[request.param]


def answer(model, prompt="What is it?", image=RED, **kwargs):
    """The streamed text, the tokens and the finish reason of one answer."""
    responses = list(stream_generate(*model, prompt, image, **{"max_tokens": MAX_TOKENS, **kwargs}))
    return "".join(r.text for r in responses), [r.token for r in responses], responses[-1].finish_reason


def test_the_demo_model_writes_no_json_by_itself(demo_model):
    text = generate(*demo_model, "Describe the image.", IMAGE, max_tokens=MAX_TOKENS)
    with pytest.raises(ValueError):
        json.loads(text)


def test_a_schema_answer_ends_and_validates(model):
    text, _, finish = answer(model, json_schema=SCHEMA)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_a_pydantic_model_as_schema(model):
    text, _, finish = answer(model, "Describe the image.", json_schema=Shape)
    assert finish == "stop"
    Shape.model_validate_json(text)


def test_json_object_is_an_object_when_it_ends(model):
    text, _, finish = answer(model, max_tokens=40, response_format={"type": "json_object"})
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))
    # Tokens that close a string or the object made likely: the answer ends.
    tokenizer = model[1].tokenizer
    closing = {t: 8.0 for t in tokenizer.vocab.values() if tokenizer.decode([t]) in ('"', "}", '"}')}
    text, _, finish = answer(model, max_tokens=40, response_format={"type": "json_object"}, logit_bias=closing)
    assert finish == "stop" and isinstance(json.loads(text), dict)


def test_streamed_pieces_join_to_the_decoded_answer(model):
    text, tokens, _ = answer(model, json_schema=SCHEMA)
    eos = model[1].tokenizer.eos_token_ids
    assert text == model[1].tokenizer.decode([t for t in tokens if t not in eos])


def test_a_string_of_byte_pieces_streams_as_it_decodes(v1_model):
    # EVEv1's SentencePiece decodes consecutive byte pieces together: '"' then the first byte of 'ȹ' decode to
    # two replacement characters, which a decoder of the whole answer so far would cut, then repeat the '"'.
    _, processor = v1_model
    tokenizer = processor.tokenizer
    tokens = tokenizer._tokenizer.convert_tokens_to_ids(["<0x22>", "<0xC8>", "<0xB9>", "<0x61>"])
    detokenizer = tokenizer.detokenizer
    pieces = []
    for token in tokens:
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    assert "".join(pieces) + detokenizer.last_segment == '"ȹa'


def test_max_tokens_ends_a_schema_answer_first(model):
    long_text = {"type": "object", "properties": {"text": {"type": "string", "minLength": 1000}}, "required": ["text"]}
    text, tokens, finish = answer(model, max_tokens=12, json_schema=long_text)
    assert finish == "length" and len(tokens) == 12 and text.startswith('{"text":"')


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_one_batch_of_different_grammars_and_none_equals_each_alone(family, v1_model, v2_model):
    model = v1_model if family == "v1" else v2_model
    requests = [
        ("What is it?", RED, {"json_schema": SCHEMA}),
        ("Describe the image.", RED, {}),
        ("What shape?", None, {"json_schema": OTHER_SCHEMA}),
        ("Describe the image.", None, {"response_format": {"type": "regex", "regex": PATTERN}}),
    ]
    grammars = [json_schema_grammar(SCHEMA), None, json_schema_grammar(OTHER_SCHEMA), regex_grammar(PATTERN)]
    engine = Engine(*model, max_batch_size=len(requests))
    try:
        streams = [
            engine.submit(prompt, image, SamplingParams(max_tokens=MAX_TOKENS, grammar=grammar))
            for (prompt, image, _), grammar in zip(requests, grammars)
        ]
        batched = [list(stream) for stream in streams]
    finally:
        engine.close()
    texts = ["".join(event.text for event in events) for events in batched]
    alone = [generate(*model, prompt, image, max_tokens=MAX_TOKENS, **kwargs) for prompt, image, kwargs in requests]
    assert texts == alone
    assert [events[-1].finish_reason for events in batched] == ["stop", "length", "stop", "stop"]
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    jsonschema.validate(json.loads(texts[2]), OTHER_SCHEMA)
    assert re.fullmatch(PATTERN, texts[3])


def test_the_prompt_cache_serves_a_constrained_request_again(v2_model):
    engine = Engine(*v2_model)
    params = SamplingParams(max_tokens=MAX_TOKENS, grammar=json_schema_grammar(SCHEMA))
    try:
        first, again = (list(engine.submit("What is it?", [RED], params)) for _ in range(2))
    finally:
        engine.close()
    assert first[-1].usage.cached_tokens == 0 and again[-1].usage.cached_tokens > 0
    assert "".join(e.text for e in again) == "".join(e.text for e in first)
    jsonschema.validate(json.loads("".join(e.text for e in again)), SCHEMA)


@pytest.mark.parametrize(
    "schema,reason",
    [
        ({"type": "strin"}, "Invalid type: strin"),
        ({"type": "array", "uniqueItems": True}, 'Unimplemented keys: ["uniqueItems"]'),
        ('{"type": "object",', "not valid JSON"),
        ([1, 2], "must be an object"),
    ],
)
def test_a_bad_schema_is_a_grammar_error_with_the_reason(schema, reason, v2_model):
    with pytest.raises(GrammarError, match=re.escape(reason)):
        generate(*v2_model, "Hi", max_tokens=4, json_schema=schema)
    engine = Engine(*v2_model)
    try:
        with pytest.raises(GrammarError, match=re.escape(reason)):
            engine.submit("Hi", None, SamplingParams(grammar=json_schema_grammar(schema)))
    finally:
        engine.close()


def test_a_regex_answer_matches_it(model):
    engine = Engine(*model)
    try:
        events = list(engine.submit("Describe the image.", [RED], SamplingParams(grammar=regex_grammar(PATTERN))))
    finally:
        engine.close()
    assert events[-1].finish_reason == "stop" and re.fullmatch(PATTERN, "".join(e.text for e in events))


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def write_schema(tmp_path, schema, name="schema.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(schema) if not isinstance(schema, str) else schema)
    return str(path)


def test_generate_answers_with_the_schema_file(tmp_path):
    schema = write_schema(tmp_path, SCHEMA)
    result = run("mlx_eve.generate", "--image", str(IMAGE), "-p", "What is it?", "--json-schema", schema)
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout.split("\n==========\n")[0]), SCHEMA)
    cut = run("mlx_eve.generate", "-p", "What is it?", "--json-schema", schema, "-m", "3")
    assert cut.returncode == 0 and "before its JSON was complete" in cut.stderr


@pytest.mark.parametrize(
    "content,code,message",
    [
        (None, 2, "error: argument --json-schema: no such file"),
        ('{"type": ', 2, "error: argument --json-schema: {path} is not JSON"),
        ("[1]", 2, "error: argument --json-schema: {path} is not a JSON Schema"),
        ('{"type": "strin"}', 1, "error: The grammar cannot be used: Invalid type: strin\n"),
        ('{"type": "array", "uniqueItems": true}', 1, 'error: The grammar cannot be used: Unimplemented keys: ["uni'),
        # llguidance draws a regex error over several lines
        (
            '{"type": "string", "pattern": "(?=a)"}',
            1,
            "error: The grammar cannot be used: regex parse error: (?=a) ^^^",
        ),
    ],
)
def test_a_bad_schema_file_is_a_one_line_error(tmp_path, content, code, message):
    path = str(tmp_path / "missing.json") if content is None else write_schema(tmp_path, content)
    commands = {
        "mlx_eve.generate": ["--image", str(IMAGE), "-p", "Hi"],
        "mlx_eve.caption": ["--images", str(IMAGE), "-o", str(tmp_path / "answers.jsonl")],
    }
    for command, args in commands.items():
        result = run(command, *args, "--json-schema", path)
        assert result.returncode == code and result.stderr.startswith(message.format(path=path)), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for i, size in enumerate([(120, 80), (80, 120), (100, 100)]):
        Image.new("RGB", size, (80 * i, 120, 200)).save(root / f"{i}.png")
    return root


def caption(model, photos, out, *args):
    return run("mlx_eve.caption", "--model", str(model), "--images", str(photos), "-o", str(out), *args)


def test_caption_writes_each_schema_answer_as_an_object(v2_path, photos, tmp_path):
    out = tmp_path / "answers.jsonl"
    result = caption(v2_path, photos, out, "--json-schema", write_schema(tmp_path, SCHEMA), "-m", str(MAX_TOKENS))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert "error" not in row
        jsonschema.validate(row["answer"], SCHEMA)


def test_caption_csv_spreads_the_properties_into_columns(v2_path, photos, tmp_path):
    schema = write_schema(tmp_path, SCHEMA)
    out = tmp_path / "answers.csv"
    result = caption(v2_path, photos, out, "--json-schema", schema, "-m", str(MAX_TOKENS), "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    properties = list(SCHEMA["properties"])
    strings = {name for name, spec in SCHEMA["properties"].items() if "enum" in spec or spec.get("type") == "string"}
    assert reader.fieldnames == ["path", "prompt", *properties, "prompt_tokens", "image_tokens", "generation_tokens",
                                 "seconds", "error"]  # fmt: skip
    assert len(rows) == 3
    for row in rows:
        assert row["error"] == "" and int(row["generation_tokens"]) > 0
        # Strings as they are, other values as JSON.
        answer = {name: row[name] if name in strings else json.loads(row[name]) for name in properties}
        jsonschema.validate(answer, SCHEMA)

    again = caption(v2_path, photos, out, "--json-schema", schema)
    assert again.returncode == 0 and "All 3 images are already in" in again.stdout

    cut = tmp_path / "cut.csv"
    result = caption(v2_path, photos, cut, "--json-schema", schema, "-m", "3")
    assert result.returncode == 0, result.stderr
    assert "0 answered, 3 ended before their JSON was complete (error lines)" in result.stdout
    with open(cut, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert all(row[name] == "" for name in properties) and row["generation_tokens"] == "3"
        assert row["error"].startswith("The answer ended after 3 tokens (--max-tokens 3) before its JSON was complete")


@pytest.mark.parametrize(
    "schema,message",
    [
        ({"type": "string"}, "--format csv needs a --json-schema of an object with properties"),
        ({"type": "object"}, "--format csv needs a --json-schema of an object with properties"),
        (
            {"type": "object", "properties": {"path": {}, "seconds": {}}},
            "--format csv: the schema's properties path, seconds have the names of",
        ),
    ],
)
def test_caption_csv_refuses_a_schema_without_columns_at_once(schema, message, photos, tmp_path):
    out = tmp_path / "answers.csv"
    result = caption("no-such-model", photos, out, "--json-schema", write_schema(tmp_path, schema))
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert not out.exists()


def test_the_benchmark_answers_are_all_as_long(capsys):
    assert benchmark.main(["--max-tokens", "5", "--batch", "2", "--repeats", "1", "--warmup", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in printed if line.startswith("| (") and line.count("|") == 6]
    assert [row[0] for row in rows] == [
        "| (a) unconstrained",
        "| (b) json_object",
        "| (c) json_schema, 5 fields",
        "| (d) batch of 2, unconstrained",
        "| (d) batch of 2, 1 json_schema + 1 unconstrained",
    ]
    assert [row[1] for row in rows] == ["5", "5", "5", "10", "10"]  # tokens generated: the fixed length
    masks = [line for line in printed if line.startswith("| (") and line.count("|") == 4]
    assert [line.split(" | ")[0] for line in masks] == ["| (b) json_object", "| (c) json_schema, 5 fields"]
