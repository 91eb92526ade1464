"""OpenAI's chat completions, ``POST /v1/chat/completions``: the request checked field by field, the answer whole
(``chat.completion``) or streamed in chunks (``chat.completion.chunk``), with usage and log-probabilities."""

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, NamedTuple, Optional, Tuple

from fastapi.responses import JSONResponse, Response
from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..engine import Event, Stream, Usage
from ..errors import shorten
from ..request import SamplingParams
from ..tools import parse_tool_calls
from .errors import APIError
from .fields import (
    BOOKKEEPING_FIELDS,
    SAMPLING_FIELDS,
    format_grammar,
    option,
    refuse_unknown,
    sampling_params,
    stop_list,
)
from .serving import Receive, Served, event_stream, log_usage, server_sent
from .tool_calls import (
    TOOL_FIELDS,
    CallDeltas,
    Tools,
    calls_json,
    merge_turns,
    parse_tools,
    tool_turn,
    with_tools_prompt,
)

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass
class ChatRequest:
    """A checked ``/v1/chat/completions`` body."""

    model: Optional[str]
    messages: List[Dict[str, str]]  # for the engine: each image part became an <image> in its message's text
    image_urls: List[str]  # in the order of the <image> placeholders
    params: SamplingParams
    stream: bool
    include_usage: bool
    tools: Optional[Tools]  # the tools the model may call, if any


# Fields a request may carry beside the sampling ones (``fields.SAMPLING_FIELDS``); any other is refused.
CHAT_FIELDS = (
    "model",
    "messages",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "stop",
    "response_format",
)


def parse_chat_request(body: Dict[str, Any], vocab_size: int) -> ChatRequest:
    """Check a request body (``APIError`` 400 naming the faulty field, or a field the server does not know).
    ``vocab_size``: the model's, for ``logit_bias``."""
    refuse_unknown(body, CHAT_FIELDS + TOOL_FIELDS + SAMPLING_FIELDS + BOOKKEEPING_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages.", "messages")
    image_urls: List[str] = []
    converted = merge_turns([_message(message, f"messages[{i}]", image_urls) for i, message in enumerate(messages)])
    tools = parse_tools(body)
    grammar = format_grammar(body.get("response_format"), "response_format")
    if tools is not None:
        if grammar is not None:
            raise APIError(
                400,
                "'response_format' cannot be combined with 'tools' (unless 'tool_choice' is 'none').",
                "response_format",
            )
        grammar = tools.grammar()
    option(body, "n", int, "1 (one answer per request)", lambda v: v == 1)
    max_tokens = option(body, "max_completion_tokens", int, "an integer >= 1", lambda v: v >= 1)
    if max_tokens is None:
        max_tokens = option(body, "max_tokens", int, "an integer >= 1", lambda v: v >= 1)
    logprobs = option(body, "logprobs", bool, "true or false", default=False)
    top_logprobs = option(
        body, "top_logprobs", int, f"an integer from 0 to {MAX_TOP_LOGPROBS}", lambda v: 0 <= v <= MAX_TOP_LOGPROBS
    )
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    params = sampling_params(
        body,
        vocab_size,
        max_tokens=max_tokens,
        stop=stop_list(body, "stop"),
        grammar=grammar,
        top_logprobs=(top_logprobs or 0) if logprobs else None,
    )
    stream_options = option(body, "stream_options", dict, "an object", default={})
    return ChatRequest(
        model=option(body, "model", str, "a model name"),
        messages=converted,
        image_urls=image_urls,
        params=params,
        stream=option(body, "stream", bool, "true or false", default=False),
        include_usage=option(stream_options, "include_usage", bool, "true or false", default=False),
        tools=tools,
    )


def _message(message: Any, where: str, image_urls: List[str]) -> Dict[str, Any]:
    """An OpenAI message → ``{"role", "content"}`` with EVE's content parts (``content_parts``)."""
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content'.", where)
    turn = tool_turn(message, where)
    if turn is not None:
        return turn
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant"):
        raise APIError(
            400,
            f"{where} has the role {shorten(json.dumps(role))}: use system, user, assistant or tool.",
            f"{where}.role",
        )
    content = content_parts(message.get("content"), f"{where}.content", image_urls)
    return {"role": "system" if role == "developer" else role, "content": content}


class PartTypes(NamedTuple):
    """What a protocol calls its content parts: the types that hold a ``text``, and the one that holds an
    ``image_url`` (a URL, or ``{"url": ...}``)."""

    text: Tuple[str, ...]
    image: str


CHAT_PARTS = PartTypes(text=("text",), image="image_url")


def content_parts(
    content: Any, where: str, image_urls: List[str], types: PartTypes = CHAT_PARTS
) -> List[Dict[str, str]]:
    """A message's content, a string or a list of parts, as EVE's content parts (``prompts.py``): its text is text
    (``<image>`` or a special token written in it included), each image part an image, whose URL is appended to
    ``image_urls``. ``where``: the content's path in the request."""
    if isinstance(content, list):
        return [_part(part, f"{where}[{j}]", image_urls, types) for j, part in enumerate(content)]
    if not isinstance(content, str):
        raise APIError(400, f"{where} must be a string or a list of content parts.", where)
    return [{"type": "text", "text": content}]


def _part(part: Any, where: str, image_urls: List[str], types: PartTypes) -> Dict[str, str]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in types.text and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == types.image:
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str) and url:
            image_urls.append(url)
            return {"type": "image"}
    raise APIError(
        400,
        f"{where} must be {{'type': '{types.text[0]}', 'text': ...}} or {{'type': '{types.image}', 'image_url': ...}}.",
        where,
    )


