"""Anthropic's Messages API, ``POST /v1/messages``: the request checked field by field, the answer whole (a
``message``) or streamed as Anthropic's named server-sent events, and every error in Anthropic's shape."""

import json
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi.responses import JSONResponse, Response

from ..engine import Event, Stream, Usage
from ..errors import shorten
from ..request import SamplingParams
from .chat_completions import content_parts
from .errors import APIError
from .fields import option, refuse_unknown, sampling_params, stop_list
from .serving import Receive, Served, event_stream, log_usage, server_sent
from .tool_calls import merge_turns

PATH = "/v1/messages"  # the app answers every failure under it in Anthropic's shape (``error_body``)

# The fields of a request; any other (``tools``, ``thinking``, ...) is refused.
MESSAGES_FIELDS = (
    "model",
    "max_tokens",
    "messages",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "metadata",  # bookkeeping that does not change the answer
)
# Anthropic's error type for each HTTP status; other statuses are "invalid_request_error" below 500, else "api_error".
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# What a message starts with: the engine counts the tokens when the answer ends (``message_delta`` has them).
NO_USAGE = Usage(0, 0, 0, 0, 0.0, 0.0)


@dataclass
class MessagesRequest:
    """A checked ``/v1/messages`` body."""

    model: Optional[str]
    messages: List[Dict[str, str]]  # for the engine: ``system`` first, each image block an <image> in its text
    image_urls: List[str]  # in the order of the <image> placeholders
    params: SamplingParams
    stream: bool


def parse_messages_request(body: Dict[str, Any], vocab_size: int) -> MessagesRequest:
    """Check a request body (``APIError`` 400 naming the faulty field, or a field the server does not know).
    ``vocab_size``: the model's, for the sampling settings."""
    refuse_unknown(body, MESSAGES_FIELDS)
    max_tokens = option(body, "max_tokens", int, "an integer >= 1", lambda v: v >= 1)
    if max_tokens is None:
        raise APIError(400, "'max_tokens' is required: the most tokens the answer may have.", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages.", "messages")
    image_urls: List[str] = []
    converted = merge_turns([_message(message, f"messages[{i}]", image_urls) for i, message in enumerate(messages)])
    if body.get("system") is not None:
        converted.insert(0, {"role": "system", "content": _content(body["system"], "system", [], images=False)})
    return MessagesRequest(
        model=option(body, "model", str, "a model name"),
        messages=converted,
        image_urls=image_urls,
        params=sampling_params(body, vocab_size, max_tokens=max_tokens, stop=stop_list(body, "stop_sequences")),
        stream=option(body, "stream", bool, "true or false", default=False),
    )


def _message(message: Any, where: str, image_urls: List[str]) -> Dict[str, str]:
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content'.", where)
    role = message.get("role")
    if role not in ("user", "assistant"):
        says = f"{where} has the role {shorten(json.dumps(role))}: use user or assistant ('system' is a field)."
        raise APIError(400, says, f"{where}.role")
    return {"role": role, "content": _content(message.get("content"), f"{where}.content", image_urls)}


def _content(content: Any, where: str, image_urls: List[str], images: bool = True) -> List[Dict[str, str]]:
    """Content, a string or a list of blocks, as EVE's content parts (``content_parts``, each block read as chat's
    part)."""
    if isinstance(content, list):
        content = [_chat_part(block, f"{where}[{j}]", images) for j, block in enumerate(content)]
    return content_parts(content, where, image_urls)


def _chat_part(block: Any, where: str, images: bool) -> Dict[str, Any]:
    """A content block as chat's content part: a text block as it is, an image block's source as an image URL."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text" and isinstance(block.get("text"), str):
        return block
    if kind == "image" and images:
        return {"type": "image_url", "image_url": _source_url(block.get("source"), f"{where}.source")}
    wanted = "{'type': 'text', 'text': ...}" + (" or {'type': 'image', 'source': ...}" if images else "")
    raise APIError(400, f"{where} must be {wanted}.", where)


def _source_url(source: Any, where: str) -> str:
    """An image's source as the URL the server reads: base64 data as a ``data:`` URL."""
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("media_type"), str) and isinstance(source.get("data"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return source["url"]
    wanted = "{'type': 'base64', 'media_type': ..., 'data': ...} or {'type': 'url', 'url': ...}"
    raise APIError(400, f"{where} must be {wanted}.", where)


def error_body(error: APIError) -> Dict[str, Any]:
    """``error`` in Anthropic's shape, which has no ``param``: its message starts with the field it names, as
    Anthropic's do, unless it names it already."""
    kind = ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    message = error.message
    if error.param is not None and error.param not in message:
        message = f"{error.param}: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def usage_json(usage: Usage) -> Dict[str, int]:
    """Anthropic's usage: ``input_tokens`` are the prompt tokens not read from the prompt cache, which is written
    without cost (no ``cache_creation_input_tokens``)."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


class Reply:
    """The ``message`` of one answer, as it starts and once complete."""

    def __init__(self, model_id: str):
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model_id = model_id

    def message(self, text: Optional[str] = None, last: Optional[Event] = None) -> Dict[str, Any]:
        """The message as it starts (no content or usage yet), or with ``text`` and ``last``, the answer's last
        event, complete."""
        ending = {"stop_reason": None, "stop_sequence": None} if last is None else _ending(last)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model_id,
            "content": [] if text is None else [_text_block(text)],
            **ending,
            "usage": usage_json(NO_USAGE if last is None else last.usage),
        }


def _ending(last: Event) -> Dict[str, Optional[str]]:
    """``stop_reason`` and ``stop_sequence`` of the answer that ``last`` ended."""
    if last.finish_reason == "length":
        return {"stop_reason": "max_tokens", "stop_sequence": None}
    return {"stop_reason": "end_turn" if last.stop is None else "stop_sequence", "stop_sequence": last.stop}


def _text_block(text: str) -> Dict[str, str]:
    return {"type": "text", "text": text}


def _event(data: Dict[str, Any]) -> str:
    """A server-sent event named after its data's type, as Anthropic's stream has them."""
    return f"event: {data['type']}\n{server_sent(data)}"


async def messages(served: Served, body: Dict[str, Any], receive: Receive) -> Response:
    """The answer to a Messages API request ``body``: a message, or its events with ``"stream": true``."""
    request = parse_messages_request(body, served.vocab_size)
    served.check_model(request.model)
    stream = await served.submit(request.messages, request.image_urls, request.params)
    reply = Reply(served.settings.model_id)
    if request.stream:
        pieces = events(served, reply, stream, receive)
        return event_stream(pieces, reply.id, lambda error: _event(error_body(error)))
    text, last = await served.whole(stream, receive, reply.id)
    return JSONResponse(reply.message(text, last))


async def events(served: Served, reply: Reply, stream: Stream, receive: Receive) -> AsyncIterator[str]:
    yield _event({"type": "message_start", "message": reply.message()})
    yield _event({"type": "content_block_start", "index": 0, "content_block": _text_block("")})
    yield _event({"type": "ping"})
    last = None
    async for last in served.events(stream, receive, reply.id):
        if last.text:
            delta = {"type": "text_delta", "text": last.text}
            yield _event({"type": "content_block_delta", "index": 0, "delta": delta})
    log_usage(reply.id, last)
    yield _event({"type": "content_block_stop", "index": 0})
    yield _event({"type": "message_delta", "delta": _ending(last), "usage": usage_json(last.usage)})
    yield _event({"type": "message_stop"})
