"""The server under tensor parallelism: ``mlx.launch -n 2 ... -m mlx_eve.server`` (ring backend, this machine) answers
as the same engine does in one process, with concurrent, cancelled and seeded requests, and Ctrl-C stops every
process. Also the plans rank 0 sends the other ranks, as bytes and back, and unseeded sampling on two ranks.

Run as a script, this file is the worker of that last test: ``python tests/test_distributed_server.py OUT MODEL``
samples an answer on the engine of each rank (rank 0 asks) and writes rank 0's tokens and their log-probabilities
to ``OUT/0.json``.
"""

import base64
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import tiny_checkpoints
from processes import LAUNCHER, ROOT, command, start_server, stop_server, wait_for_log

from mlx_eve import load
from mlx_eve.api.chat_completions import parse_chat_request
from mlx_eve.api.serving import ServerSettings
from mlx_eve.broadcast import Plan, decode_plan, encode_plan, pack, unpack
from mlx_eve.engine import Engine, cache_key
from mlx_eve.image_fetching import read_image
from mlx_eve.request import Request, SamplingParams
from mlx_eve.structured import json_schema_grammar

LONG = 20000  # max_tokens of an answer that is stopped long before its end
MODEL = "default_model"  # a name the server answers to, whatever it serves


# --- The plans, as bytes and back ------------------------------------------------------------------------------


def test_pack_round_trip_keeps_dtypes_shapes_and_values():
    rng = np.random.default_rng(0)
    arrays = [
        np.arange(6, dtype=np.int32).reshape(2, 3),
        rng.standard_normal((3, 4, 3)).astype(np.float32),
        rng.standard_normal(5).astype(np.float16),
        np.array(2**40, dtype=np.int64),  # 0-d
        np.array([True, False, True]),
        np.zeros((0, 4), np.uint8),  # empty
        np.arange(12, dtype=np.float64).reshape(3, 4).T,  # not contiguous
    ]
    header = {"text": "héllo", "ids": [1, "digest", 3], "nested": {"flag": True, "none": None}}
    got_header, got = unpack(pack(header, arrays))
    assert got_header == header
    assert len(got) == len(arrays)
    for a, b in zip(arrays, got):
        assert (b.dtype, b.shape) == (a.dtype, a.shape)
        np.testing.assert_array_equal(a, b)
    assert unpack(pack({}, [])) == ({}, [])
    with pytest.raises(TypeError):
        pack({}, [np.array([object()])])


def test_plan_round_trip(v2_model, images):
    _, processor = v2_model
    text = processor("Hello there")
    pictures = processor([{"role": "user", "content": "<image> and <image>?"}], [images["wide"], images["tall"]])
    params = SamplingParams(
        max_tokens=9,
        temperature=0.7,
        top_k=5,
        stop=("\n", "END"),
        top_logprobs=2,
        seed=42,
        logit_bias=((3, 1.5), (7, -100.0)),
        grammar=json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}}),
    )
    requests = [Request(text, SamplingParams(), cache_key(text)), Request(pictures, params, cache_key(pictures))]
    plan = Plan(requests, cancelled=[3, 7])
    got = decode_plan(encode_plan(plan))
    assert (got.cancelled, got.close) == ([3, 7], False)
    assert len(got.admitted) == 2
    for sent, received in zip(plan.admitted, got.admitted):
        assert received.key == sent.key
        assert received.params == sent.params
        assert received.inputs.input_ids.dtype == mx.int32
        assert received.inputs.input_ids.tolist() == sent.inputs.input_ids.tolist()
        assert received.inputs.image_tokens == sent.inputs.image_tokens
        assert len(received.inputs.pixel_values) == len(sent.inputs.images)
        for a, b in zip(sent.inputs.pixel_values, received.inputs.pixel_values):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(got.admitted[1].key[-10], str)  # an image token's place in the key: its image's digest
    assert decode_plan(encode_plan(Plan())) == Plan()
    assert decode_plan(encode_plan(Plan(close=True))) == Plan(close=True)


