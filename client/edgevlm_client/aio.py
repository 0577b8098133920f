"""asyncio client with the surface of the sync one: `await generate()`, `async for` over
`stream()`, `await health()` / `wait_ready()` / `metadata()`.

One gRPC channel per AsyncClient, shared by all its streams (tritonclient's grpc aio).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from edgevlm_client.chat import AsyncChat
from edgevlm_client.client import DEFAULT_URL
from edgevlm_client.connection import TLS, Retry
from edgevlm_client.contract import MODEL, STATS_ERROR
from edgevlm_client.errors import EdgeVLMError, ServerError, ServerUnavailable, Timeout, from_triton
from edgevlm_client.request import ModelInfo, Result, build_inputs, read_response, split_options

T = TypeVar("T")


class AsyncStream:
    """`async for delta in stream`; afterwards `.text` and `.stats`. Leaving the loop early,
    or `await stream.aclose()`, cancels the request on the server."""
    response_format: dict | None = None  # the constraint asked for, if any

    def __init__(self, client: AsyncClient, inputs, timeout_s: float, retry: Retry):
        self.stats: dict = {}
        self.text = ""
        self._client, self._inputs, self._timeout_s, self._retry = client, inputs, timeout_s, retry
        self._gen: AsyncIterator[str] | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        if self._gen is None:
            self._gen = self._run()
        return self._gen

    async def aclose(self) -> None:
        if self._gen is not None:
            await self._gen.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _request(self):
        yield {"model_name": self._client.model, "inputs": self._inputs}

    async def _run(self) -> AsyncIterator[str]:
        delays = self._retry.delays()
        received = False
        while True:
            call, status = None, None
            try:
                call = (await self._client.grpc_client()).stream_infer(self._request())
                while True:
                    try:
                        result, error = await asyncio.wait_for(call.__anext__(), self._timeout_s)
                    except asyncio.TimeoutError:
                        raise Timeout(f"no response within {self._timeout_s:g} s") from None
                    except StopAsyncIteration:
                        raise ServerError("the stream ended without an answer") from None
                    if error is not None:
                        raise error
                    delta, stats = read_response(result)
                    if STATS_ERROR in stats:  # the refusal itself follows as the error
                        status = stats[STATS_ERROR].get("status")
                        continue
                    received = True
                    if delta:
                        self.text += delta
                        yield delta
                    if stats:  # the last response of every finished generation
                        self.stats = stats
                        call = None  # complete: nothing to cancel
                        return
            except (InferenceServerException, grpc.RpcError) as e:
                exc: EdgeVLMError = from_triton(e, status)
                delay = next(delays, None) if self._retry.retries(exc) and not received else None
                if delay is None:
                    raise exc from e
            finally:
                if call is not None:
                    call.cancel()
            await asyncio.sleep(delay)


class AsyncClient:
    """asyncio twin of Client (same arguments). Use `async with AsyncClient(...) as c:` or
    `await c.close()` to release its channel."""

    def __init__(self, url: str = DEFAULT_URL, *, model: str = MODEL, timeout_s: float = 300.0,
                 tls: TLS | None = None, retry: Retry = Retry()):
        self.url, self.model, self.timeout_s, self.tls, self.retry = url, model, timeout_s, tls, retry
        self._grpc: grpcaio.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def grpc_client(self) -> grpcaio.InferenceServerClient:
        loop = asyncio.get_running_loop()
        if self._grpc is None or self._loop is not loop:  # a channel belongs to one event loop
            self._grpc = grpcaio.InferenceServerClient(self.url, **(self.tls.client_kwargs() if self.tls else {}))
            self._loop = loop
        return self._grpc

    async def close(self) -> None:
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def stream(self, prompt: str, *, image=None, timeout_s: float | None = None, retry: Retry | None = None,
               **options) -> AsyncStream:
        """Text deltas as they are generated (options as Client.stream; retry replaces the
        client's for this request)."""
        options, fmt = split_options(options)
        s = AsyncStream(self, build_inputs(prompt, image, response_format=fmt, **options),
                        timeout_s or self.timeout_s, retry or self.retry)
        s.response_format = fmt
        return s

    async def generate(self, prompt: str, *, image=None, timeout_s: float | None = None, **options) -> Result:
        s = self.stream(prompt, image=image, timeout_s=timeout_s, **options)
        async for _ in s:
            pass
        return Result(s.text, s.stats, s.response_format)

    def chat(self, image=None, **options) -> AsyncChat:
        return AsyncChat(self, image, **options)

    async def health(self) -> bool:
        try:
            c = await self.grpc_client()
            return (await c.is_server_ready(client_timeout=5.0)
                    and await c.is_model_ready(self.model, client_timeout=5.0))
        except (InferenceServerException, grpc.RpcError):
            return False

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.health():
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{self.url}: not ready after {timeout_s:g} s")
            await asyncio.sleep(0.25)

    async def metadata(self) -> ModelInfo:
        async def call() -> ModelInfo:
            c = await self.grpc_client()
            return ModelInfo.from_triton(
                await c.get_model_metadata(self.model, as_json=True, client_timeout=10.0),
                (await c.get_model_config(self.model, as_json=True, client_timeout=10.0))["config"])
        return await self._unary(call)

    async def _unary(self, call: Callable[[], Awaitable[T]]) -> T:
        delays = self.retry.delays()
        while True:
            try:
                return await call()
            except (InferenceServerException, grpc.RpcError) as e:
                exc: EdgeVLMError = from_triton(e)
                delay = next(delays, None) if self.retry.retries(exc) else None
                if delay is None:
                    raise exc from e
            await asyncio.sleep(delay)
