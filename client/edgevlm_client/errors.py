"""Typed errors, chosen by the status code the server sent, never by its message.

Unary calls and connection failures carry gRPC status codes; a request our model refuses on a
stream carries its Triton status in the `stats` of the response before the error
(contract.STATS_ERROR). Each error is raised `from` the tritonclient or grpc exception behind
it, and keeps the server's one-line reason as text.
"""

from __future__ import annotations


class EdgeVLMError(Exception):
    """Base of every error this client raises."""


class ServerUnavailable(EdgeVLMError):
    """No server answers, or it is overloaded or restarting: worth retrying."""


class ServerBusy(ServerUnavailable):
    """The model answered that it is full ("busy: N sequences active, M queued"): retry later.
    Told apart from a server that is down by who said it: the model's own refusal (its
    stream status), not the transport's."""


class InvalidRequest(EdgeVLMError):
    """The server refused the request; the message says why. Retrying will not help."""


class Timeout(EdgeVLMError):
    """No answer within the time allowed."""


class Cancelled(EdgeVLMError):
    """The request was cancelled before it finished."""


class IncompleteAnswer(EdgeVLMError):
    """A constrained answer (json_schema, regex, ...) that max_tokens cut before it matched."""


class ServerError(EdgeVLMError):
    """The server failed while serving the request (a bug, a dead model, or an answer
    without a status code)."""


# The model's Triton status (contract.STATUS) -> our types.
BY_TRITON_STATUS = {"INVALID_ARG": InvalidRequest, "UNAVAILABLE": ServerBusy, "INTERNAL": ServerError}
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


def from_triton(exc, triton_status: str | None = None) -> EdgeVLMError:
    """Map a tritonclient InferenceServerException or a grpc.RpcError to our type (call as
    `raise from_triton(e) from e`); `triton_status` is what the stream's stats said, if any."""
    if callable(getattr(exc, "details", None)):  # grpc.RpcError
        message = exc.details() or ""
    elif callable(getattr(exc, "message", None)):
        message = exc.message() or ""
    else:
        message = str(exc)
    status = status_name(exc)
    cls = BY_TRITON_STATUS.get(triton_status) or BY_STATUS.get(status, ServerError)
    return cls(message.strip() or status or "no reason given")
