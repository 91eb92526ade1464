"""A bounded soak: a minute (``MLX_EVE_SOAK_SECONDS``) of mixed traffic (text and image questions, whole and
streamed, streams cancelled part way, plain completions) from several clients at once against the server on the
demo model, on loopback. No answer is a 5xx, every greedy answer is the one it gets alone, and the server's
resident memory ends near where the warm-up left it."""

import base64
import http.client
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest
from bundled_image import IMAGE
from processes import start_server, stop_server

pytest.importorskip("fastapi")

DEMO = Path(__file__).resolve().parent.parent / "mlx_eve" / "assets" / "eve-shapes"
PICTURE = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
SOAK_S = float(os.environ.get("MLX_EVE_SOAK_SECONDS", 60))
CLIENTS = 4
PROMPT_CACHE_BYTES = 32 * 2**20

QUESTIONS = {
    "text": {"messages": [{"role": "user", "content": "Tell me about shapes."}], "max_tokens": 24},
    "image": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": PICTURE}},
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ],
        "max_tokens": 24,
    },
    "completion": {"prompt": "A red circle and", "max_tokens": 16},
}


def post(port: int, path: str, body: dict, read_events: int = None):
    """(status, answer text); a stream read for ``read_events`` events only is closed there (cancelled)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if not body.get("stream"):
            answer = json.loads(response.read())
            if response.status != 200:
                return response.status, answer
            choice = answer["choices"][0]
            return 200, choice["message"]["content"] if "message" in choice else choice["text"]
        pieces, events = [], 0
        for line in response:
            if read_events is not None and events >= read_events:
                return response.status, None
            if line.startswith(b"data: {"):
                events += 1
                assert b'"error"' not in line, line
                choice = json.loads(line[6:])["choices"][0]
                pieces.append((choice["delta"].get("content") if "delta" in choice else choice["text"]) or "")
        return response.status, "".join(pieces)
    finally:
        connection.close()


def ask(port: int, kind: str, stream: bool = False, read_events: int = None):
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    return post(port, path, dict(QUESTIONS[kind], stream=stream), read_events)


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_a_minute_of_mixed_traffic_leaves_the_server_as_it_was(tmp_path):
    server = start_server(DEMO, tmp_path / "server.log", "--prompt-cache-bytes", str(PROMPT_CACHE_BYTES))
    try:
        alone = {kind: ask(server.port, kind)[1] for kind in QUESTIONS}
        for kind in QUESTIONS:  # warm every path once more, streamed
            assert ask(server.port, kind, stream=True) == (200, alone[kind])
        before = resident_bytes(server.process.pid)
        results, deadline = [], time.monotonic() + SOAK_S

        def client(seed: int):
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                kind, stream = rng.choice(list(QUESTIONS)), rng.random() < 0.6
                cancel_after = rng.randint(1, 5) if stream and rng.random() < 0.3 else None
                try:
                    status, text = ask(server.port, kind, stream, cancel_after)
                except Exception as error:  # reported below
                    results.append((kind, "error", repr(error)))
                    continue
                results.append((kind, status, text if cancel_after is None else alone[kind]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SOAK_S + 120)
        time.sleep(1)  # the last cancelled streams leave the batch
        after = resident_bytes(server.process.pid)
    finally:
        stop_server(server)
    assert len(results) > 50, results
    bad = [r for r in results if r[1] != 200 or r[2] != alone[r[0]]]
    assert not bad, bad[:5]
    # What it may have gained: the prompt cache's bound, and allocator slack.
    assert after - before < PROMPT_CACHE_BYTES + 150 * 2**20, (before, after)
    assert "Traceback" not in server.log.read_text()
