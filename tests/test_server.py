"""The OpenAI-compatible server, run as a user runs it: ``python -m mlx_eve.server`` in a separate process on a free
port, asked with the ``openai`` client (and with raw HTTP where the client would hide what is checked)."""

import base64
import http.client
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from processes import ROOT, free_port, http_request, start_server, stop_server, wait_for_log

from mlx_eve import generate

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
MAX_BODY_BYTES = 1_000_000
MAX_IMAGE_BYTES = 200_000
IMAGE_TIMEOUT_S = 1


SERVER_OPTIONS = (
    "--api-key",
    KEY,
    "--max-body-bytes",
    str(MAX_BODY_BYTES),
    "--max-image-bytes",
    str(MAX_IMAGE_BYTES),
    "--image-timeout",
    str(IMAGE_TIMEOUT_S),
)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_question(path: Path, question: str) -> dict:
    image = {"type": "image_url", "image_url": {"url": data_uri(path)}}
    return {"role": "user", "content": [image, {"type": "text", "text": question}]}


def test_health_and_models(server, client, model_id):
    assert http_request(server, "GET", "/health") == (200, {"status": "ok"})  # no key needed
    assert [model.id for model in client.models.list().data] == [model_id]
    assert client.models.retrieve(model_id).id == model_id


def test_answer_about_an_image_with_logprobs(client, model_id, images, v2_model):
    question = "What is in the image?"
    response = client.chat.completions.create(
        model=model_id,
        messages=[image_question(images["wide"], question)],
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
    )
    assert response.object == "chat.completion" and response.model == model_id
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # the tiny random model does not stop by itself this soon
    # The image part became <image> before the question, as EVE's reference writes it.
    _, processor = v2_model
    expected = processor(f"<image>\n{question}", [images["wide"]])
    usage = response.usage
    assert usage.prompt_tokens == expected.input_ids.size
    assert usage.prompt_tokens_details.image_tokens == expected.image_tokens == 1 + 7 * 10
    assert (usage.completion_tokens, usage.total_tokens) == (6, usage.prompt_tokens + 6)
    assert len(choice.logprobs.content) == 6
    for token in choice.logprobs.content:
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob
        # Greedy: the chosen token is the most likely one.
        assert (token.token, token.logprob) == (token.top_logprobs[0].token, token.top_logprobs[0].logprob)
        assert token.logprob <= 0


def test_streamed_answer_is_the_whole_answer_in_pieces(client, model_id, images):
    request = dict(model=model_id, messages=[image_question(images["square"], "Describe it.")], max_tokens=8)
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *answer, last = chunks
    assert "".join(chunk.choices[0].delta.content or "" for chunk in answer) == whole.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in answer if chunk.choices[0].finish_reason] == ["length"]
    assert all(chunk.usage is None for chunk in answer)
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    # The same request again: its prompt (the image with it) comes from the prompt cache.
    assert last.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens - 1


def test_follow_up_question_reuses_the_cached_conversation(client, model_id, images):
    messages = [
        {"role": "system", "content": "You answer in one word."},
        image_question(images["tall"], "What shape is red?"),
    ]
    first = client.chat.completions.create(model=model_id, messages=messages, max_tokens=5)
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # a new system prompt: nothing to reuse
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": [{"type": "text", "text": "And what colour is the square?"}]},
    ]
    second = client.chat.completions.create(model=model_id, messages=messages, max_tokens=5)
    details = second.usage.prompt_tokens_details
    assert details.image_tokens == first.usage.prompt_tokens_details.image_tokens
    # The first prompt, image included, is not read again: only the answer and the new question are.
    assert details.cached_tokens >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens > details.cached_tokens


def test_concurrent_requests_get_the_answers_they_get_alone(client, model_id, images):
    requests = [
        [image_question(images["wide"], "Where is the blue square?")],
        [{"role": "user", "content": "How many shapes are there?"}],
        [image_question(images["strip"], "List every object.")],
        [{"role": "user", "content": "Hello, world!"}],
    ]
    start = threading.Barrier(len(requests))

    def ask(messages, together=False):
        if together:
            start.wait()
        response = client.chat.completions.create(model=model_id, messages=messages, max_tokens=48)
        return response.choices[0].message.content, response.choices[0].finish_reason

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda messages: ask(messages, together=True), requests))
    alone = [ask(messages) for messages in requests]
    assert together == alone
    assert len(set(together)) == len(requests)


def test_a_seeded_sampled_answer_repeats(client, model_id, images):
    def ask(seed):
        messages = [image_question(images["wide"], "Describe the image.")]
        response = client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=12, temperature=1.5, seed=seed
        )
        return response.choices[0].message.content

    assert ask(7) == ask(7)
    assert ask(7) != ask(8)


