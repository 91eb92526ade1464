"""The FastAPI application: OpenAI's error shape for every failure, the bearer-key check, bounded JSON bodies,
and the routes (``/v1/chat/completions``, ``/v1/models``, ``/health``) over the protocol modules."""

import asyncio
import json
import secrets
import time
from typing import Any, Dict, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..engine import Engine
from ..errors import EVEError
from ..processor import Processor
from . import chat_completions
from .errors import INTERNAL_ERROR, APIError, ClientGone, api_error
from .serving import Served, ServerSettings


def create_app(engine: Engine, processor: Processor, settings: ServerSettings) -> FastAPI:
    """The FastAPI application serving ``engine``'s model (``processor``: its processor, for the tokenizer and
    the context length). ``app.state.stop_answers()``, called on the app's event loop, ends the answers in
    progress (503, or an error event in a stream) so that the server can stop at once."""
    app = FastAPI(title="mlx-eve", docs_url=None, redoc_url=None, openapi_url=None)
    served = Served(engine, processor, settings, asyncio.Event())
    app.state.stop_answers = served.stopping.set
    add_error_handlers(app)
    authorized = [Depends(BearerKey(settings.api_key))]

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat(request: Request) -> Response:
        try:
            return await chat_completions.chat_completions(served, await read_json(request, settings), request.receive)
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [model_card(settings)]}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def model(name: str) -> Dict[str, Any]:
        served.check_model(name)
        return model_card(settings)

    @app.get("/health")
    async def health() -> Dict[str, str]:
        return {"status": "ok"}

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's shape: the request's own (4xx), the engine's, and bugs (500)."""

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


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.status == 503:
        headers["Retry-After"] = "1"
    return JSONResponse(error.body(), error.status, headers)


class BearerKey:
    """The dependency of the API's routes: ``Authorization: Bearer <key>`` when the server has a key (else 401)."""

    def __init__(self, key: Optional[str]):
        self.key = key

    def __call__(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.key.encode()):
            raise APIError(
                401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.", code="invalid_api_key"
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
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return data


def model_card(settings: ServerSettings) -> Dict[str, Any]:
    return {"id": settings.model_id, "object": "model", "created": int(time.time()), "owned_by": "mlx-eve"}
