"""How a client reaches the server: TLS material and the retry policy."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TLS:
    """gRPC over TLS. Paths to PEM files: `root_certs` to trust a private CA or a self-signed
    server certificate (None trusts the system's roots); `client_cert` + `client_key` when
    the server asks for mutual TLS."""
    root_certs: str | Path | None = None
    client_cert: str | Path | None = None
    client_key: str | Path | None = None

    def __post_init__(self):
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("TLS: client_cert and client_key go together")
        for name in ("root_certs", "client_cert", "client_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS {name}: no such file {path}")

    def client_kwargs(self) -> dict:
        """Arguments of tritonclient's (sync and asyncio) InferenceServerClient."""
        as_str = lambda p: None if p is None else str(p)  # noqa: E731
        return {"ssl": True, "root_certificates": as_str(self.root_certs),
                "private_key": as_str(self.client_key), "certificate_chain": as_str(self.client_cert)}


@dataclass(frozen=True)
class Retry:
    """Retries for a server that cannot take the request now (none listening, one restarting,
    or the model's queue full: ServerBusy), and only before the first response: a request
    that has streamed text is never sent again."""
    attempts: int = 3          # tries in all, the first included
    backoff_s: float = 0.5     # wait before the first retry, doubled each time
    max_backoff_s: float = 5.0
    busy: bool = True          # also retry a full queue (a proxy answering 429 turns this off)

    def retries(self, exc) -> bool:
        """Whether `exc` (one of errors.py's) is worth another attempt."""
        from edgevlm_client.errors import ServerBusy, ServerUnavailable
        return isinstance(exc, ServerUnavailable) and (self.busy or not isinstance(exc, ServerBusy))

    def delays(self) -> Iterator[float]:
        for i in range(max(self.attempts, 1) - 1):
            yield min(self.backoff_s * 2 ** i, self.max_backoff_s)

