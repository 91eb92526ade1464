"""The FastAPI application: OpenAI's error shape for every failure (Anthropic's under ``/v1/messages``), the key
check, bounded JSON bodies, and the routes (``/v1/chat/completions``, ``/v1/completions``, ``/v1/responses``,
``/v1/messages``, ``/v1/models``, ``/health``, ``/metrics``) over the protocol modules."""

import asyncio
import json
import secrets
import time
from typing import Any, Awaitable, Callable, Dict, Optional, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute

from ..engine import Engine
from ..errors import EVEError
from ..processor import Processor
from ..quantization import config_block, of_model
from . import chat_completions, completions, messages, responses
from .errors import INTERNAL_ERROR, APIError, ClientGone, api_error
from .fields import check_body
from .metrics import Metrics, RequestCounter
from .serving import Receive, Served, ServerSettings

# The protocols, each answering a POST of a JSON body at its path.
PROTOCOLS = {
    "/v1/chat/completions": chat_completions.chat_completions,
    "/v1/responses": responses.responses,
    "/v1/completions": completions.completions,
    messages.PATH: messages.messages,
}
# What the server does beside its endpoints (the model card's ``capabilities`` lists both).
FEATURES = ("streaming", "logprobs", "structured_outputs", "tool_calls")


def create_app(engine: Engine, processor: Processor, settings: ServerSettings) -> FastAPI:
    """The FastAPI application serving ``engine``'s model (``processor``: its processor, for the tokenizer and
    the context length). ``app.state.stop_answers()``, called on the app's event loop, ends the answers in
    progress (503, or an error event in a stream) so that the server can stop at once."""
    app = FastAPI(title="mlx-eve", docs_url=None, redoc_url=None, openapi_url=None)
    served = Served(engine, processor, settings, asyncio.Event(), Metrics(engine))
    app.state.stop_answers = served.stopping.set
    add_error_handlers(app)
    app.add_middleware(RequestCounter, requests=served.metrics.requests, routes=app.routes)
    authorized = [Depends(BearerKey(settings.api_key))]

    for path, answer in PROTOCOLS.items():
        app.post(path, dependencies=authorized)(_route(answer, served))

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [model_card(served, app.routes)]}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def model(name: str) -> Dict[str, Any]:
        served.check_model(name)
        return model_card(served, app.routes)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.failure is not None:  # the server is about to exit (``lifecycle.stop_with``)
            return JSONResponse({"status": "error", "error": f"The engine stopped: {engine.failure!r}"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=authorized)  # open, as /health, unless the server has a key
    async def metrics() -> Response:
        return served.metrics.response()

    return app


def _route(answer: Callable[[Served, Dict[str, Any], Receive], Awaitable[Response]], served: Served):
    """The route of a protocol's ``answer`` to a JSON body."""

    async def route(request: Request) -> Response:
        this = served.arriving()
        try:
            return await answer(this, await read_json(request, served.settings), request.receive)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            this.arrival.end()  # if it never reached the engine

    return route


def add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's shape (Anthropic's under ``/v1/messages``): the request's own (4xx), the
    engine's, and bugs (500)."""

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error, request)

    @app.exception_handler(EVEError)
    async def on_eve_error(request: Request, error: EVEError) -> JSONResponse:
        return error_response(api_error(error), request)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail)), request)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises the error after this answer, and uvicorn logs it with its traceback.
        return error_response(INTERNAL_ERROR, request)


def error_response(error: APIError, request: Request) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.status == 503:
        headers["Retry-After"] = "1"
    body = messages.error_body(error) if request.url.path.startswith(messages.PATH) else error.body()
    return JSONResponse(body, error.status, headers)


class BearerKey:
    """The dependency of the API's routes: ``Authorization: Bearer <key>``, or Anthropic's ``x-api-key: <key>``,
    when the server has a key (else 401)."""

    def __init__(self, key: Optional[str]):
        self.key = key

    def __call__(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        given = key.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
        if not secrets.compare_digest(given.encode(), self.key.encode()):
            raise APIError(
                401,
                "Missing or wrong API key: send the header 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                code="invalid_api_key",
            )


async def read_json(request: Request, settings: ServerSettings) -> Dict[str, Any]:
    """The request's body as a JSON object of at most ``max_body_bytes`` (413 beyond, read or announced)."""
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
    except RecursionError as e:
        raise APIError(400, "The request body nests deeper than this server reads.") from e
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    check_body(data)
    return data


def model_card(served: Served, routes: Sequence[BaseRoute]) -> Dict[str, Any]:
    """The served model's entry in ``/v1/models``: OpenAI's fields, then what the model is (its family, context,
    image resolution, quantization, adapters) and what the server does with it (its POST endpoints among
    ``routes``, e.g. ``/v1/chat/completions`` as ``chat_completions``, and its ``FEATURES``)."""
    model, processor = served.engine.model, served.processor
    # A square picture of any size is resized to this side (EVEv1: every picture's long side; EVEv2: about as
    # many pixels).
    resolution, _ = processor.image_processor.target_size(1, 1)
    quantized = config_block(of_model(model))
    endpoints = [
        route.path.removeprefix("/v1/").replace("/", "_")
        for route in routes
        if isinstance(route, APIRoute) and "POST" in route.methods
    ]
    return {
        "id": served.settings.model_id,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "mlx-eve",
        "family": model.family.name,
        "model_type": model.model_type,
        "context_length": processor.context_length,
        "vision": True,
        "image_resolution": resolution,
        # The most common layer settings; a mixed recipe's other layers are in the checkpoint's config.json.
        "quantization": None if quantized is None else {k: quantized[k] for k in ("bits", "group_size", "mode")},
        "adapters": list(served.settings.adapters),
        "capabilities": endpoints + list(FEATURES),
    }
