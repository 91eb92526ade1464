"""An OpenAI-compatible HTTP server: ``POST /v1/chat/completions`` (streamed or not, with images), ``GET /v1/models``
and ``GET /health``, in front of the batching ``Engine``; the ``server`` command.

Needs FastAPI and uvicorn (``pip install 'mlx-eve[server]'``). Like the other commands, this module imports
mlx-lm (and FastAPI) only when the server starts, so that ``--help`` and argument errors are instant.
"""

import argparse
import asyncio
import base64
import binascii
import json
import logging
import math
import os
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple, Union

from .arguments import COUNT, NON_NEGATIVE_INT, PORT, POSITIVE, ArgumentParser, add_model_options
from .errors import EVEError, ImageError, MissingDependencyError, PromptTooLongError, run_cli
from .prompts import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    import mlx.core as mx
    import uvicorn
    from fastapi import FastAPI
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from .engine import Engine, Event, SamplingParams, Stream, Usage
    from .models.base import EVEModel
    from .processor import Processor

INSTALL_HINT = "The server needs FastAPI and uvicorn: pip install 'mlx-eve[server]'"
# The model name mlx-lm's server answers to whatever it serves; clients written for it send it.
DEFAULT_MODEL_NAME = "default_model"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# On Ctrl-C, how long uvicorn waits for requests that are not yet answers (an image download...) before
# cancelling them; answers in progress end at once.
SHUTDOWN_GRACE_S = 5.0
API_KEY_ENV = "MLX_EVE_API_KEY"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP layer checks around the engine."""

    model_id: str  # the name /v1/models lists and answers carry
    aliases: Tuple[str, ...] = ()  # other names a request may give the served model
    api_key: Optional[str] = None
    allow_local_images: bool = False
    max_body_bytes: int = 64 * 2**20
    max_image_bytes: int = 20 * 2**20
    image_timeout: float = 30.0


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def api_error(error: EVEError) -> APIError:
    """The HTTP answer to an error of the engine: 400 for the request's own fault, 503 when it cannot take it."""
    from .engine import QueueFullError

    if isinstance(error, QueueFullError):
        return APIError(503, str(error), code="server_overloaded", kind="server_error")
    if isinstance(error, PromptTooLongError):
        return APIError(400, str(error), "messages", "context_length_exceeded")
    if isinstance(error, ImageError):
        return APIError(400, str(error), "messages", "invalid_image")
    if isinstance(error, ValueError):
        return APIError(400, str(error), "messages")
    return APIError(503, str(error), kind="server_error")  # e.g. the engine is shutting down


INTERNAL_ERROR = APIError(
    500, "The server had an error while answering (its log has the details).", kind="server_error"
)


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


@dataclass
class ChatRequest:
    """A checked ``/v1/chat/completions`` body."""

    model: Optional[str]
    messages: List[Dict[str, str]]  # for the engine: each image part became an <image> in its message's text
    image_urls: List[str]  # in the order of the <image> placeholders
    params: "SamplingParams"
    stream: bool
    include_usage: bool


def parse_chat_request(body: Dict[str, Any]) -> ChatRequest:
    """Check a request body (``APIError`` 400 naming the faulty field); fields it does not know are ignored."""
    from .engine import SamplingParams

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages.", "messages")
    image_urls: List[str] = []
    converted = [_message(message, f"messages[{i}]", image_urls) for i, message in enumerate(messages)]
    _option(body, "n", int, "1 (one answer per request)", lambda v: v == 1)
    max_tokens = _option(body, "max_completion_tokens", int, "an integer >= 1", lambda v: v >= 1)
    if max_tokens is None:
        max_tokens = _option(body, "max_tokens", int, "an integer >= 1", lambda v: v >= 1)
    logprobs = _option(body, "logprobs", bool, "true or false", default=False)
    top_logprobs = _option(
        body, "top_logprobs", int, f"an integer from 0 to {MAX_TOP_LOGPROBS}", lambda v: 0 <= v <= MAX_TOP_LOGPROBS
    )
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true.", "top_logprobs")
    defaults = SamplingParams()
    params = SamplingParams(
        max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
        temperature=_option(body, "temperature", float, "a number >= 0", lambda v: v >= 0, defaults.temperature),
        top_p=_option(body, "top_p", float, "a number in (0, 1]", lambda v: 0 < v <= 1, defaults.top_p),
        top_k=_option(body, "top_k", int, "an integer >= 0 (0: all)", lambda v: v >= 0, defaults.top_k),
        min_p=_option(body, "min_p", float, "a number in [0, 1]", lambda v: 0 <= v <= 1, defaults.min_p),
        repetition_penalty=_option(body, "repetition_penalty", float, "a number > 0", lambda v: v > 0),
        repetition_context_size=_option(
            body, "repetition_context_size", int, "an integer >= 1", lambda v: v >= 1, defaults.repetition_context_size
        ),
        stop=_stop(body.get("stop")),
        top_logprobs=(top_logprobs or 0) if logprobs else None,
        seed=_option(body, "seed", int, "an integer >= 0", lambda v: v >= 0),
    )
    stream_options = _option(body, "stream_options", dict, "an object", default={})
    return ChatRequest(
        model=_option(body, "model", str, "a model name"),
        messages=converted,
        image_urls=image_urls,
        params=params,
        stream=_option(body, "stream", bool, "true or false", default=False),
        include_usage=_option(stream_options, "include_usage", bool, "true or false", default=False),
    )


