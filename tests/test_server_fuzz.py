"""A careless or hostile client cannot harm the others: every field of every endpoint sent with extreme values
(numbers at and beyond every integer width, huge and non-finite floats, very long strings, lone surrogates,
wrong types) while a normal streamed request runs, and clients that go away at every stage of a request. Each bad
request is a 4xx with a message, the normal answers stay those it gives alone, and the server stays up with no
error in its log. Against the bundled demo model, on loopback, bounded in count and time."""

import base64
import http.client
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from bundled_image import IMAGE as PICTURE
from processes import ROOT, free_port, http_request, restore_ctrl_c, start_server, stop_server

from mlx_eve.api.fields import SAMPLING_FIELDS  # the fields every endpoint takes: all fuzzed

pytest.importorskip("fastapi")

DEMO = Path(__file__).resolve().parent.parent / "mlx_eve" / "assets" / "eve-shapes"
IMAGE = "data:image/png;base64,"  # completed with the bundled example image in ``image_url``

BIG_INT = 10**400  # beyond any integer or float width
EXTREMES = [0, -1, 2**31, 2**63, 2**64, BIG_INT, 1e308, -1e308, 1e-320, "x" * 100_000, "\ud800", "", [], {}, True]
# Each endpoint: a valid streamed request of 4 tokens, and the fields to fuzz beside the sampling ones (a dotted
# path reaches into the first message).
ENDPOINTS = {
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "What shape is it?"}], "max_tokens": 4, "stream": True},
        [
            "max_tokens",
            "max_completion_tokens",
            "n",
            "stop",
            "logprobs",
            "top_logprobs",
            "response_format",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "model",
            "messages",
            "stream_options",
            "user",
            "messages.0.content",
            "messages.0.role",
        ],
    ),
    "/v1/completions": (
        {"prompt": "A red circle", "max_tokens": 4, "stream": True},
        ["prompt", "max_tokens", "stop", "echo", "n", "model", "stream"],
    ),
    "/v1/responses": (
        {"input": "What shape is it?", "max_output_tokens": 4, "stream": True},
        ["input", "instructions", "max_output_tokens", "text", "tools", "model", "truncation", "metadata"],
    ),
    "/v1/messages": (
        {"messages": [{"role": "user", "content": "What shape is it?"}], "max_tokens": 4, "stream": True},
        ["max_tokens", "stop_sequences", "system", "messages", "model", "metadata", "messages.0.content"],
    ),
}
# An error once a stream has begun: chat completions' and completions' data, or the event of the Responses and
# Messages APIs.
STREAM_ERROR = re.compile(r'^(data: \{"error"|event: (error|response\.failed))', re.M)
NORMAL = {
    "messages": [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": ""}}, {"type": "text", "text": "Describe it."}],
        }
    ],
    "max_tokens": 24,
    "stream": True,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(DEMO, tmp_path_factory.mktemp("server") / "server.log", "--max-queued", "256")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def normal_body():
    body = json.loads(json.dumps(NORMAL))
    data = base64.b64encode(PICTURE.read_bytes()).decode()
    body["messages"][0]["content"][0]["image_url"]["url"] = IMAGE + data
    return body


def with_value(body: dict, field: str, value) -> dict:
    body = json.loads(json.dumps(body))
    *path, last = field.split(".")
    target = body
    for step in path:
        target = target[int(step)] if step.isdigit() else target[step]
    target[int(last) if last.isdigit() else last] = value
    return body


def send(port: int, path: str, body: dict, read_for: float = 2.0):
    """(status, JSON error body or None, the streamed text read within ``read_for`` seconds); the connection is
    closed then, answer finished or not."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = json.dumps(body).encode()
        connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return response.status, json.loads(response.read()), ""
        streamed, deadline = b"", time.monotonic() + read_for
        while time.monotonic() < deadline:
            chunk = response.read1(65536) if hasattr(response, "read1") else response.read(1)
            if not chunk:
                break
            streamed += chunk
        return 200, None, streamed.decode(errors="replace")
    finally:
        connection.close()


def streamed_chat_text(port: int, body: dict) -> str:
    status, error, streamed = send(port, "/v1/chat/completions", body, read_for=60)
    assert status == 200, error
    pieces = []
    for line in streamed.splitlines():
        if line.startswith("data: {"):
            pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    return "".join(pieces)


class NormalTraffic:
    """The normal streamed request, over and over on a thread of its own, while the test sends others."""

    def __init__(self, port: int, body: dict):
        self.port, self.body, self.answers, self.errors = port, body, [], []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            try:
                self.answers.append(streamed_chat_text(self.port, self.body))
            except Exception as error:  # reported by the test
                self.errors.append(repr(error))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(120)


def check_healthy(server, normal_body, alone):
    assert http_request(server, "GET", "/health") == (200, {"status": "ok"})
    assert streamed_chat_text(server.port, normal_body) == alone
    log = server.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-4000:]


def test_extreme_values_in_every_field_are_client_errors_and_harm_nobody(server, normal_body):
    alone = streamed_chat_text(server.port, normal_body)
    assert alone
    cases = [
        (path, field, value)
        for path, (_, fields) in ENDPOINTS.items()
        for field in SAMPLING_FIELDS + tuple(fields)
        for value in EXTREMES
    ]
    results = []
    started = time.monotonic()
    with NormalTraffic(server.port, normal_body) as traffic:
        for path, field, value in cases:
            status, error, streamed = send(server.port, path, with_value(ENDPOINTS[path][0], field, value), read_for=1)
            results.append((path, field, repr(value)[:20], status))
            assert status < 500, (path, field, repr(value)[:40], error)
            if status != 200:
                assert 400 <= status < 500 and error and (error.get("error") or {}).get("message"), (field, error)
            else:
                assert not STREAM_ERROR.search(streamed), (path, field, repr(value)[:40], streamed[-500:])
    assert traffic.answers and set(traffic.answers) == {alone}, traffic.errors
    assert not traffic.errors
    refused = sum(status >= 400 for *_, status in results)
    assert refused > len(cases) / 2  # most extremes are out of range: the check above really saw 4xx answers
    assert time.monotonic() - started < 300
    check_healthy(server, normal_body, alone)


def raw(port: int, data: bytes, then_read: int = 0) -> None:
    """Send ``data`` on a fresh connection, read up to ``then_read`` bytes, and close it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if data:
            s.sendall(data)
        received = b""
        while len(received) < then_read:
            chunk = s.recv(then_read - len(received))
            if not chunk:
                break
            received += chunk


