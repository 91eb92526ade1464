"""The server's Prometheus metrics, ``GET /metrics``: requests by endpoint and status, the tokens of the answers
(prompt, image, cached, generated), prompt-cache reuse, cancellations, how long answers take to start and to go
on, and the engine's queue, batch and prompt cache. Each app has a registry of its own, so that several apps in
one process keep their own counts."""

import time
import weakref
from typing import Sequence, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import Engine, Event, Stream, Usage

# Seconds from a request's submission to its first token: a short prompt on a fast Mac (tens of milliseconds)
# up to a large image prefilled on a slow CPU, or a long wait in the queue (minutes).
FIRST_TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Seconds between two tokens of a request: a small model on a Mac (milliseconds) up to a 7B model on a CPU.
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    """The metrics of one app. The protocols' requests are observed where they all pass (``serving.py``):
    ``submitted`` once a request is in the engine, then ``event`` for each of its events."""

    def __init__(self, engine: Engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "mlx_eve_http_requests",
            "HTTP requests answered, by endpoint (route path) and status (for a stream: the one it started with).",
            ["endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "mlx_eve_prompt_tokens", "Prompt tokens of the complete answers, image tokens included.", registry=registry
        )
        self.image_tokens = Counter(
            "mlx_eve_image_tokens", "Image tokens in the prompts of the complete answers.", registry=registry
        )
        self.cached_tokens = Counter(
            "mlx_eve_cached_prompt_tokens", "Prompt tokens taken from the prompt cache.", registry=registry
        )
        self.generated_tokens = Counter(
            "mlx_eve_generated_tokens", "Tokens generated for the complete answers.", registry=registry
        )
        self.cache_hits = Counter(
            "mlx_eve_prompt_cache_hits", "Complete answers whose prompt reused the prompt cache.", registry=registry
        )
        self.cancelled = Counter(
            "mlx_eve_requests_cancelled",
            "Requests cancelled before their last token: client_gone or server_stopping.",
            ["reason"],
            registry=registry,
        )
        self.first_token = Histogram(
            "mlx_eve_time_to_first_token_seconds",
            "From a request's submission to the engine to its first token.",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.token_latency = Histogram(
            "mlx_eve_inter_token_latency_seconds",
            "Between two consecutive tokens of a request.",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        gauges = {
            "queued_requests": ("Requests waiting for a place in the batch.", lambda: engine.waiting),
            "running_requests": ("Requests in the decode batch.", lambda: engine.running),
            "prompt_cache_bytes": ("Memory held by the prompt cache.", lambda: engine.prompt_cache.nbytes),
        }
        for name, (documentation, read) in gauges.items():
            Gauge(f"mlx_eve_{name}", documentation, registry=registry).set_function(read)
        # For each stream followed: when its last event came (at first: when it was submitted), and the
        # histogram the time to its next event goes to.
        self._last: "weakref.WeakKeyDictionary[Stream, Tuple[float, Histogram]]" = weakref.WeakKeyDictionary()

    def submitted(self, stream: Stream) -> None:
        self._last[stream] = (time.perf_counter(), self.first_token)

    def event(self, stream: Stream, event: Event) -> None:
        """One event of ``stream``: the time since its previous one (or its submission), and at the end its usage."""
        now = time.perf_counter()
        since, histogram = self._last[stream]
        histogram.observe(now - since)
        self._last[stream] = (now, self.token_latency)
        if event.usage is not None:
            self._count(event.usage)

    def _count(self, usage: Usage) -> None:
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.image_tokens.inc(usage.image_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.generated_tokens.inc(usage.completion_tokens)
        if usage.cached_tokens:
            self.cache_hits.inc()

    def response(self) -> Response:
        """Every metric in Prometheus' text format, the gauges read now."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class RequestCounter:
    """ASGI middleware counting each HTTP request in ``requests`` by the path of its route among ``routes``
    (``/v1/models/{name:path}``: a bounded set of labels, unlike the paths clients send) and the status its
    response started with."""

    def __init__(self, app: ASGIApp, requests: Counter, routes: Sequence[BaseRoute]):
        self.app, self.requests, self.routes = app, requests, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if no response starts, the app raised: Starlette's outermost middleware answers 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = next((route.path for route in self.routes if route.matches(scope)[0] is not Match.NONE), "other")
            self.requests.labels(path, str(status)).inc()