def usage_json(usage: Usage) -> Dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "image_tokens": usage.image_tokens},
    }


class Reply:
    """The JSON of one answer, whole (``chat.completion``) or in chunks (``chat.completion.chunk``)."""

    def __init__(self, model_id: str, tokenizer: TokenizerWrapper, include_usage: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id, self.tokenizer, self.include_usage = model_id, tokenizer, include_usage

    def logprob(self, event: Event) -> Optional[Dict[str, Any]]:
        """The ``logprobs.content`` entry of an event's token; none for the end-of-answer token, which is no text."""
        if event.logprob is None or (event.finish_reason == "stop" and event.token in self.tokenizer.eos_token_ids):
            return None
        return {
            "token": self.tokenizer.decode([event.token]),
            "logprob": event.logprob,
            "top_logprobs": [{"token": token, "logprob": logprob} for token, logprob in event.top_logprobs],
        }

    def completion(
        self, text: str, logprobs: Optional[List[Dict[str, Any]]], last: Event, with_tools: bool
    ) -> Dict[str, Any]:
        message: Dict[str, Any] = {"role": "assistant", "content": text}
        finish = last.finish_reason
        calls = parse_tool_calls(text) if with_tools else None
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls_json(calls)}
            finish = "tool_calls" if finish == "stop" else finish
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": finish,
        }
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage_json(last.usage)}

    def chunk(
        self, delta: Dict[str, str], logprob: Optional[Dict[str, Any]] = None, finish_reason: Optional[str] = None
    ) -> Dict[str, Any]:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None if logprob is None else {"content": [logprob]},
            "finish_reason": finish_reason,
        }
        chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: only the last chunk, without choices, carries the usage
        return chunk

    def usage_chunk(self, usage: Usage) -> Dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage_json(usage)}

    def _head(self, kind: str) -> Dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}


async def chat_completions(served: Served, body: Dict[str, Any], receive: Receive) -> Response:
    """The answer to a chat-completions request ``body``: JSON, or an event stream with ``"stream": true``."""
    chat = parse_chat_request(body, served.vocab_size)
    served.check_model(chat.model)
    messages = chat.messages
    if chat.tools is not None:
        messages = with_tools_prompt(messages, chat.tools, served.processor.template.system)
    stream = await served.submit(messages, chat.image_urls, chat.params)
    reply = Reply(served.settings.model_id, served.processor.tokenizer, chat.include_usage)
    if chat.stream:
        pieces = chunks(served, reply, stream, receive, chat.tools is not None)
        return event_stream(pieces, reply.id, lambda error: server_sent(error.body()))
    return JSONResponse(await answer(served, reply, stream, receive, chat))


async def answer(served: Served, reply: Reply, stream: Stream, receive: Receive, chat: ChatRequest) -> Dict[str, Any]:
    text, logprobs, last = "", [], None
    async for last in served.events(stream, receive, reply.id):
        text += last.text
        entry = reply.logprob(last)
        if entry is not None:
            logprobs.append(entry)
    log_usage(reply.id, last)
    with_logprobs = chat.params.top_logprobs is not None
    return reply.completion(text, logprobs if with_logprobs else None, last, chat.tools is not None)


async def chunks(
    served: Served, reply: Reply, stream: Stream, receive: Receive, with_tools: bool
) -> AsyncIterator[str]:
    yield server_sent(reply.chunk({"role": "assistant", "content": ""}))
    deltas = CallDeltas() if with_tools else lambda text: [{"content": text}] if text else []
    async for event in served.events(stream, receive, reply.id):
        entry = reply.logprob(event)
        pieces = deltas(event.text)
        for i, delta in enumerate(pieces or ([{"content": ""}] if entry is not None else [])):
            yield server_sent(reply.chunk(delta, entry if i == 0 else None))
        if event.finish_reason is not None:
            finish = event.finish_reason
            if with_tools and deltas.calls and finish == "stop":
                finish = "tool_calls"
            yield server_sent(reply.chunk({}, finish_reason=finish))
            if reply.include_usage:
                yield server_sent(reply.usage_chunk(event.usage))
            log_usage(reply.id, event)
    yield server_sent("[DONE]")
