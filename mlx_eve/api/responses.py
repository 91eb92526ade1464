"""OpenAI's Responses API, ``POST /v1/responses``: the request checked field by field, the answer as a whole
``response`` object or streamed as its numbered events (``response.created`` ... ``response.completed``).

The server keeps no responses: each request carries its whole conversation in ``input``, so what needs a stored
one (``previous_response_id``, ``conversation``, ``background``) is refused with the other unknown fields."""

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi.responses import JSONResponse, Response

from ..engine import Event, Stream
from ..errors import shorten
from ..request import SamplingParams
from .chat_completions import PartTypes, content_parts
from .errors import APIError
from .fields import BOOKKEEPING_FIELDS, SAMPLING_FIELDS, format_grammar, option, refuse_unknown, sampling_params
from .serving import Receive, Served, event_stream, log_usage, server_sent

# Fields a request may carry beside the sampling ones (``fields.SAMPLING_FIELDS``); any other is refused.
RESPONSES_FIELDS = (
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "text",
    "stream",
    "truncation",
)
# What this API calls the fields the engine's errors name as chat completions does.
NAMES = {"messages": "input", "response_format": "text.format"}
INPUT_PARTS = PartTypes(text=("input_text", "output_text"), image="input_image")


@dataclass
class ResponsesRequest:
    """A checked ``/v1/responses`` body."""

    model: Optional[str]
    messages: List[Dict[str, str]]  # for the engine: ``instructions`` first, as its system message
    image_urls: List[str]  # in the order of the <image> placeholders
    params: SamplingParams
    stream: bool
    echoed: Dict[str, Any]  # the settings a response object repeats


def parse_responses_request(body: Dict[str, Any], vocab_size: int) -> ResponsesRequest:
    """Check a request body (``APIError`` 400 naming the faulty field, or a field the server does not know).
    ``vocab_size``: the model's, for ``logit_bias``."""
    refuse_unknown(body, RESPONSES_FIELDS + SAMPLING_FIELDS + BOOKKEEPING_FIELDS)
    image_urls: List[str] = []
    messages = _input_messages(body.get("input"), image_urls)
    instructions = option(body, "instructions", str, "a string (the system prompt)")
    if instructions is not None:
        if messages[0]["role"] == "system":
            message = "Give the system prompt once: as 'instructions' or as the first message of 'input'."
            raise APIError(400, message, "instructions")
        messages.insert(0, {"role": "system", "content": instructions})
    option(body, "truncation", str, "'disabled' (a prompt too long is an error)", lambda v: v == "disabled")
    text = option(body, "text", dict, "an object with 'format'", default={})
    refuse_unknown(text, ("format",), "text.")
    text_format = text.get("format")
    max_output_tokens = option(body, "max_output_tokens", int, "an integer >= 1", lambda v: v >= 1)
    params = sampling_params(
        body,
        vocab_size,
        max_tokens=max_output_tokens,
        grammar=format_grammar(_response_format(text_format), "text.format"),
    )
    echoed = {
        "instructions": instructions,
        "max_output_tokens": max_output_tokens,
        "metadata": option(body, "metadata", dict, "an object", default={}),
        "temperature": params.temperature,
        "top_p": params.top_p,
        "text": {"format": text_format or {"type": "text"}},
    }
    return ResponsesRequest(
        model=option(body, "model", str, "a model name"),
        messages=messages,
        image_urls=image_urls,
        params=params,
        stream=option(body, "stream", bool, "true or false", default=False),
        echoed=echoed,
    )


def _input_messages(items: Any, image_urls: List[str]) -> List[Dict[str, str]]:
    """``input``, a question or a list of messages, as ``{"role", "content"}`` messages with text content."""
    if isinstance(items, str):
        return [{"role": "user", "content": [{"type": "text", "text": items}]}]
    if not isinstance(items, list) or not items:
        raise APIError(400, "'input' must be a string or a non-empty list of messages.", "input")
    return [_input_message(item, f"input[{i}]", image_urls) for i, item in enumerate(items)]