def _option(body: Dict[str, Any], name: str, kind: type, wanted: str, ok=lambda v: True, default=None) -> Any:
    """``body[name]`` if it is a ``kind`` (an int is a float, a bool is no number) that passes ``ok``;
    ``default`` when it is missing or null."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        valid = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not valid or not ok(value):
        raise APIError(400, f"Invalid '{name}': expected {wanted}, got {_shorten(json.dumps(value))}.", name)
    return value


def _stop(stop: Any) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    message = f"Invalid 'stop': expected a string or a list of strings, got {_shorten(json.dumps(stop))}."
    raise APIError(400, message, "stop")


def _message(message: Any, where: str, image_urls: List[str]) -> Dict[str, str]:
    """An OpenAI message → ``{"role", "content"}`` with text content; image parts become ``<image>`` in place
    (parts are joined by new lines, so an image before a question reads ``<image>\\nquestion`` as in EVE's
    reference) and their URLs are appended to ``image_urls``."""
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content'.", where)
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant"):
        raise APIError(
            400, f"{where} has the role {_shorten(json.dumps(role))}: use system, user or assistant.", f"{where}.role"
        )
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(_part(part, f"{where}.content[{j}]", image_urls) for j, part in enumerate(content))
    elif not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string or a list of content parts.", f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _part(part: Any, where: str, image_urls: List[str]) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str) and url:
            image_urls.append(url)
            return IMAGE_PLACEHOLDER
    raise APIError(
        400,
        f"{where} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', 'image_url': {{'url': ...}}}}.",
        where,
    )


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_image(url: str, settings: ServerSettings) -> Union[bytes, Path]:
    """An image URL's content: a ``data:`` URI's bytes, an http(s) download, or (with ``allow_local_images``) a
    local path or ``file://`` URL. The image itself is decoded (and checked) by the engine."""
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ImageError("An image data URI must be base64-encoded: data:image/png;base64,...")
        if len(data) // 4 * 3 > settings.max_image_bytes:
            raise ImageError(f"The image data URI holds more than {settings.max_image_bytes:,} bytes.")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise ImageError(f"The image data URI is not valid base64 ({e}).") from e
    if url.startswith(("http://", "https://")):
        return _download(url, settings.max_image_bytes, settings.image_timeout)
    if not settings.allow_local_images:
        raise ImageError(
            f"Image {_shorten(url)}: give an http(s) URL or a data: URI (this server reads local files only when "
            "started with --allow-local-images)."
        )
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path) if url.startswith("file:") else url)
    if path.is_file() and path.stat().st_size > settings.max_image_bytes:
        raise ImageError(f"Image {path} is larger than {settings.max_image_bytes:,} bytes.")
    return path


