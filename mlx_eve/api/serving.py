"""What every protocol of the server shares: the served model and its settings, a request submitted to the
engine, and its events followed (and counted in the app's ``Metrics``) while the client waits for them
(``follow``), streamed as server-sent events."""

import asyncio
import functools
import json
import logging
import threading
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import anyio.to_thread
from starlette.responses import StreamingResponse

from ..engine import Arrival, Engine, EngineStoppedError, Event, Stream
from ..errors import EVEError
from ..image_fetching import URL_SCHEMES, ImageLimits, read_image
from ..processor import Processor
from ..prompts import Prompt, images_first
from ..request import SamplingParams
from .errors import INTERNAL_ERROR, APIError, ClientGone, ServerStopping, api_error
from .metrics import Metrics

logger = logging.getLogger(__name__)
# ASGI's ``receive``: the next message from the client's connection.
Receive = Callable[[], Awaitable[Dict[str, Any]]]


@dataclass(frozen=True, kw_only=True)
class ServerSettings(ImageLimits):
    """What the HTTP layer checks around the engine (and, from ``ImageLimits``, where images may come from)."""

    model_id: str  # the name /v1/models lists and answers carry
    aliases: Tuple[str, ...] = ()  # other names a request may give the served model
    api_key: Optional[str] = None
    max_body_bytes: int = 64 * 2**20
    adapters: Tuple[str, ...] = ()  # the LoRA adapter folders applied to the model (its card lists them)
    keep_image_positions: bool = False  # images stay where a message has them, not before its text


@dataclass
class Served:
    """The model a server answers with: its engine and processor, the settings, ``stopping``, set when the
    answers in progress must end (the server is stopping), and the metrics its requests count in; for one request
    (``arriving``), also its ``Arrival``, which ends once it is submitted."""

    engine: Engine
    processor: Processor
    settings: ServerSettings
    stopping: asyncio.Event
    metrics: Metrics
    arrival: Optional[Arrival] = None

    def arriving(self) -> "Served":
        """What a request that has just come in is answered with: its arrival is noted at once, before its body is
        read, so that the engine prefills it with the requests that came in with it (``Engine.arriving``)."""
        return replace(self, arrival=self.engine.arriving())

    @property
    def vocab_size(self) -> int:
        """How many token ids the model answers with (the width of its logits)."""
        return self.engine.model.num_logits

    def check_model(self, name: Optional[str]) -> None:
        """A request's model name must be the served model's (or an alias); none at all is fine."""
        if name is not None and name not in (self.settings.model_id, *self.settings.aliases):
            message = f"The model {name!r} is not served here; this server serves {self.settings.model_id!r}."
            raise APIError(404, message, "model", "model_not_found")

    async def submit(
        self, prompt: Prompt, image_urls: Sequence[str], params: SamplingParams, names: Mapping[str, str] = {}
    ) -> Stream:
        """A request in the engine, its images read first on a worker thread (one of ``download_threads`` if it has
        an image URL: a download can take seconds). A request the engine refuses is an ``APIError`` naming its field
        by ``names`` (``api_error``)."""
        downloads = any(url.startswith(URL_SCHEMES) for url in image_urls)
        try:
            return await anyio.to_thread.run_sync(
                self._submit, prompt, image_urls, params, limiter=download_threads() if downloads else None
            )
        except EVEError as error:
            raise api_error(error, names) from error

    def _submit(self, prompt: Prompt, image_urls: Sequence[str], params: SamplingParams) -> Stream:
        images = [read_image(url, self.settings) for url in image_urls]
        if not (self.settings.keep_image_positions or isinstance(prompt, str)):
            prompt = images_first(prompt)
        stream = self.engine.submit(prompt, images=images, params=params, arrival=self.arrival)
        self.metrics.submitted(stream)
        return stream

    def events(self, stream: Stream, receive: Receive, name: str) -> AsyncIterator[Event]:
        return follow(stream, receive, self.stopping, name, self.metrics)

    async def whole(self, stream: Stream, receive: Receive, name: str) -> Tuple[str, Event]:
        """A whole answer's text and its last event (which has the usage, logged)."""
        text, last = "", None
        async for last in self.events(stream, receive, name):
            text += last.text
        log_usage(name, last)
        return text, last


@functools.lru_cache(maxsize=None)
def download_threads() -> anyio.CapacityLimiter:
    """The few worker threads that requests with image URLs read their images on, theirs alone: however many
    downloads are slow, a request whose images are inline never waits behind them. (Made on first use, in the event
    loop, where older versions of anyio must make it.)"""
    return anyio.CapacityLimiter(8)


async def follow(
    stream: Stream, receive: Receive, stopping: asyncio.Event, name: str, metrics: Metrics
) -> AsyncIterator[Event]:
    """The events of ``stream`` as they come, read on a thread of their own so that the event loop never blocks.

    The stream is cancelled, freeing its place in the batch, as soon as the client disconnects (``ClientGone``),
    ``stopping`` is set (``ServerStopping``), or this generator is closed or cancelled before the last event.
    ``name``: the request's, for the log; ``metrics``: where its events and its cancellation are counted.
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
            if not item.done():  # an event that came meanwhile is delivered first: it may be the engine's error
                item.cancel()
                if gone.done():
                    raise ClientGone()
                if stream.engine_failure is not None:
                    raise EngineStoppedError(f"The engine stopped on an error: {stream.engine_failure!r}")
                raise ServerStopping("The server is shutting down.")
            if isinstance(item.result(), Exception):
                finished = True  # the engine has ended the request: there is nothing to cancel
                raise item.result()
            metrics.event(stream, item.result())
            finished, tokens = item.result().finish_reason is not None, tokens + 1
            yield item.result()
    finally:
        gone.cancel()
        stop.cancel()
        if not finished:
            stream.cancel()
            stopped = stopping.is_set()
            why = "the server is stopping" if stopped else "the client disconnected"
            logger.info("%s: cancelled after %d tokens: %s", name, tokens, why)
            metrics.cancelled.labels("server_stopping" if stopped else "client_gone").inc()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has closed the connection (ASGI ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def log_usage(name: str, last: Event) -> None:
    """The log line of a finished answer (``name``: the request's id), with its usage."""
    u = last.usage
    logger.info(
        "%s: %d prompt tokens (%d image, %d cached) in %.2f s, %d tokens in %.2f s, %s",
        name,
        u.prompt_tokens,
        u.image_tokens,
        u.cached_tokens,
        u.prompt_seconds,
        u.completion_tokens,
        u.generation_seconds,
        last.finish_reason,
    )


def event_stream(pieces: AsyncIterator[str], name: str, error_event: Callable[[APIError], str]) -> StreamingResponse:
    """The response that streams ``pieces`` (server-sent events) as they come. Once it has begun its status is
    sent, so an error on the way is its last piece instead, the protocol's ``error_event``; a client that went
    away ends it quietly. ``name``: the request's, for the log."""

    async def until_error() -> AsyncIterator[str]:
        try:
            async for piece in pieces:
                yield piece
        except ClientGone:
            return
        except EVEError as error:
            yield error_event(api_error(error))
        except Exception:
            logger.exception("%s failed", name)
            yield error_event(INTERNAL_ERROR)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(until_error(), media_type="text/event-stream", headers=headers)


def server_sent(data: Union[Dict[str, Any], str]) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