def test_stop_strings(client, model_id):
    messages = [{"role": "user", "content": "Where is the blue square?"}]
    answer = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12).choices[0].message.content
    stop = answer[4:7]
    stopped = client.chat.completions.create(model=model_id, messages=messages, max_tokens=12, stop=["zzz", stop])
    assert stopped.choices[0].message.content == answer[: answer.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_logit_bias_and_penalties_are_honoured(client, model_id, v2_model):
    messages = [{"role": "user", "content": "Where is the blue square?"}]
    answer = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6)
    tokenizer = v2_model[1].tokenizer
    favourite = next(t for t in range(100, 400) if tokenizer.decode([t]).isalpha())  # a word without a space
    biased = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=6, logit_bias={str(favourite): 100}
    )
    assert biased.choices[0].message.content == tokenizer.decode([favourite] * 6)
    # A negative presence penalty favours the tokens already there (the prompt's too): this answer repeats them.
    penalized = client.chat.completions.create(model=model_id, messages=messages, max_tokens=6, presence_penalty=-2)
    model, processor = v2_model
    expected = generate(model, processor, messages, max_tokens=6, presence_penalty=-2)
    assert penalized.choices[0].message.content == expected != answer.choices[0].message.content


@pytest.mark.parametrize(
    "url, says",
    [
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "not a recognised image"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png,rawbytes", "base64"),
        ("/etc/hostname", "--allow-local-images"),
        ("file:///etc/hostname", "--allow-local-images"),
        ("data:image/png;base64," + "A" * (MAX_IMAGE_BYTES * 2), f"more than {MAX_IMAGE_BYTES:,} bytes"),
    ],
)
def test_bad_image_is_a_400_and_the_server_goes_on(client, model_id, url, says):
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": content}])
    assert says in error.value.message
    assert error.value.body["type"] == "invalid_request_error" and error.value.body["code"] == "invalid_image"
    response = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert response.choices[0].finish_reason == "length"


@pytest.fixture(scope="module")
def image_host(images):
    """A local web server with the test images, a file over the server's size limit and a slow one."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.strip("/")
            if name not in (*images, "large", "slow"):
                return self.send_error(404)
            body = images[name].read_bytes() if name in images else b"\0" * (MAX_IMAGE_BYTES + 1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name == "slow":  # a byte at a time, never pausing long enough for a socket timeout
                for i in range(IMAGE_TIMEOUT_S * 10):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    host = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()


@pytest.fixture(scope="module")
def local_images_client(v2_path, tmp_path_factory):
    """A client of a second server, one that may download from this computer's addresses (--allow-local-images)."""
    options = [*SERVER_OPTIONS, "--allow-local-images"]
    server = start_server(v2_path, tmp_path_factory.mktemp("local") / "server.log", *options)
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    stop_server(server)


def ask_about(client, model_id, url):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi"}]
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": content}], max_tokens=2)


@pytest.mark.parametrize("name", ["missing", "large", "slow"])
def test_an_image_url_is_downloaded_within_limits(local_images_client, model_id, image_host, name):
    assert ask_about(local_images_client, model_id, f"{image_host}/wide").usage.prompt_tokens_details.image_tokens == 71
    with pytest.raises(openai.BadRequestError) as error:
        ask_about(local_images_client, model_id, f"{image_host}/{name}")
    # The same answer for every failure (the log says which): the server cannot be used to map a network.
    assert error.value.body["message"] == f"Could not download image {image_host}/{name}." and error.value.body[
        "code"
    ] == ("invalid_image")


def test_an_image_url_on_this_computer_is_refused_by_default(client, model_id, image_host):
    with pytest.raises(openai.BadRequestError) as error:
        ask_about(client, model_id, f"{image_host}/wide")
    assert error.value.body["message"] == f"Could not download image {image_host}/wide."


@pytest.mark.parametrize(
    "change, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 2}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 2.5}, "max_completion_tokens"),
        ({"n": 2}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stop": [1, 2]}, "stop"),
        ({"seed": 1.5}, "seed"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}}, "response_format"),
        ({"response_format": {"type": "regex", "regex": "(unclosed"}}, "response_format"),
        # A field the server does not implement would change the answer if it were honoured: never ignored.
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"modalities": ["audio"]}, "modalities"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": [{"role": "function", "content": "42"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, "messages"),
    ],
)
def test_invalid_request_is_a_400_naming_the_field(server, change, param):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "user": "harmless", **change}
    status, answer = http_request(server, "POST", "/v1/chat/completions", body, key=KEY)
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert set(answer["error"]) == {"message", "type", "param", "code"}


def test_body_that_is_not_json_is_a_400(server):
    status, answer = http_request(server, "POST", "/v1/chat/completions", b"{not json", key=KEY)
    assert status == 400 and "not valid JSON" in answer["error"]["message"]


