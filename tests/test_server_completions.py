"""OpenAI's legacy completions on the server, ``POST /v1/completions``, asked with the ``openai`` client: the prompt
continued as it is (no conversation template), whole or streamed, and the request's checks."""

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
PROMPT = "The blue square is"
SERVER_OPTIONS = ("--api-key", KEY)


@pytest.mark.parametrize("prompt", [PROMPT, [PROMPT]], ids=["string", "list"])
def test_prompt_is_continued_as_it_is(client, model_id, v2_model, prompt):
    from mlx_eve import generate
    from mlx_eve.prompts import RawPrompt

    completion = client.completions.create(model=model_id, prompt=prompt, max_tokens=8)
    assert completion.id.startswith("cmpl-") and (completion.object, completion.model) == ("text_completion", model_id)
    (choice,) = completion.choices
    model, processor = v2_model
    assert choice.text == generate(model, processor, RawPrompt(PROMPT), max_tokens=8)
    assert (choice.index, choice.logprobs, choice.finish_reason) == (0, None, "length")
    # The prompt's own tokens, no template around them.
    assert completion.usage.prompt_tokens == len(processor.encode(PROMPT))
    assert (completion.usage.completion_tokens, completion.usage.total_tokens) == (8, len(processor.encode(PROMPT)) + 8)


def test_streamed_completion_is_the_whole_one_in_chunks(server, client, model_id):
    request = dict(model=model_id, prompt=PROMPT, max_tokens=8)
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "text_completion" and chunk.id == chunks[0].id for chunk in chunks)
    *answer, last = chunks
    assert "".join(chunk.choices[0].text for chunk in answer) == whole.choices[0].text
    assert [chunk.choices[0].finish_reason for chunk in answer] == [None] * (len(answer) - 1) + ["length"]
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        8,
    )
    response = httpx.post(
        f"{server.url}/v1/completions", json={**request, "stream": True}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.text.endswith("\n\ndata: [DONE]\n\n")


def test_stop_strings(client, model_id):
    answer = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12).choices[0].text
    stop = answer[4:7]
    stopped = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, stop=["zzz", stop]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (answer[: answer.index(stop)], "stop")


@pytest.mark.parametrize(
    "change, param",
    [
        ({"prompt": [1, 2, 3]}, "prompt"),  # token ids
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "<image> is"}, "prompt"),
        ({"echo": True}, "echo"),
        ({"logprobs": 2}, "logprobs"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"stop": [1]}, "stop"),
        ({"stream_options": {"include_usage": "yes"}}, "include_usage"),
        # A field the server does not implement would change the answer if it were honoured: never ignored.
        ({"suffix": "."}, "suffix"),
        ({"best_of": 2}, "best_of"),
    ],
)
def test_invalid_request_is_a_400_naming_the_field(client, model_id, change, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=2, user="harmless", extra_body=change)
    assert error.value.body["param"] == param and error.value.body["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_a_400(client, model_id, v2_model):
    _, processor = v2_model
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_id, prompt="word " * processor.context_length, max_tokens=2)
    assert (error.value.body["param"], error.value.body["code"]) == ("prompt", "context_length_exceeded")