def _download(url: str, max_bytes: int, timeout: float) -> bytes:
    """At most ``max_bytes`` from ``url`` within about ``timeout`` seconds, or ``ImageError``."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "mlx-eve"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(1 << 16):
                data += chunk
                if len(data) > max_bytes:
                    raise ImageError(f"Image {_shorten(url)} is larger than {max_bytes:,} bytes.")
                if time.monotonic() > deadline:
                    raise ImageError(f"Image {_shorten(url)} took longer than {timeout:g} s to download.")
    except ImageError:
        raise
    except urllib.error.HTTPError as e:
        raise ImageError(f"Could not download image {_shorten(url)}: HTTP {e.code} {e.reason}.") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageError(f"Could not download image {_shorten(url)}: {getattr(e, 'reason', e)}") from e
    return bytes(data)


class ServerStopping(EVEError):
    """The server was asked to stop (Ctrl-C) while the answer was being generated."""


async def follow(
    stream: "Stream", receive: Callable[[], Awaitable[Dict[str, Any]]], stopping: asyncio.Event, name: str
) -> AsyncIterator["Event"]:
    """The events of ``stream`` as they come, read on a thread of their own so that the event loop never blocks.

    The stream is cancelled, freeing its place in the batch, as soon as the client disconnects (``ClientGone``),
    ``stopping`` is set (``ServerStopping``), or this generator is closed or cancelled before the last event.
    ``name``: the request's, for the log.
    """
    loop = asyncio.get_running_loop()
    events: "asyncio.Queue[Any]" = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody waits for this answer any more
            pass

    def read() -> None:
        try:
            for event in stream:
                put(event)
        except Exception as error:
            put(error)

    threading.Thread(target=read, name="mlx-eve-stream", daemon=True).start()
    gone, stop = asyncio.ensure_future(_disconnected(receive)), asyncio.ensure_future(stopping.wait())
    finished, tokens = False, 0
    try:
        while not finished:
            item = asyncio.ensure_future(events.get())
            await asyncio.wait({item, gone, stop}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done() or stop.done():
                item.cancel()
                raise ClientGone() if gone.done() else ServerStopping("The server is shutting down.")
            if isinstance(item.result(), Exception):
                raise item.result()
            finished, tokens = item.result().finish_reason is not None, tokens + 1
            yield item.result()
    finally:
        gone.cancel()
        stop.cancel()
        if not finished:
            stream.cancel()
            why = "the server is stopping" if stopping.is_set() else "the client disconnected"
            logger.info("%s: cancelled after %d tokens: %s", name, tokens, why)


async def _disconnected(receive: Callable[[], Awaitable[Dict[str, Any]]]) -> None:
    """Returns when the client has closed the connection (ASGI ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def usage_json(usage: "Usage") -> Dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens, "image_tokens": usage.image_tokens},
    }


class Reply:
    """The JSON of one answer, whole (``chat.completion``) or in chunks (``chat.completion.chunk``)."""

    def __init__(self, model_id: str, tokenizer: "TokenizerWrapper", include_usage: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id, self.tokenizer, self.include_usage = model_id, tokenizer, include_usage

    def logprob(self, event: "Event") -> Optional[Dict[str, Any]]:
        """The ``logprobs.content`` entry of an event's token; none for the end-of-answer token, which is no text."""
        if event.logprob is None or (event.finish_reason == "stop" and event.token in self.tokenizer.eos_token_ids):
            return None
        return {
            "token": self.tokenizer.decode([event.token]),
            "logprob": event.logprob,
            "top_logprobs": [{"token": token, "logprob": logprob} for token, logprob in event.top_logprobs],
        }

    def completion(self, text: str, logprobs: Optional[List[Dict[str, Any]]], last: "Event") -> Dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": last.finish_reason,
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

    def usage_chunk(self, usage: "Usage") -> Dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage_json(usage)}

    def _head(self, kind: str) -> Dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}


def server_sent(data: Union[Dict[str, Any], str]) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def _log_usage(reply: Reply, last: "Event") -> None:
    u = last.usage
    logger.info(
        "%s: %d prompt tokens (%d image, %d cached) in %.2f s, %d tokens in %.2f s, %s",
        reply.id,
        u.prompt_tokens,
        u.image_tokens,
        u.cached_tokens,
        u.prompt_seconds,
        u.completion_tokens,
        u.generation_seconds,
        last.finish_reason,
    )


