"""Structured outputs in chat completions, asked with the ``openai`` client of a server process: every answer that
ends parses and validates against its schema (``jsonschema``), alone, streamed, with ``chat.completions.parse`` and a
pydantic model, and with different schemas in one batch; a random-weight model never writes JSON by itself."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import pytest
from test_server import data_uri

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

SHAPE = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "filled": {"type": "boolean"},
        "label": {"type": "string", "maxLength": 6},
    },
    "required": ["shape", "count", "filled", "label"],
    "additionalProperties": False,
}
SIDES = {
    "type": "object",
    "properties": {"sides": {"type": "array", "items": {"enum": ["left", "right"]}, "maxItems": 3}},
    "required": ["sides"],
    "additionalProperties": False,
}
QUESTION = [{"role": "user", "content": "Describe the shapes."}]
SERVER_OPTIONS = ("--max-batch-size", "4")


def schema_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(client, model_id, **options):
    options = {"messages": QUESTION, "max_tokens": 80, **options}
    return client.chat.completions.create(model=model_id, **options).choices[0]


def test_the_model_writes_no_json_by_itself(client, model_id):
    text = ask(client, model_id).message.content
    with pytest.raises(ValueError):
        json.loads(text)


def test_a_json_schema_answer_validates(client, model_id, images):
    image = {"type": "image_url", "image_url": {"url": data_uri(images["wide"])}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]
    for options in ({}, {"messages": messages}, {"temperature": 1.0, "seed": 3}):
        choice = ask(client, model_id, response_format=schema_format(SHAPE), **options)
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SHAPE)


def test_a_streamed_json_answer_is_the_whole_answer_in_pieces(client, model_id):
    whole = ask(client, model_id, response_format=schema_format(SIDES)).message.content
    stream = client.chat.completions.create(
        model=model_id, messages=QUESTION, max_tokens=80, response_format=schema_format(SIDES), stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    jsonschema.validate(json.loads(whole), SIDES)


def test_json_object_and_regex(client, model_id):
    choice = ask(client, model_id, response_format={"type": "json_object"}, max_tokens=12)
    assert choice.message.content.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    regex = r"(yes|no), [0-9]{2}"
    choice = ask(client, model_id, response_format={"type": "regex", "regex": regex})
    assert choice.finish_reason == "stop" and re.fullmatch(regex, choice.message.content)


def test_the_budget_ends_an_answer_with_length(client, model_id):
    choice = ask(client, model_id, response_format=schema_format(SHAPE), max_tokens=3)
    assert choice.finish_reason == "length"
    assert choice.message.content and '{"shape":"'.startswith(choice.message.content[:10])  # the JSON's start


def test_parse_with_a_pydantic_model(client, model_id):
    class Shape(pydantic.BaseModel):
        shape: Literal["circle", "square", "triangle"]
        filled: bool

    completion = client.chat.completions.parse(model=model_id, messages=QUESTION, response_format=Shape, max_tokens=60)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Shape) and parsed.shape in ("circle", "square", "triangle")


def test_different_schemas_in_one_batch_get_their_answers_alone(client, model_id):
    requests = [
        {"response_format": schema_format(SHAPE)},
        {"response_format": schema_format(SIDES)},
        {},
        {"response_format": {"type": "json_object"}, "max_tokens": 10},
    ]
    alone = [ask(client, model_id, **r).message.content for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: ask(client, model_id, **r).message.content, requests * 2))
    assert together == alone * 2
    jsonschema.validate(json.loads(alone[0]), SHAPE)
    jsonschema.validate(json.loads(alone[1]), SIDES)


def test_a_follow_up_reuses_the_cache_under_a_schema(client, model_id):
    first = client.chat.completions.create(
        model=model_id, messages=QUESTION, max_tokens=80, response_format=schema_format(SIDES)
    )
    again = client.chat.completions.create(
        model=model_id, messages=QUESTION, max_tokens=80, response_format=schema_format(SIDES)
    )
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize(
    "schema, says",
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "strin"),
        ({"type": "string", "pattern": "(unclosed"}, "unclosed"),
        ({"type": "object", "minProperties": "two"}, "minProperties"),
    ],
)
def test_a_bad_schema_is_a_400_with_the_reason(client, model_id, schema, says):
    with pytest.raises(openai.BadRequestError) as raised:
        ask(client, model_id, response_format=schema_format(schema))
    assert raised.value.body["param"] == "response_format" and says in raised.value.body["message"]


def test_an_object_gets_no_keys_it_does_not_declare(client, model_id):
    # JSON Schema allows other keys unless told otherwise; a model left free to add them can write keys forever.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}}, "required": ["ok"]}
    choice = ask(client, model_id, response_format=schema_format(schema))
    assert choice.finish_reason == "stop"
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, schema)
    assert set(answer) <= {"ok", "n"}
