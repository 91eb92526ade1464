"""Memory-safe admission: what a request may hold is estimated before it joins the batch (its KV cache checked
against the model's shapes by hand), requests wait until theirs fits beside the others, and one that never can is
refused, in the engine and as the server's 413."""

import math

import pytest

from mlx_eve.engine import Engine, RequestTooLargeError
from mlx_eve.memory import KV_STEP, MemoryBudget, model_bytes
from mlx_eve.request import SamplingParams


def text(stream) -> str:
    return "".join(event.text for event in stream)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_the_kv_estimate_is_what_the_cache_holds(family, v1_model, v2_model):
    model, processor = v1_model if family == "v1" else v2_model
    args = model.args
    # By hand: keys and values, of every layer and key/value head, float32 (the tiny checkpoints' dtype).
    per_token = (
        2 * args.num_hidden_layers * args.num_key_value_heads * (args.hidden_size // args.num_attention_heads) * 4
    )
    engine = Engine(model, processor)
    try:
        last = list(engine.submit("Describe the picture in detail.", params=SamplingParams(max_tokens=20)))[-1]
        held = engine.prompt_cache.nbytes  # the finished request's KV cache, now the prompt cache's only entry
    finally:
        engine.close()
    tokens = last.usage.prompt_tokens + last.usage.completion_tokens
    # The cache as the finished request leaves it holds its tokens (the last generated one is never fed).
    assert held % per_token == 0 and tokens - 1 <= held // per_token <= tokens
    budget = MemoryBudget.of(model, 2**34, 0, 2048)
    assert budget.kv_per_token == per_token
    # While it runs, the batch's cache grows KV_STEP tokens at a time: the estimate counts that much.
    assert budget.request_bytes(last.usage.prompt_tokens, 20, 0) >= math.ceil(tokens / KV_STEP) * KV_STEP * per_token


def concurrency(engine):
    """Records, each round, how many requests the batch holds once the round's ones have joined."""
    seen, decide = [], engine._decide

    def recording(running):
        plan = decide(running)
        seen.append(len(running) + len(plan.admitted))
        return plan

    engine._decide = recording
    return seen


def test_requests_wait_for_memory_and_one_that_never_fits_is_refused(v2_model):
    model, processor = v2_model
    params = SamplingParams(max_tokens=40)
    inputs = processor("Describe the picture in detail.")
    need = MemoryBudget.of(model, 2**34, 0, 2048).request_bytes(inputs.input_ids.size, 40, 0)
    roomy = Engine(model, processor, prompt_cache_bytes=0, max_memory=model_bytes(model) + 10 * need)
    tight = Engine(model, processor, prompt_cache_bytes=0, max_memory=model_bytes(model) + need + need // 2)
    try:
        alone = text(roomy.submit("Describe the picture in detail.", params=params))
        for engine, most in ((roomy, 3), (tight, 1)):
            seen = concurrency(engine)
            streams = [engine.submit("Describe the picture in detail.", params=params) for _ in range(3)]
            assert [text(s) for s in streams] == [alone] * 3
            assert max(seen) == most  # the tight engine ran them one after the other, none refused
        with pytest.raises(RequestTooLargeError, match=r"needs up to .* of memory .* more than the"):
            tight.submit("Describe the picture in detail.", params=SamplingParams(max_tokens=5000))
        assert text(tight.submit("Hi", params=SamplingParams(max_tokens=3)))
    finally:
        roomy.close()
        tight.close()


def test_a_limit_below_the_model_is_refused(v2_model):
    from mlx_eve.errors import EVEError

    with pytest.raises(EVEError, match="leaves nothing for requests"):
        Engine(*v2_model, max_memory=2**20)


def test_the_server_answers_413_for_a_request_that_can_never_fit(v2_model, v2_path, tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from processes import start_server, stop_server

    model, processor = v2_model
    need = MemoryBudget.of(model, 2**34, 0, 2048).request_bytes(processor("Hi").input_ids.size + 8, 16, 0)
    limit = model_bytes(model) + 2 * need
    server = start_server(v2_path, tmp_path / "server.log", "--max-memory", str(limit), "--prompt-cache-bytes", "0")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Hi"}]
        assert client.chat.completions.create(model=v2_path.name, messages=messages, max_tokens=16).usage
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model=v2_path.name, messages=messages, max_tokens=1500)
        assert refused.value.status_code == 413 and "of memory" in refused.value.body["message"]
    finally:
        stop_server(server)
    assert "Traceback" not in server.log.read_text()