def test_api_key(server, client, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for key in (None, "wrong"):
        status, answer = http_request(server, "POST", "/v1/chat/completions", body, key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert http_request(server, "GET", "/v1/models")[0] == 401
    assert http_request(server, "POST", "/v1/chat/completions", body, key=KEY)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_another_model_is_a_404(server, client, model_id, v2_path):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"
    for name in (model_id, str(v2_path), "default_model"):
        response = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
        assert response.model == model_id
    status, answer = http_request(server, "GET", "/nothing/here", key=KEY)
    assert status == 404 and answer["error"]["message"] == "Not Found"


def test_huge_body_is_a_413(server, client, model_id):
    huge = {"model": model_id, "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    status, answer = http_request(server, "POST", "/v1/chat/completions", huge, key=KEY)
    assert status == 413 and set(answer["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(**huge)
    assert error.value.status_code == 413


def test_client_that_disconnects_mid_stream_frees_its_place(server, client, model_id):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20000, "stream": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 200
    lines = []
    while len(lines) < 3:  # the role chunk, then two pieces of the answer
        line = response.readline()
        if line.startswith(b"data: "):
            lines.append(json.loads(line[6:]))
    connection.close()
    started = time.monotonic()
    # The server notices at once and cancels the request (20000 tokens would take the tiny model ~30 s).
    wait_for_log(server, rf"{lines[0]['id']}: cancelled after \d+ tokens: the client disconnected")
    response = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert response.choices[0].finish_reason == "length"
    assert time.monotonic() - started < 20


def test_client_that_gives_up_on_a_whole_answer_frees_its_place(server, model_id):
    cancelled = re.compile(r"cancelled after [1-9]\d* tokens: the client disconnected")
    before = len(cancelled.findall(server.log.read_text()))
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20000}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.5)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    with pytest.raises(TimeoutError):
        connection.getresponse()
    connection.close()
    deadline = time.monotonic() + 10
    while len(cancelled.findall(server.log.read_text())) == before:
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.05)


def test_bad_options_and_missing_model_are_one_line_errors(tmp_path):
    def run(*args):
        command = [sys.executable, "-m", "mlx_eve.server", *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    for options in (
        ["--port", "70000"],
        ["--max-batch-size", "0"],
        ["--image-timeout", "-1"],
        ["--max-body-bytes", "x"],
    ):
        result = run(*options)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    result = run("--model", str(tmp_path / "missing"), "--port", str(free_port()))
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_ctrl_c_ends_the_answers_in_progress_and_stops(v2_path, tmp_path):
    server = start_server(v2_path, tmp_path / "server.log")
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20000, "stream": True}
        connection.request("POST", "/v1/chat/completions", json.dumps(body))
        response = connection.getresponse()
        # At once: a Ctrl-C during the lazy start of the first answer used to be lost (the server now warms up).
        assert response.readline().startswith(b"data: ")
        # The client goes on reading, as clients do, so the server is never held up by a full socket.
        rest = []
        reader = threading.Thread(target=lambda: rest.append(response.read().decode()), daemon=True)
        reader.start()
        started = time.monotonic()
        assert stop_server(server) == 130
        assert time.monotonic() - started < 20
        reader.join(timeout=30)
        assert "The server is shutting down." in rest[0] and "[DONE]" not in rest[0]
        connection.close()
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log.read_text()
    assert re.search(r"cancelled after \d+ tokens: the server is stopping", log) and "Traceback" not in log


# --- In process, with the real engine: what a client cannot provoke on purpose --------------------------------


@pytest.fixture
def small_app(v2_model):
    """The app around an engine that decodes one request and queues one more."""
    from starlette.testclient import TestClient

    from mlx_eve.api.app import create_app
    from mlx_eve.api.serving import ServerSettings
    from mlx_eve.engine import Engine

    model, processor = v2_model
    engine = Engine(model, processor, max_batch_size=1, max_queued=1, prompt_cache_bytes=0)
    try:
        with TestClient(
            create_app(engine, processor, ServerSettings(model_id="tiny")), raise_server_exceptions=False
        ) as http:
            yield engine, http
    finally:
        engine.close()


def test_a_bug_is_a_500_in_openai_shape_and_the_server_goes_on(small_app, monkeypatch):
    from mlx_eve.api.chat_completions import Reply

    engine, http = small_app
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    monkeypatch.setattr(Reply, "completion", lambda *args: 1 / 0)
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    monkeypatch.setattr(Reply, "logprob", lambda *args: 1 / 0)
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200 and json.loads(events[-1][6:])["error"]["type"] == "server_error"
    monkeypatch.undo()
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def test_a_full_queue_is_a_503_to_retry(small_app):
    from mlx_eve.engine import SamplingParams

    engine, http = small_app
    running = engine.submit("Hello", params=SamplingParams(max_tokens=20000))
    next(iter(running))  # decoding: the batch of one is full
    waiting = engine.submit("Hello", params=SamplingParams(max_tokens=20000))
    try:
        response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "server_overloaded"
    finally:
        running.cancel()
        waiting.cancel()
