"""Typed errors, chosen by the status code the server sent, never by its message.

Streams carry status codes because the client opens them with
`contract.STREAM_STATUS_HEADER`; unary calls always do. Each error is raised `from` the
tritonclient or grpc exception behind it, and keeps the server's one-line reason as text.
"""

from __future__ import annotations


class EdgeVLMError(Exception):
    """Base of every error this client raises."""


class ServerUnavailable(EdgeVLMError):
    """No server answers, or it is overloaded or restarting: worth retrying."""


class InvalidRequest(EdgeVLMError):
    """The server refused the request; the message says why. Retrying will not help."""


class Timeout(EdgeVLMError):
    """No answer within the time allowed."""


class Cancelled(EdgeVLMError):
    """The request was cancelled before it finished."""


class ServerError(EdgeVLMError):
    """The server failed while serving the request (a bug, a dead model, or an answer
    without a status code)."""


# gRPC status names (grpc.StatusCode.X.name) -> our types; anything else is the server's fault.
BY_STATUS = {
    "INVALID_ARGUMENT": InvalidRequest,
    "UNAVAILABLE": ServerUnavailable,
    "DEADLINE_EXCEEDED": Timeout,
    "CANCELLED": Cancelled,
}


def status_name(exc) -> str:
    """The gRPC status name of a tritonclient InferenceServerException (its status() is
    "StatusCode.X", or None when it carries no code) or of a grpc.RpcError."""
    code = exc.code() if callable(getattr(exc, "code", None)) else (
        exc.status() if callable(getattr(exc, "status", None)) else None)
    if code is None:
        return ""
    return getattr(code, "name", None) or str(code).rpartition(".")[2]


def from_triton(exc) -> EdgeVLMError:
    """Map a tritonclient InferenceServerException or a grpc.RpcError to our type (call as
    `raise from_triton(e) from e`)."""
    if callable(getattr(exc, "details", None)):  # grpc.RpcError
        message = exc.details() or ""
    elif callable(getattr(exc, "message", None)):
        message = exc.message() or ""
    else:
        message = str(exc)
    status = status_name(exc)
    return BY_STATUS.get(status, ServerError)(message.strip() or status or "no reason given")
