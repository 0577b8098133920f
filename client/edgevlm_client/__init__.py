"""gRPC client for an edgevlm Triton server (model `mobilevlm`): sync and asyncio."""

from edgevlm_client.aio import AsyncClient, AsyncStream
from edgevlm_client.chat import AsyncChat, Chat
from edgevlm_client.client import Client, Stream
from edgevlm_client.connection import TLS, Retry
from edgevlm_client.errors import (Cancelled, EdgeVLMError, InvalidRequest, ServerError,
                                   ServerUnavailable, Timeout)
from edgevlm_client.request import ModelInfo, Result

__all__ = ["Client", "AsyncClient", "Stream", "AsyncStream", "Chat", "AsyncChat", "Result", "ModelInfo",
           "TLS", "Retry", "EdgeVLMError", "ServerUnavailable", "InvalidRequest", "Timeout", "Cancelled",
           "ServerError"]