def request_bytes(path: str, body: dict, declared: int = None) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared or len(data)}"
    )
    return head.encode() + b"\r\n\r\n" + data


def test_clients_that_go_away_at_every_stage_harm_nobody(server, normal_body):
    alone = streamed_chat_text(server.port, normal_body)
    rng = random.Random(0)
    streamed = dict(normal_body, max_tokens=200)
    whole = dict(normal_body, max_tokens=200, stream=False)
    full = request_bytes("/v1/chat/completions", streamed)
    stages = {
        "connected, nothing sent": lambda: raw(server.port, b""),
        "half the headers": lambda: raw(server.port, full[:20]),
        "half the body": lambda: raw(server.port, full[: len(full) - 1000]),
        "body shorter than declared": lambda: raw(server.port, request_bytes("/v1/messages", streamed, 10**6)),
        "whole request, then gone": lambda: raw(server.port, request_bytes("/v1/chat/completions", whole)),
        "during the image's prefill": lambda: raw(server.port, full, then_read=1),
        "after the first events": lambda: raw(server.port, full, then_read=rng.randint(200, 2000)),
        "responses stream": lambda: raw(
            server.port, request_bytes("/v1/responses", {"input": "Hi", "stream": True}), 300
        ),
    }
    started = time.monotonic()
    with NormalTraffic(server.port, normal_body) as traffic:
        for _ in range(40):
            stages[rng.choice(sorted(stages))]()
            time.sleep(rng.random() * 0.2)
    assert set(traffic.answers) == {alone} and not traffic.errors, traffic.errors
    assert time.monotonic() - started < 180
    deadline = time.monotonic() + 30  # the cancelled answers leave the batch
    while "mlx_eve_running_requests 0.0" not in http_request_text(server, "/metrics"):
        assert time.monotonic() < deadline, http_request_text(server, "/metrics")
        time.sleep(0.2)
    check_healthy(server, normal_body, alone)


def http_request_text(server, path: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()


# The server as ``python -m mlx_eve.server`` runs it, with a bug planted in its engine's loop that a request
# with max_tokens 13 sets off: the engine thread stops.
DYING_SERVER = """
import sys
from mlx_eve.engine import Engine
from mlx_eve.commands.server import main

decide = Engine._decide

def broken(self, running):
    if any(r.params.max_tokens == 13 for r in running.values()):
        raise RuntimeError("a planted bug")
    return decide(self, running)

Engine._decide = broken
sys.exit(main(sys.argv[1:]))
"""


def test_a_server_whose_engine_stops_fails_its_requests_and_exits_non_zero(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", DYING_SERVER, "--model", str(DEMO), "--port", str(port)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=restore_ctrl_c,
        )
    server = SimpleNamespace(port=port, log=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if http_request(server, "GET", "/health")[0] == 200:
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 13}
        status, answer = http_request(server, "POST", "/v1/chat/completions", body)
        assert status in (500, 503) and "a planted bug" in answer["error"]["message"], answer
        assert process.wait(timeout=30) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert "error: The server stopped because its engine did: RuntimeError('a planted bug')" in output, output


def test_health_says_503_once_the_engine_has_stopped(v2_model):
    from starlette.testclient import TestClient

    from mlx_eve.api.app import create_app
    from mlx_eve.api.serving import ServerSettings
    from mlx_eve.engine import Engine

    engine = Engine(*v2_model)
    client = TestClient(create_app(engine, v2_model[1], ServerSettings(model_id="tiny")))
    assert client.get("/health").json() == {"status": "ok"}
    engine._decide = lambda running: 1 / 0
    engine.submit("Hi")
    with pytest.raises(Exception, match="stopped on an error"):
        engine.join()
    answer = client.get("/health")
    assert answer.status_code == 503 and "ZeroDivisionError" in answer.json()["error"]
    refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert refused.status_code == 503 and "stopped on an error" in refused.json()["error"]["message"]
