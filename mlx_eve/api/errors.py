"""Errors answered with an HTTP status, and what becomes of the engine's errors."""

from typing import Any, Dict, Mapping, Optional

from ..engine import EngineStoppedError, QueueFullError, RequestFailedError, RequestTooLargeError
from ..errors import EVEError, ImageError, PromptTooLongError
from ..request import SamplingError
from ..structured import GrammarError


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


def api_error(error: EVEError, names: Mapping[str, str] = {}) -> APIError:
    """The HTTP answer to an error of the engine: 400 for the request's own fault, 503 when it cannot take it.
    ``names``: what the protocol calls the fields the answer names as chat completions does (``messages``...)."""
    answer = _api_error(error)
    answer.param = names.get(answer.param, answer.param)
    return answer


def _api_error(error: EVEError) -> APIError:
    if isinstance(error, QueueFullError):
        return APIError(503, str(error), code="server_overloaded", kind="server_error")
    if isinstance(error, PromptTooLongError):
        return APIError(400, str(error), "messages", "context_length_exceeded")
    if isinstance(error, GrammarError):
        return APIError(400, str(error), "response_format", "invalid_response_format")
    if isinstance(error, RequestTooLargeError):
        return APIError(413, str(error), "max_tokens", "request_too_large")
    if isinstance(error, SamplingError):
        return APIError(400, str(error), error.field)
    if isinstance(error, RequestFailedError):
        return APIError(500, str(error), kind="server_error")
    if isinstance(error, EngineStoppedError):
        return APIError(503, str(error), code="engine_stopped", kind="server_error")
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


class ServerStopping(EVEError):
    """The server was asked to stop (Ctrl-C) while the answer was being generated."""
