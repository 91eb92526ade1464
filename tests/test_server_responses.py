"""OpenAI's Responses API on the server, ``POST /v1/responses``, run as a user runs it (``python -m mlx_eve.server``)
and asked with the ``openai`` client: its answers against chat completions and ``mlx_eve.generate`` on the same
model, its stream against its whole answer, structured outputs against their schema, and its 400s."""

import base64
import http.client
import json
from typing import Literal

import pytest
from processes import http_request

from mlx_eve import generate

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

# Enums, a boolean and a one-digit integer: a JSON answer that ends within a few tokens, even at random.
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "blue"]},
        "round": {"type": "boolean"},
        "sides": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["colour", "round", "sides"],
    "additionalProperties": False,
}
SHAPE_FORMAT = {"type": "json_schema", "name": "shape", "schema": SCHEMA, "strict": True}


class Shape(pydantic.BaseModel):
    colour: Literal["red", "blue"]
    round: bool
    sides: int = pydantic.Field(ge=0, le=9)


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_answer_is_the_chat_completions_answer(client, model_id):
    system, question, answer = "You answer in one word.", "What shape is red?", "A circle."
    chat = client.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": question},
        ],
        max_tokens=8,
    )
    response = client.responses.create(
        model=model_id,
        instructions=system,
        input=[
            {"role": "user", "content": "Hi"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": answer}]},
            {"role": "user", "content": [{"type": "input_text", "text": question}]},
        ],
        max_output_tokens=8,
    )
    assert response.object == "response" and response.id.startswith("resp_") and response.model == model_id
    assert response.output_text == chat.choices[0].message.content
    assert response.instructions == system and response.temperature == 0
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    # The same prompt again: all but its last token come from the prompt cache.
    assert usage.input_tokens_details.cached_tokens >= usage.input_tokens - 1


@pytest.mark.parametrize("url_form", ["string", "object"])
def test_image_answer_is_generate_on_the_same_model(client, model_id, images, v2_model, url_form):
    question, url = "What is in the image?", data_uri(images["wide"])
    image = {"type": "input_image", "image_url": url if url_form == "string" else {"url": url}, "detail": "auto"}
    response = client.responses.create(
        model=model_id,
        input=[{"role": "user", "content": [image, {"type": "input_text", "text": question}]}],
        max_output_tokens=12,  # enough for the answer to differ with "<image> question" or "question\n<image>"
    )
    assert response.output_text == generate(*v2_model, f"<image>\n{question}", image=images["wide"], max_tokens=12)


def test_budget_ends_an_incomplete_response(client, model_id):
    response = client.responses.create(model=model_id, input="Hello", max_output_tokens=3, metadata={"run": "test"})
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.usage.output_tokens == 3
    assert response.max_output_tokens == 3 and response.metadata == {"run": "test"}


def sse_events(server, body):
    """(event name, data) of each server-sent event of a raw streamed request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", "/v1/responses", json.dumps(body), {"Content-Type": "application/json"})
        blocks = connection.getresponse().read().decode().strip().split("\n\n")
    finally:
        connection.close()
    return [[line.partition(": ")[2] for line in block.split("\n")] for block in blocks]


def test_stream_is_the_whole_answer_in_documented_events(server, client, model_id):
    request = dict(model=model_id, input="Describe a red circle.", max_output_tokens=8)
    whole = client.responses.create(**request)
    events = list(client.responses.create(**request, stream=True))
    types = [event.type for event in events]
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1 and types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text == events[-3].part.text
    assert events[-2].item.content[0].text == text and events[-1].response.output_text == text
    assert events[-1].response.usage.output_tokens == 8
    # The client's own accumulation of a stream that ends "response.completed" (the grammar ends the answer).
    structured = {**request, "text": {"format": SHAPE_FORMAT}, "max_output_tokens": 60}
    with client.responses.stream(**structured) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == client.responses.create(**structured).output_text
    # Each event is named after its type, as the Responses API's events are.
    raw = sse_events(server, {**request, "stream": True})
    assert [name for name, _ in raw] == [json.loads(data)["type"] for _, data in raw] == types


def test_json_schema_answer_validates(client, model_id):
    response = client.responses.create(
        model=model_id, input="Describe the red shape.", text={"format": SHAPE_FORMAT}, max_output_tokens=60
    )
    assert response.status == "completed"  # the grammar ended the answer, not the budget
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    assert response.text.format.type == "json_schema" and response.text.format.name == "shape"


def test_parse_with_a_pydantic_model(client, model_id):
    response = client.responses.parse(
        model=model_id, input="Describe the blue shape.", text_format=Shape, max_output_tokens=60
    )
    assert response.status == "completed"
    assert response.output_parsed == Shape.model_validate_json(response.output_text)


@pytest.mark.parametrize(
    "change, param",
    [
        ({"unknown_field": 1}, "unknown_field"),
        # What this server does not do is refused, never ignored: tools, stored responses, reasoning.
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": 5}, "input"),
        ({"input": []}, "input"),
        ({"input": ["Hi"]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "42"}]}, "input[0].type"),
        ({"input": [{"role": "tool", "content": "42"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": None}]}, "input[0].content"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0]"),
        # Found by the engine's prompt checks, named as this API names the field.
        ({"input": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "input"),
        ({"instructions": 5}, "instructions"),
        (
            {
                "instructions": "Be brief.",
                "input": [{"role": "system", "content": "Be long."}, {"role": "user", "content": "Hi"}],
            },
            "instructions",
        ),
        ({"text": "json"}, "text"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "shape"}}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "strin"}}}}, "text.format"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 2.5}, "max_output_tokens"),
        ({"max_output_tokens": "8"}, "max_output_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"stream": "yes"}, "stream"),
        ({"metadata": "x"}, "metadata"),
    ],
)
def test_invalid_request_is_a_400_naming_the_field(server, change, param):
    body = {"input": "Hi", "max_output_tokens": 2, "user": "harmless", "store": False, **change}
    status, answer = http_request(server, "POST", "/v1/responses", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


def test_bad_image_is_a_400_naming_the_input(client, model_id):
    image = {"type": "input_image", "image_url": "data:image/png;base64,@@@", "detail": "auto"}
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=model_id, input=[{"role": "user", "content": [image]}], max_output_tokens=2)
    assert error.value.body["param"] == "input" and error.value.body["code"] == "invalid_image"


def test_another_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model="gpt-4o", input="Hi")
    assert error.value.body["code"] == "model_not_found"


# --- In process, with the real engine: what a client cannot provoke on purpose --------------------------------


def test_error_after_the_stream_started_is_an_error_event(v2_model, monkeypatch):
    from starlette.testclient import TestClient

    from mlx_eve.api import serving
    from mlx_eve.api.app import create_app
    from mlx_eve.engine import Engine
    from mlx_eve.errors import EVEError

    follow = serving.follow

    async def failing_after_one_token(*args):
        async for event in follow(*args):
            yield event
            raise EVEError("The engine stopped on an error.")

    monkeypatch.setattr(serving, "follow", failing_after_one_token)
    model, processor = v2_model
    engine = Engine(model, processor, prompt_cache_bytes=0)
    try:
        with TestClient(create_app(engine, processor, serving.ServerSettings(model_id="tiny"))) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
            events = list(client.responses.create(input="Hello", max_output_tokens=20, stream=True))
    finally:
        engine.close()
    assert events[-1].type == "error" and events[-1].message == "The engine stopped on an error."
    assert events[-1].code == "server_error"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "response.completed" not in [event.type for event in events]