# --- Two processes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(checkpoints):
    """EVEv2 with 2 key/value heads, so that its heads split in two (test_distributed.py's)."""
    return checkpoints("v2-kv2", "v2", preprocessor=tiny_checkpoints.v2_preprocessor(224), num_key_value_heads=2)


SAMPLED = dict(max_tokens=8, temperature=1.5, top_logprobs=0)


def worker(out: Path, model_path: str) -> None:
    group = mx.distributed.init()
    model, processor = load(model_path, group=group)
    processor.tokenizer.eos_token_ids = set()  # every answer is max_tokens long
    engine = Engine(model, processor, group=group)
    if group.rank() > 0:
        engine.join()  # until rank 0 closes
        return
    events = list(engine.submit("Describe the picture in detail.", params=SamplingParams(**SAMPLED)))
    engine.close()
    answer = {"tokens": [e.token for e in events], "logprobs": [e.logprob for e in events]}
    (out / "0.json").write_text(json.dumps(answer))


def test_ranks_sample_alike_without_a_seed(model_path, tmp_path):
    """Each rank feeds the model the tokens it sampled: had they sampled apart, the sums over the ranks would mix
    two answers, and rank 0's log-probabilities would not be the whole model's for its tokens."""
    if not LAUNCHER.exists():
        pytest.skip("mlx.launch is not installed")
    result = subprocess.run(
        command(2, __file__, str(tmp_path), str(model_path)), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads((tmp_path / "0.json").read_text())
    model, processor = load(str(model_path))
    prompt = processor("Describe the picture in detail.").input_ids.tolist()
    assert len(answer["tokens"]) == SAMPLED["max_tokens"]
    logits = model(mx.array(prompt + answer["tokens"][:-1])[None])[0, len(prompt) - 1 :].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    expected = [logprobs[i, token].item() for i, token in enumerate(answer["tokens"])]
    np.testing.assert_allclose(answer["logprobs"], expected, atol=1e-4)


# --- The server on two processes, against the same engine in one (one server for these tests: the last stops it)


@pytest.fixture(scope="module")
def alone(model_path):
    """A request body's answer (text, log-probabilities, finish reason, usage) from the same engine in this
    process, with the whole model: what the server on two processes must answer."""
    model, processor = load(str(model_path))
    engine = Engine(model, processor)

    def answer(body: dict):
        chat = parse_chat_request(body, model.vocab_limit or model.args.vocab_size)
        images = [read_image(url, ServerSettings(model_id="alone")) for url in chat.image_urls]
        events = list(engine.submit(chat.messages, images, chat.params))
        last = events[-1]
        if last.finish_reason == "stop" and last.token in processor.tokenizer.eos_token_ids:
            events = events[:-1]  # the end-of-answer token is no text, and has no log-probability in the API
        usage = (last.usage.prompt_tokens, last.usage.image_tokens, last.usage.completion_tokens)
        return "".join(e.text for e in events), [e.logprob for e in events], last.finish_reason, usage

    yield answer
    engine.close()


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    if not LAUNCHER.exists():
        pytest.skip("mlx.launch is not installed")
    server = start_server(model_path, tmp_path_factory.mktemp("server") / "server.log", processes=2)
    yield server
    if server.process.poll() is None:  # the last test stops it
        stop_server(server)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def output(server) -> str:
    """What the processes wrote, for failure messages."""
    return f"\n--- the server's output ---\n{server.log.read_text()[-6000:]}"


def image_question(path: Path, question: str) -> dict:
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()},
    }
    return {"role": "user", "content": [image, {"type": "text", "text": question}]}


def ask(client, body: dict):
    """The server's answer to ``body``, in the shape of ``alone``'s."""
    response = client.chat.completions.create(**{"model": MODEL, **body}, logprobs=True)
    choice, usage = response.choices[0], response.usage
    logprobs = [t.logprob for t in choice.logprobs.content]
    counts = (usage.prompt_tokens, usage.prompt_tokens_details.image_tokens, usage.completion_tokens)
    return choice.message.content, logprobs, choice.finish_reason, counts


