"""Anthropic's Messages API on the server, ``POST /v1/messages``, asked with the ``anthropic`` client (and with raw
HTTP where the client would hide what is checked): answers as chat completions and ``generate`` give them, the
stream's events, stop sequences, and every error in Anthropic's shape."""

import base64
import json

import pytest
from processes import http_request, start_server, stop_server

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import small_app  # noqa: E402,F401  (the app in process, for what a client cannot provoke)

KEY = "test-key"
MAX_BODY_BYTES = 1_000_000
QUESTION = "Where is the blue square?"


@pytest.fixture(scope="module")
def server(v2_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(v2_path, log, "--api-key", KEY, "--max-body-bytes", str(MAX_BODY_BYTES))
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def ask(client, model_id, content=QUESTION, **options):
    return client.messages.create(
        model=model_id, messages=[{"role": "user", "content": content}], **{"max_tokens": 8, **options}
    )


def test_answer_is_the_chat_completions_answer(server, client, model_id):
    system = [{"type": "text", "text": "You answer"}, {"type": "text", "text": "in one word."}]
    message = ask(client, model_id, [{"type": "text", "text": QUESTION}], system=system)
    chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0).chat.completions.create(
        model=model_id,
        messages=[{"role": "system", "content": "You answer\nin one word."}, {"role": "user", "content": QUESTION}],
        max_tokens=8,
    )
    assert message.id.startswith("msg_") and (message.type, message.role, message.model) == (
        "message",
        "assistant",
        model_id,
    )
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "length"  # the tiny random model does not stop by itself this soon
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert (usage.output_tokens, usage.cache_creation_input_tokens) == (chat.usage.completion_tokens, 0)


@pytest.mark.parametrize("source", ["base64", "url"])
def test_image_block_answer_is_generate_s(client, model_id, images, v2_model, source):
    from mlx_eve import generate

    data = base64.b64encode(images["wide"].read_bytes()).decode()
    sources = {
        "base64": {"type": "base64", "media_type": "image/png", "data": data},
        "url": {"type": "url", "url": f"data:image/png;base64,{data}"},
    }
    question = "What is in the image?"
    content = [{"type": "image", "source": sources[source]}, {"type": "text", "text": question}]
    message = ask(client, model_id, content, max_tokens=6)
    model, processor = v2_model
    # The image block became <image> before the question, as EVE's reference writes it.
    prompt = f"<image>\n{question}"
    assert message.content[0].text == generate(model, processor, prompt, images["wide"], max_tokens=6)
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == processor(prompt, images["wide"]).input_ids.size


def test_streamed_answer_is_the_whole_answer_in_events(server, client, model_id):
    whole = ask(client, model_id)
    with client.messages.stream(model=model_id, max_tokens=8, messages=[{"role": "user", "content": QUESTION}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert final.id.startswith("msg_") and final.id != whole.id
    assert (final.stop_reason, final.stop_sequence, final.usage.output_tokens) == ("max_tokens", None, 8)
    # The same prompt again: it came from the prompt cache.
    assert final.usage.cache_read_input_tokens >= whole.usage.input_tokens - 1
    # On the wire: each event named after its data's type, in Anthropic's order.
    body = {"model": model_id, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    response = httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [event.split("\n") for event in response.text.strip().split("\n\n")]
    assert all(name.removeprefix("event: ") == json.loads(data.removeprefix("data: "))["type"] for name, data in events)
    names = [name.removeprefix("event: ") for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_sequences(client, model_id, stream):
    answer = ask(client, model_id, max_tokens=12).content[0].text
    stop = answer[4:7]

    def stopped(stops):
        if not stream:
            return ask(client, model_id, max_tokens=12, stop_sequences=stops)
        with client.messages.stream(
            model=model_id, max_tokens=12, messages=[{"role": "user", "content": QUESTION}], stop_sequences=stops
        ) as events:
            return events.get_final_message()

    message = stopped(["zzz", stop])
    assert message.content[0].text == answer[: answer.index(stop)]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    message = stopped(["zzz"])
    assert message.content[0].text == answer
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"max_tokens": None}, "max_tokens"),  # required, as Anthropic's
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"top_k": "many"}, "top_k"),
        ({"stop_sequences": [1]}, "stop_sequences"),
        ({"stream": "yes"}, "stream"),
        # A field the server does not implement would change the answer if it were honoured: never ignored.
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"min_p": 0.1}, "min_p"),  # the server's own sampling settings are for the OpenAI APIs
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "Hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "messages[0].content[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
            "messages[0].content[0].source",
        ),
        ({"messages": [{"role": "user", "content": [IMAGE]}]}, "messages"),  # not an image: named by the engine
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]}, "messages"),
        ({"system": 5}, "system"),
        ({"system": [IMAGE]}, "system[0]"),
    ],
)
def test_invalid_request_is_a_400_naming_the_field(client, model_id, change, field):
    with pytest.raises(anthropic.BadRequestError) as error:
        ask(client, model_id, max_tokens=2, metadata={"user_id": "harmless"}, extra_body=change)
    assert error.value.body["type"] == "error" and error.value.body["error"]["type"] == "invalid_request_error"
    assert (
        error.value.body["error"]["message"].startswith(field) or f"'{field}'" in error.value.body["error"]["message"]
    )


