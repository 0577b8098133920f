"""gRPC client for an edgevlm Triton server (ensemble `mobilevlm`)."""

from edgevlm_client.client import Chat, Client, Result, Stream
from edgevlm_client.errors import (Cancelled, EdgeVLMError, InvalidRequest, ServerError,
                                   ServerUnavailable, Timeout)

__all__ = ["Client", "Chat", "Result", "Stream", "EdgeVLMError", "ServerUnavailable", "InvalidRequest",
           "Timeout", "Cancelled", "ServerError"]
