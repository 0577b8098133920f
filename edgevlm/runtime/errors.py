"""The errors a request can end in, each bound to the Triton status the client receives
(edgevlm_client.contract.STATUS). The Triton adapters send `status` as the error's code;
anything else that escapes is INTERNAL."""

from __future__ import annotations


class RequestError(Exception):
    """A request that ends early; the message is the one-line reason sent back."""
    status = "INTERNAL"


class BadRequest(RequestError, ValueError):
    """The request is wrong (INVALID_ARG): the client should fix it, not retry."""
    status = "INVALID_ARG"


class Busy(RequestError):
    """No room for the request now (UNAVAILABLE): the client may retry."""
    status = "UNAVAILABLE"