def test_api_key(server, model_id):
    with pytest.raises(anthropic.AuthenticationError) as error:
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=model_id, max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        )
    assert error.value.body["error"]["type"] == "authentication_error"
    body = {"model": model_id, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    status, answer = http_request(server, "POST", "/v1/messages", body)
    assert status == 401 and answer["type"] == "error" and answer["error"]["type"] == "authentication_error"
    # Either header, on any route.
    assert http_request(server, "POST", "/v1/messages", body, key=KEY)[0] == 200
    assert http_request(server, "GET", "/v1/models", headers={"x-api-key": KEY})[0] == 200
    assert http_request(server, "GET", "/v1/models", headers={"x-api-key": "wrong"})[0] == 401


def test_other_errors_are_in_anthropic_shape(server, client, model_id):
    with pytest.raises(anthropic.NotFoundError) as error:
        ask(client, "claude-sonnet-4-5", max_tokens=2)
    assert error.value.body["error"]["type"] == "not_found_error" and model_id in error.value.body["error"]["message"]
    huge = {"model": model_id, "max_tokens": 2, "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    for body, status, kind in [(huge, 413, "request_too_large"), (b"{not json", 400, "invalid_request_error")]:
        got, answer = http_request(server, "POST", "/v1/messages", body, key=KEY)
        assert (got, answer["type"], set(answer["error"]), answer["error"]["type"]) == (
            status,
            "error",
            {"type", "message"},
            kind,
        )
    status, answer = http_request(server, "POST", "/v1/messages/count_tokens", {}, key=KEY)
    assert status == 404 and answer["error"]["type"] == "not_found_error"
    # The OpenAI routes keep OpenAI's shape.
    status, answer = http_request(server, "POST", "/v1/chat/completions", b"{not json", key=KEY)
    assert status == 400 and set(answer["error"]) == {"message", "type", "param", "code"}


def test_a_bug_is_an_api_error_whole_or_in_the_stream(small_app, monkeypatch):  # noqa: F811
    from mlx_eve.api import messages

    engine, http = small_app
    client = anthropic.Anthropic(base_url=str(http.base_url), api_key="none", http_client=http, max_retries=0)
    request = dict(model="tiny", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    monkeypatch.setattr(messages, "_ending", lambda *args: 1 / 0)
    with pytest.raises(anthropic.InternalServerError) as error:
        client.messages.create(**request)
    assert error.value.status_code == 500 and error.value.body["error"]["type"] == "api_error"
    seen = []
    with pytest.raises(anthropic.APIStatusError) as error:
        with client.messages.stream(**request) as events:
            for event in events:
                seen.append(event.type)
    assert seen[0] == "message_start"  # the error came as an event, after the stream began
    assert error.value.body["error"]["type"] == "api_error"
    monkeypatch.undo()
    assert client.messages.create(**request).usage.output_tokens == 3


def test_a_full_queue_is_overloaded(small_app):  # noqa: F811
    from mlx_eve.engine import SamplingParams

    engine, http = small_app
    client = anthropic.Anthropic(base_url=str(http.base_url), api_key="none", http_client=http, max_retries=0)
    running = engine.submit("Hello", params=SamplingParams(max_tokens=20000))
    next(iter(running))  # decoding: the batch of one is full
    waiting = engine.submit("Hello", params=SamplingParams(max_tokens=20000))
    try:
        with pytest.raises(anthropic.InternalServerError) as error:
            client.messages.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert error.value.status_code == 503 and error.value.body["error"]["type"] == "overloaded_error"
    finally:
        running.cancel()
        waiting.cancel()
