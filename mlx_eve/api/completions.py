"""OpenAI's legacy completions, ``POST /v1/completions``: a plain prompt that the model continues as it is, with no
conversation template, answered whole or streamed in chunks (``text_completion`` objects both), with usage."""

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, Optional

from fastapi.responses import JSONResponse, Response

from ..engine import Stream, Usage
from ..errors import shorten
from ..prompts import IMAGE_PLACEHOLDER, RawPrompt
from ..request import SamplingParams
from .chat_completions import usage_json
from .errors import APIError
from .fields import SAMPLING_FIELDS, option, refuse_unknown, sampling_params, stop_list
from .serving import Receive, Served, event_stream, log_usage, server_sent

# Fields a request may carry beside the sampling ones (``fields.SAMPLING_FIELDS``); any other is refused.
COMPLETION_FIELDS = (
    "model",
    "prompt",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "stop",
    "echo",
    "logprobs",
    "user",  # bookkeeping that does not change the answer
)


@dataclass
class CompletionRequest:
    """A checked ``/v1/completions`` body."""

    model: Optional[str]
    prompt: str
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_completion_request(body: Dict[str, Any], vocab_size: int) -> CompletionRequest:
    """Check a request body (``APIError`` 400 naming the faulty field, or a field the server does not know).
    ``vocab_size``: the model's, for ``logit_bias``."""
    refuse_unknown(body, COMPLETION_FIELDS + SAMPLING_FIELDS)
    option(body, "n", int, "1 (one answer per request)", lambda v: v == 1)
    option(body, "echo", bool, "false (the answer does not repeat the prompt)", lambda v: not v)
    if body.get("logprobs") is not None:
        message = "'logprobs' is not supported here: /v1/chat/completions has log-probabilities."
        raise APIError(400, message, "logprobs")
    max_tokens = option(body, "max_tokens", int, "an integer >= 1", lambda v: v >= 1)
    stream_options = option(body, "stream_options", dict, "an object", default={})
    return CompletionRequest(
        model=option(body, "model", str, "a model name"),
        prompt=_prompt(body.get("prompt")),
        params=sampling_params(body, vocab_size, max_tokens=max_tokens, stop=stop_list(body, "stop")),
        stream=option(body, "stream", bool, "true or false", default=False),
        include_usage=option(stream_options, "include_usage", bool, "true or false", default=False),
    )


def _prompt(prompt: Any) -> str:
    """The prompt, a string or a list of one; token ids are refused (the engine takes text)."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        wanted = "a non-empty string (or a list of one)"
        raise APIError(400, f"Invalid 'prompt': expected {wanted}, got {shorten(json.dumps(prompt))}.", "prompt")
    if IMAGE_PLACEHOLDER in prompt:
        message = f"Invalid 'prompt': {IMAGE_PLACEHOLDER} stands for an image, and a completion takes none."
        raise APIError(400, message, "prompt")
    return prompt


class Reply:
    """The ``text_completion`` of one answer, whole or in chunks."""

    def __init__(self, model_id: str):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id = model_id

    def chunk(self, text: str, finish_reason: Optional[str] = None) -> Dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(), "choices": [choice]}

    def completion(self, text: str, finish_reason: str, usage: Usage) -> Dict[str, Any]:
        return {**self.chunk(text, finish_reason), "usage": usage_json(usage)}

    def usage_chunk(self, usage: Usage) -> Dict[str, Any]:
        return {**self._head(), "choices": [], "usage": usage_json(usage)}

    def _head(self) -> Dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id}


async def completions(served: Served, body: Dict[str, Any], receive: Receive) -> Response:
    """The answer to a completions request ``body``: JSON, or an event stream with ``"stream": true``."""
    request = parse_completion_request(body, served.vocab_size)
    served.check_model(request.model)
    stream = await served.submit(RawPrompt(request.prompt), [], request.params, {"messages": "prompt"})
    reply = Reply(served.settings.model_id)
    if request.stream:
        pieces = chunks(served, reply, stream, receive, request.include_usage)
        return event_stream(pieces, reply.id, lambda error: server_sent(error.body()))
    text, last = await served.whole(stream, receive, reply.id)
    return JSONResponse(reply.completion(text, last.finish_reason, last.usage))


async def chunks(
    served: Served, reply: Reply, stream: Stream, receive: Receive, include_usage: bool
) -> AsyncIterator[str]:
    last = None
    async for last in served.events(stream, receive, reply.id):
        if last.text or last.finish_reason is not None:
            yield server_sent(reply.chunk(last.text, last.finish_reason))
    log_usage(reply.id, last)
    if include_usage:
        yield server_sent(reply.usage_chunk(last.usage))
    yield server_sent("[DONE]")
