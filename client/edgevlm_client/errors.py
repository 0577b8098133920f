"""Typed errors, each raised `from` the tritonclient exception behind it."""

from __future__ import annotations

import re


class EdgeVLMError(Exception):
    """Base of every error this client raises."""


class ServerUnavailable(EdgeVLMError):
    """No server answers at the address (not started, restarting, or unreachable)."""


class InvalidRequest(EdgeVLMError):
    """The server refused the request; the message says why."""


class Timeout(EdgeVLMError):
    """No answer within the time allowed."""


class Cancelled(EdgeVLMError):
    """The request was cancelled before it finished."""


class ServerError(EdgeVLMError):
    """The server failed while serving the request."""


_BY_STATUS = {"StatusCode.INVALID_ARGUMENT": InvalidRequest, "StatusCode.UNAVAILABLE": ServerUnavailable,
              "StatusCode.DEADLINE_EXCEEDED": Timeout, "StatusCode.CANCELLED": Cancelled}


def reason(message: str) -> str:
    """The server's one-line reason, without Triton's ensemble prefix."""
    return re.sub(r"^in ensemble '[^']*', ", "", message or "").strip()


def from_triton(exc) -> EdgeVLMError:
    """Map a tritonclient InferenceServerException, or a grpc.RpcError from the asyncio
    stream, to our type (call as `raise ... from exc`)."""
    if callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None)):  # grpc.RpcError
        status, message = str(exc.code()), reason(exc.details() or "")
    else:
        status = str(exc.status()) if callable(getattr(exc, "status", None)) and exc.status() else ""
        message = reason(exc.message() if callable(getattr(exc, "message", None)) else str(exc))
    cls = _BY_STATUS.get(status) or _classify(message)
    return cls(message or status)


_UNAVAILABLE = ("failed to connect", "connection refused", "unavailable", "server exiting",
                "is not ready", "socket closed")
_SERVER_FAULT = ("internal error", "stub process", "not healthy", "failed to", "exception")


def _classify(message: str) -> type[EdgeVLMError]:
    """Errors on a gRPC stream arrive as a message only, without a status code. The server's
    own failures say "internal error"; Triton's refusals of malformed tensors and our models'
    one-line reasons are the request's fault."""
    low = message.lower()
    if any(s in low for s in _UNAVAILABLE):
        return ServerUnavailable
    if "deadline" in low or "timed out" in low:
        return Timeout
    if "cancelled" in low:
        return Cancelled
    if any(s in low for s in _SERVER_FAULT):
        return ServerError
    return InvalidRequest