def create_app(engine: "Engine", processor: "Processor", settings: ServerSettings) -> "FastAPI":
    """The FastAPI application serving ``engine``'s model (``processor``: its processor, for the tokenizer and
    the context length). ``app.state.stop_answers()``, called on the app's event loop, ends the answers in
    progress (503, or an error event in a stream) so that the server can stop at once."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    app = FastAPI(title="mlx-eve", docs_url=None, redoc_url=None, openapi_url=None)
    served = {settings.model_id, *settings.aliases}
    stopping = asyncio.Event()
    app.state.stop_answers = stopping.set

    def error_response(error: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        if error.status == 503:
            headers["Retry-After"] = "1"
        return JSONResponse(error.body(), error.status, headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(EVEError)
    async def on_eve_error(request: Request, error: EVEError) -> JSONResponse:
        return error_response(api_error(error))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises the error after this answer, and uvicorn logs it with its traceback.
        return error_response(INTERNAL_ERROR)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise APIError(
                401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    async def read_json(request: Request) -> Dict[str, Any]:
        too_large = APIError(413, f"The request body is larger than {settings.max_body_bytes:,} bytes.")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > settings.max_body_bytes:
            raise too_large
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > settings.max_body_bytes:
                    raise too_large
        except ClientDisconnect as e:
            raise ClientGone() from e
        try:
            data = json.loads(body)
        except ValueError as e:
            raise APIError(400, f"The request body is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.")
        return data

    def check_model(name: Optional[str]) -> None:
        if name is not None and name not in served:
            message = f"The model {name!r} is not served here; this server serves {settings.model_id!r}."
            raise APIError(404, message, "model", "model_not_found")

    def submit(chat: ChatRequest) -> "Stream":
        images = [read_image(url, settings) for url in chat.image_urls]
        return engine.submit(chat.messages, images=images, params=chat.params)

    async def answer(reply: Reply, stream: "Stream", request: Request, with_logprobs: bool) -> Dict[str, Any]:
        text, logprobs, last = "", [], None
        async for last in follow(stream, request.receive, stopping, reply.id):
            text += last.text
            entry = reply.logprob(last)
            if entry is not None:
                logprobs.append(entry)
        _log_usage(reply, last)
        return reply.completion(text, logprobs if with_logprobs else None, last)

    async def chunks(reply: Reply, stream: "Stream", request: Request) -> AsyncIterator[str]:
        yield server_sent(reply.chunk({"role": "assistant", "content": ""}))
        try:
            async for event in follow(stream, request.receive, stopping, reply.id):
                entry = reply.logprob(event)
                if event.text or entry is not None:
                    yield server_sent(reply.chunk({"content": event.text}, entry))
                if event.finish_reason is not None:
                    yield server_sent(reply.chunk({}, finish_reason=event.finish_reason))
                    if reply.include_usage:
                        yield server_sent(reply.usage_chunk(event.usage))
                    _log_usage(reply, event)
        except ClientGone:
            return
        except EVEError as error:  # the response has started: errors go in the stream, as OpenAI's do
            yield server_sent(api_error(error).body())
            return
        except Exception:
            logger.exception("%s failed", reply.id)
            yield server_sent(INTERNAL_ERROR.body())
            return
        yield server_sent("[DONE]")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        try:
            chat = parse_chat_request(await read_json(request))
            check_model(chat.model)
            stream = await run_in_threadpool(submit, chat)
            reply = Reply(settings.model_id, processor.tokenizer, chat.include_usage)
            if chat.stream:
                headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                return StreamingResponse(
                    chunks(reply, stream, request), media_type="text/event-stream", headers=headers
                )
            return JSONResponse(await answer(reply, stream, request, chat.params.top_logprobs is not None))
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    def model_card() -> Dict[str, Any]:
        return {"id": settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "mlx-eve"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def model(name: str) -> Dict[str, Any]:
        check_model(name)
        return model_card()

    @app.get("/health")
    async def health() -> Dict[str, str]:
        return {"status": "ok"}

    return app


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Serve an EVE model with an OpenAI-compatible API (chat completions with images).")
    add = p.add_argument
    add_model_options(p)
    add("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1: this computer only).")
    add(
        "--port",
        type=PORT,
        default=8080,
        help="Port to listen on (default 8080).",
    )
    add(
        "--api-key",
        metavar="KEY",
        default=os.environ.get(API_KEY_ENV),
        help=f"Require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV}, else no key).",
    )
    add(
        "--allow-local-images",
        action="store_true",
        help="Let requests name images by local path or file:// URL (files this process can read).",
    )
    add(
        "--prompt-cache-bytes",
        type=NON_NEGATIVE_INT,
        default=2**30,
        help="Memory for KV caches kept for reuse by later requests (default 1 GiB; 0: none).",
    )
    add("--max-batch-size", type=COUNT, default=8, help="Requests decoded together (default 8).")
    add("--max-queued", type=COUNT, default=64, help="Requests waiting beyond the batch before 503 (default 64).")
    add("--max-body-bytes", type=COUNT, default=64 * 2**20, help="Largest request body (default 64 MiB; else 413).")
    add("--max-image-bytes", type=COUNT, default=20 * 2**20, help="Largest image file (default 20 MiB).")
    add("--image-timeout", type=POSITIVE, default=30.0, help="Seconds to download an image URL (default 30).")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: serve(args))


def model_name(model_path: str) -> str:
    """The served model's name: a local folder's name, or the Hugging Face repo id."""
    return Path(model_path).name if Path(model_path).is_dir() else model_path


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, made as uvicorn makes it, or one ``EVEError`` line (uvicorn would log and exit)."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise EVEError(f"Could not listen on {host}, port {port}: {reason}. Choose another --port or --host.") from e


def stoppable_server(config: "uvicorn.Config", on_exit: Callable[[], None]) -> "uvicorn.Server":
    """uvicorn's server, which also calls ``on_exit`` on its event loop when a signal (Ctrl-C) asks it to stop."""
    import uvicorn

    class Server(uvicorn.Server):
        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()  # uvicorn listens to signals only while this runs
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self.loop.call_soon_threadsafe(on_exit)

    return Server(config)


