"""The server's ``/metrics`` (read with prometheus_client's parser) and its model card (``/v1/models``), asked of a
server run as a user runs it, with a key and LoRA adapters; the card of a quantized model, and two apps in one
process, in process."""

import base64
import http.client
import json
import time
from pathlib import Path

import pytest
from processes import http_request, start_server, stop_server, wait_for_log
from zero_adapters import write_zero_adapters

from mlx_eve import load

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")

KEY = "metrics-key"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def adapters(v2_path, tmp_path_factory) -> Path:
    return write_zero_adapters(v2_path, tmp_path_factory.mktemp("adapters") / "zero-lora", num_layers=1)


@pytest.fixture(scope="module")
def server(v2_path, adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = start_server(v2_path, log, "--api-key", KEY, "--adapter-path", str(adapters))
    yield server
    stop_server(server)


def metrics_text(server, key=KEY):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        connection.close()


def parse(text: str) -> dict:
    """Every sample: (name, labels) → value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parser.text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(server) -> dict:
    status, content_type, text = metrics_text(server)
    assert status == 200 and content_type.startswith("text/plain")
    return parse(text)


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def growth(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_metrics_count_the_requests_and_the_usage_the_answers_reported(server, client, model_id, images):
    before = scrape(server)
    ask = dict(model=model_id, max_tokens=4)
    new_system_prompt = [{"role": "system", "content": "You count shapes."}, {"role": "user", "content": "How many?"}]
    usages = [client.chat.completions.create(messages=new_system_prompt, **ask).usage]
    chunks = list(
        client.chat.completions.create(
            messages=[{"role": "user", "content": "Describe them."}],
            stream=True,
            stream_options={"include_usage": True},
            **ask,
        )
    )
    usages.append(chunks[-1].usage)
    image = {"type": "image_url", "image_url": {"url": data_uri(images["wide"])}}
    about_an_image = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]
    for _ in range(2):  # the second time, the prompt comes from the prompt cache
        usages.append(client.chat.completions.create(messages=about_an_image, **ask).usage)
    details = [u.prompt_tokens_details for u in usages]
    assert details[0].cached_tokens == 0  # nothing to reuse, unlike the prompts that begin as the warm-up's
    assert details[2].image_tokens > 0 and details[3].cached_tokens >= usages[2].prompt_tokens - 1
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], model=model_id, max_tokens=0)
    after = scrape(server)

    requests = "mlx_eve_http_requests_total"
    assert growth(before, after, requests, endpoint=CHAT, status="200") == 4
    assert growth(before, after, requests, endpoint=CHAT, status="400") == 1
    assert growth(before, after, requests, endpoint="/metrics", status="200") == 1  # the first scrape
    assert growth(before, after, "mlx_eve_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert growth(before, after, "mlx_eve_image_tokens_total") == sum(d.image_tokens for d in details)
    assert growth(before, after, "mlx_eve_cached_prompt_tokens_total") == sum(d.cached_tokens for d in details)
    assert growth(before, after, "mlx_eve_generated_tokens_total") == sum(u.completion_tokens for u in usages)
    assert growth(before, after, "mlx_eve_prompt_cache_hits_total") == sum(d.cached_tokens > 0 for d in details)
    first_token = "mlx_eve_time_to_first_token_seconds"
    assert growth(before, after, f"{first_token}_count") == len(usages)
    assert growth(before, after, f"{first_token}_bucket", le="+Inf") == len(usages)
    assert growth(before, after, f"{first_token}_sum") > 0
    between_tokens = "mlx_eve_inter_token_latency_seconds_count"
    assert growth(before, after, between_tokens) == sum(u.completion_tokens - 1 for u in usages)
    assert value(after, "mlx_eve_prompt_cache_bytes") > 0


def test_a_request_in_the_batch_and_its_cancellation_are_seen(server, model_id):
    before = scrape(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20000, "stream": True}
    connection.request("POST", CHAT, json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    lines = []
    while len(lines) < 3:  # the role chunk, then two pieces of the answer
        line = response.readline()
        if line.startswith(b"data: "):
            lines.append(json.loads(line[6:]))
    during = scrape(server)
    assert (value(during, "mlx_eve_running_requests"), value(during, "mlx_eve_queued_requests")) == (1, 0)
    connection.close()
    wait_for_log(server, rf"{lines[0]['id']}: cancelled after \d+ tokens: the client disconnected")
    deadline = time.monotonic() + 10
    while True:  # the request is counted once its response has ended, the batch is counted after each round
        after = scrape(server)
        counted = growth(before, after, "mlx_eve_http_requests_total", endpoint=CHAT, status="200")
        if (counted, value(after, "mlx_eve_running_requests")) == (1, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (counted, value(after, "mlx_eve_running_requests")) == (1, 0)
    assert growth(before, after, "mlx_eve_requests_cancelled_total", reason="client_gone") == 1
    # A cancelled answer reports no usage: its tokens are not counted.
    assert growth(before, after, "mlx_eve_generated_tokens_total") == 0


def test_metrics_need_the_key_of_a_server_that_has_one(server):
    assert metrics_text(server, key=None)[0] == 401
    assert metrics_text(server, key="wrong")[0] == 401
    assert http_request(server, "GET", "/health") == (200, {"status": "ok"})


def test_the_model_card_says_what_the_model_is_and_can_do(server, client, model_id, v2_path, adapters):
    assert [model.id for model in client.models.list().data] == [model_id]
    card = client.models.retrieve(model_id).to_dict()
    status, listed = http_request(server, "GET", "/v1/models", key=KEY)
    assert status == 200 and [{**m, "created": card["created"]} for m in listed["data"]] == [card]
    config = json.loads((v2_path / "config.json").read_text())
    preprocessor = json.loads((v2_path / "preprocessor_config.json").read_text())
    assert card["object"] == "model" and card["owned_by"] == "mlx-eve" and card["created"] <= time.time()
    assert (card["family"], card["model_type"]) == ("EVEv2", config["model_type"])
    assert card["context_length"] == config["max_position_embeddings"]
    assert card["vision"] is True and card["image_resolution"] == preprocessor["max_size"]
    assert "quantization" not in config and card["quantization"] is None
    assert card["adapters"] == [str(adapters)]
    assert {"chat_completions", "streaming", "logprobs", "structured_outputs"} <= set(card["capabilities"])
    # Every endpoint the card names is there: an empty body is refused as a bad request, not as a path unknown.
    from mlx_eve.api.app import FEATURES

    endpoints = [c for c in card["capabilities"] if c not in FEATURES]
    for endpoint in endpoints:
        status, answer = http_request(server, "POST", f"/v1/{endpoint.replace('_', '/')}", {}, key=KEY)
        assert status == 400, (endpoint, answer)
    assert http_request(server, "POST", "/v1/nothing", {}, key=KEY)[0] == 404


# --- In process: a quantized model, and two apps over one engine ----------------------------------------------


def test_a_quantized_model_card_and_apps_that_keep_their_own_counts(v2_path, tmp_path):
    from starlette.testclient import TestClient

    from mlx_eve.api.app import create_app
    from mlx_eve.api.serving import ServerSettings
    from mlx_eve.conversion import convert
    from mlx_eve.engine import Engine

    quantized = convert(str(v2_path), tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    stored = json.loads((quantized / "config.json").read_text())["quantization"]
    model, processor = load(str(quantized))
    engine = Engine(model, processor, prompt_cache_bytes=0)
    try:
        with (
            TestClient(create_app(engine, processor, ServerSettings(model_id="q8"))) as first,
            TestClient(create_app(engine, processor, ServerSettings(model_id="q8"))) as second,
        ):
            card = first.get("/v1/models").json()["data"][0]
            assert card["quantization"] == {k: stored[k] for k in ("bits", "group_size", "mode")}
            assert card["adapters"] == []
            answer = first.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
            assert answer.status_code == 200
            response = first.get("/metrics")  # open: this server has no key
            assert response.status_code == 200
            counts, others = parse(response.text), parse(second.get("/metrics").text)
    finally:
        engine.close()
    generated = answer.json()["usage"]["completion_tokens"]
    assert value(counts, "mlx_eve_generated_tokens_total") == generated == 3
    assert value(counts, "mlx_eve_http_requests_total", endpoint="/v1/models", status="200") == 1
    assert value(others, "mlx_eve_generated_tokens_total") == 0
    assert value(others, "mlx_eve_http_requests_total", endpoint="/v1/models", status="200") == 0
