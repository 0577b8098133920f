"""gRPC client for an edgevlm Triton server (model `mobilevlm`): sync and asyncio.

Names load on first use, so the server can import `edgevlm_client.contract` (pure Python)
without tritonclient.
"""

from importlib import import_module

_WHERE = {
    "Client": "client", "Stream": "client", "AsyncClient": "aio", "AsyncStream": "aio",
    "Chat": "chat", "AsyncChat": "chat", "Result": "request", "ModelInfo": "request",
    "TLS": "connection", "Retry": "connection",
    "EdgeVLMError": "errors", "ServerUnavailable": "errors", "ServerBusy": "errors", "InvalidRequest": "errors",
    "Timeout": "errors", "Cancelled": "errors", "ServerError": "errors", "IncompleteAnswer": "errors",
}
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'edgevlm_client' has no attribute {name!r}")
    value = getattr(import_module(f"edgevlm_client.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