def assert_same_answer(two, one, server):
    (text, logprobs, finish, usage), (text_one, logprobs_one, finish_one, usage_one) = two, one
    assert (text, finish, usage) == (text_one, finish_one, usage_one), output(server)
    np.testing.assert_allclose(logprobs, logprobs_one, atol=1e-4, err_msg=output(server))


def test_answers_as_one_process_about_text_and_an_image(server, client, alone, images):
    for messages in (
        [{"role": "user", "content": "How many shapes are there?"}],
        [image_question(images["wide"], "What is in the image?")],
    ):
        body = {"messages": messages, "max_tokens": 10}
        assert_same_answer(ask(client, body), alone({**body, "logprobs": True}), server)
    log = server.log.read_text()
    assert log.count("Serving ") == 1 and log.count("Loading ") == 1, output(server)  # rank 0 alone speaks
    assert "on 2 processes" in log, output(server)


def test_a_seeded_sampled_answer_is_the_one_process_answer(server, client, alone, images):
    body = {
        "messages": [image_question(images["tall"], "Describe the image.")],
        "max_tokens": 12,
        "temperature": 1.5,
        "seed": 7,
    }
    assert_same_answer(ask(client, body), alone({**body, "logprobs": True}), server)


def test_concurrent_streams_get_the_answers_they_get_alone(server, client, alone, images):
    bodies = [
        {"messages": [image_question(images["strip"], "List every object.")], "max_tokens": 24},
        {"messages": [{"role": "user", "content": "Hello, world!"}], "max_tokens": 16},
        {"messages": [image_question(images["square"], "Where is the blue square?")], "max_tokens": 20},
    ]
    start = threading.Barrier(len(bodies))

    def stream(body):
        start.wait()
        chunks = client.chat.completions.create(model=MODEL, **body, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(stream, bodies))
    assert together == [alone(body)[0] for body in bodies], output(server)
    assert len(set(together)) == len(bodies)


def test_a_cancelled_stream_leaves_every_rank_in_step(server, client, alone):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": LONG, "stream": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body))
    response = connection.getresponse()
    lines = []
    while len(lines) < 3:  # the role chunk, then two pieces of the answer
        line = response.readline()
        assert line, output(server)
        if line.startswith(b"data: "):
            lines.append(json.loads(line[6:]))
    connection.close()
    wait_for_log(server, rf"{lines[0]['id']}: cancelled after \d+ tokens: the client disconnected")
    # Had the other rank kept the cancelled request in its batch, the two would no longer add up.
    body = {"messages": [{"role": "user", "content": "Where is the blue square?"}], "max_tokens": 12}
    assert_same_answer(ask(client, body), alone({**body, "logprobs": True}), server)


def test_ctrl_c_stops_every_process(server):
    """Last: it stops the module's server, in the middle of an answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": LONG, "stream": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body))
    response = connection.getresponse()
    assert response.readline().startswith(b"data: "), output(server)
    rest = []
    reader = threading.Thread(target=lambda: rest.append(response.read().decode()), daemon=True)
    reader.start()
    started = time.monotonic()
    stop_server(server)  # SIGINT to mlx.launch and both ranks, as Ctrl-C in a terminal
    assert time.monotonic() - started < 20, output(server)
    reader.join(timeout=30)
    connection.close()
    assert "The server is shutting down." in rest[0] and "[DONE]" not in rest[0], output(server)
    with pytest.raises(ProcessLookupError):  # no process of the group is left
        os.killpg(server.process.pid, 0)
    # mlx.launch names each rank that did not exit with 0 (it stops passing on their output at Ctrl-C): rank 0
    # exits as Ctrl-C makes it, rank 1 with 0 once rank 0's engine has told it to stop.
    log = server.log.read_text()
    assert "Node with rank 0 exited with code 130" in log, output(server)
    assert "Node with rank 1" not in log, output(server)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