def _input_message(item: Any, where: str, image_urls: List[str]) -> Dict[str, str]:
    if not isinstance(item, dict):
        raise APIError(400, f"{where} must be a message: an object with 'role' and 'content'.", where)
    if item.get("type", "message") != "message":
        message = f"{where} has the type {shorten(json.dumps(item['type']))}: this server takes messages only."
        raise APIError(400, message, f"{where}.type")
    role = item.get("role")
    if role not in ("system", "developer", "user", "assistant"):
        message = f"{where} has the role {shorten(json.dumps(role))}: use system, developer, user or assistant."
        raise APIError(400, message, f"{where}.role")
    content = content_parts(item.get("content"), f"{where}.content", image_urls, INPUT_PARTS)
    return {"role": "system" if role == "developer" else role, "content": content}


def _response_format(text_format: Any) -> Any:
    """``text.format`` in the shape of chat's ``response_format``, whose JSON Schema is nested in ``json_schema``."""
    if not (isinstance(text_format, dict) and text_format.get("type") == "json_schema"):
        return text_format
    if "schema" not in text_format:
        raise APIError(400, "Invalid 'text.format': a json_schema format needs 'schema': {...}.", "text.format")
    return {"type": "json_schema", "json_schema": {k: v for k, v in text_format.items() if k != "type"}}


class Reply:
    """The ``response`` object of one answer, and the events that stream it, numbered in order."""

    def __init__(self, model_id: str, echoed: Dict[str, Any]):
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model_id, self.echoed = model_id, echoed
        self.sequence_number = 0
        self.text_at = {"item_id": self.message_id, "output_index": 0, "content_index": 0}  # where the answer goes

    def response(self, text: Optional[str] = None, last: Optional[Event] = None) -> Dict[str, Any]:
        """The response in progress, or with ``text`` and ``last``, the last event of the answer, complete."""
        status, incomplete, output, usage = "in_progress", None, [], None
        if last is not None:
            status = _status(last)
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
            output, usage = [self.message(status, text)], _usage_json(last)
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.model_id,
            "output": output,
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "truncation": "disabled",
            "usage": usage,
            **self.echoed,
        }

    def message(self, status: str, text: Optional[str]) -> Dict[str, Any]:
        """The answer's output item, with its text part once there is one."""
        content = [] if text is None else [_text_part(text)]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def event(self, kind: str, **fields: Any) -> str:
        """An event of the stream as a server-sent event named after its type."""
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\n{server_sent(event)}"

    def error(self, error: APIError) -> str:
        return self.event("error", code=error.code or error.kind, message=error.message, param=error.param)


def _status(last: Event) -> str:
    return "incomplete" if last.finish_reason == "length" else "completed"


def _text_part(text: str) -> Dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _usage_json(last: Event) -> Dict[str, Any]:
    usage = last.usage
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


async def responses(served: Served, body: Dict[str, Any], receive: Receive) -> Response:
    """The answer to a Responses API request ``body``: a response object, or its events with ``"stream": true``."""
    request = parse_responses_request(body, served.vocab_size)
    served.check_model(request.model)
    stream = await served.submit(request.messages, request.image_urls, request.params, NAMES)
    reply = Reply(served.settings.model_id, request.echoed)
    if request.stream:
        return event_stream(events(served, reply, stream, receive), reply.id, reply.error)
    text, last = await served.whole(stream, receive, reply.id)
    return JSONResponse(reply.response(text, last))


async def events(served: Served, reply: Reply, stream: Stream, receive: Receive) -> AsyncIterator[str]:
    yield reply.event("response.created", response=reply.response())
    yield reply.event("response.in_progress", response=reply.response())
    yield reply.event("response.output_item.added", output_index=0, item=reply.message("in_progress", None))
    yield reply.event("response.content_part.added", **reply.text_at, part=_text_part(""))
    text, last = "", None
    async for last in served.events(stream, receive, reply.id):
        if last.text:
            text += last.text
            yield reply.event("response.output_text.delta", **reply.text_at, delta=last.text, logprobs=[])
    log_usage(reply.id, last)
    yield reply.event("response.output_text.done", **reply.text_at, text=text, logprobs=[])
    yield reply.event("response.content_part.done", **reply.text_at, part=_text_part(text))
    yield reply.event("response.output_item.done", output_index=0, item=reply.message(_status(last), text))
    yield reply.event(f"response.{_status(last)}", response=reply.response(text, last))