def serve(args: argparse.Namespace) -> None:
    """Load the model and serve it until Ctrl-C (``KeyboardInterrupt``). Under ``mlx.launch`` every process runs
    this with its part of the model: rank 0 serves HTTP, the others run its engine's rounds (``follow_rank_0``)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
        from uvicorn.logging import DefaultFormatter
    except ImportError as e:
        raise MissingDependencyError(INSTALL_HINT) from e
    import mlx.core as mx

    from .engine import SamplingParams

    group = mx.distributed.init()
    if group.rank() > 0:
        follow_rank_0(args, group)
        return
    # Before loading: a port in use is known at once.
    with listen(args.host, args.port) as sock:
        model_path = args.model
        print(f"Loading {model_path} …", flush=True)
        start = time.perf_counter()
        model, processor = load_model(args, group)
        print(f"Loaded in {time.perf_counter() - start:.1f} s.", flush=True)
        if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(
                f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it.",
                file=sys.stderr,
            )
        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        settings = ServerSettings(
            model_id=model_name(model_path),
            aliases=(model_path, DEFAULT_MODEL_NAME),
            api_key=args.api_key,
            allow_local_images=args.allow_local_images,
            max_body_bytes=args.max_body_bytes,
            max_image_bytes=args.max_image_bytes,
            image_timeout=args.image_timeout,
        )
        engine = make_engine(model, processor, args, group)
        try:
            # One token before serving: the first answer would otherwise pay for the lazy start of the tokenizer
            # and the compute backend, and a Ctrl-C during that start was seen to be lost.
            list(engine.submit("Hi", params=SamplingParams(max_tokens=1)))
            app = create_app(engine, processor, settings)
            config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
            host = f"[{args.host}]" if ":" in args.host else args.host
            processes = f" on {group.size()} processes" if group.size() > 1 else ""
            print(
                f"Serving {settings.model_id}{processes} at http://{host}:{args.port}/v1 (Ctrl-C to quit)", flush=True
            )
            # On Ctrl-C the answers in progress end, uvicorn closes the connections, then raises KeyboardInterrupt.
            stoppable_server(config, app.state.stop_answers).run(sockets=[sock])
        finally:
            engine.close()  # with several processes, this also stops the others


def follow_rank_0(args: argparse.Namespace, group: "mx.distributed.Group") -> None:
    """A rank other than 0: its part of the model, running rank 0's engine rounds until rank 0 closes it."""
    # Ctrl-C in a terminal reaches every process of the group; rank 0 stops them all. Leaving at once instead
    # would strand rank 0 in the middle of a step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    model, processor = load_model(args, group)
    make_engine(model, processor, args, group).join()


def load_model(args: argparse.Namespace, group: "mx.distributed.Group") -> Tuple["EVEModel", "Processor"]:
    from .loading import load

    return load(args.model, adapter_path=args.adapter_path, max_size=args.max_size, group=group)


def make_engine(
    model: "EVEModel", processor: "Processor", args: argparse.Namespace, group: "mx.distributed.Group"
) -> "Engine":
    """The same engine on every rank: they must batch, and keep KV caches, alike."""
    from .engine import Engine

    return Engine(
        model,
        processor,
        max_batch_size=args.max_batch_size,
        max_queued=args.max_queued,
        prompt_cache_bytes=args.prompt_cache_bytes,
        group=group,
    )


if __name__ == "__main__":
    sys.exit(main())
