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
from edgevlm_client.request import (ModelInfo, Result, build_inputs, cancel_inputs, cancel_wait_s,
                                    new_request_id, read_logprobs, read_response, split_options)

T = TypeVar("T")


_END = (None, None)  # the server closed the stream


class _Call:
    """One gRPC stream. Requests go in through a queue (the generation, later perhaps its
    cancel message; None half-closes the stream); responses come out through another, read by
    a task of its own: a cancelled wait for a response (a timeout, a task being cancelled)
    then never cancels the RPC itself, so the stream can still be ended in band."""

    def __init__(self, grpc_client: grpcaio.InferenceServerClient, request: dict):
        self.requests: asyncio.Queue = asyncio.Queue()
        self.responses: asyncio.Queue = asyncio.Queue()
        self.requests.put_nowait(request)
        self.call = grpc_client.stream_infer(self._feed())
        self.reader = asyncio.ensure_future(self._read())

    async def _feed(self):
        while (request := await self.requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        try:
            async for item in self.call:
                self.responses.put_nowait(item)
        except (InferenceServerException, grpc.RpcError) as e:
            self.responses.put_nowait((None, e))
        finally:
            self.responses.put_nowait(_END)

    async def next(self):
        """(result, error) of the next response; StopAsyncIteration once the server closed the stream."""
        item = await self.responses.get()
        if item is _END:
            self.responses.put_nowait(_END)  # for any later reader
            raise StopAsyncIteration
        return item

    def cancel(self) -> None:
        """The gRPC-level cancel: only for a server that did not end the stream when asked."""
        self.call.cancel()
        self.reader.cancel()


class AsyncStream:
    """`async for delta in stream`; afterwards `.text` and `.stats`. Leaving the loop early, or
    `await stream.aclose()`, stops the generation with a cancel message on the same stream and
    waits for its final response, as the sync Stream does."""
    response_format: dict | None = None  # the constraint asked for, if any

    def __init__(self, client: AsyncClient, inputs, timeout_s: float, retry: Retry):
        self.stats: dict = {}
        self.text = ""
        self.logprobs: list[dict] = []  # with logprobs=k: every token's so far (contract.LOGPROBS)
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

    async def _run(self) -> AsyncIterator[str]:
        delays = self._retry.delays()
        received = False
        while True:
            call, status, live = None, None, False
            request_id = new_request_id()
            try:
                call = _Call(await self._client.grpc_client(),
                             {"model_name": self._client.model, "inputs": self._inputs, "request_id": request_id})
                live = True
                while True:
                    try:
                        result, error = await asyncio.wait_for(call.next(), self._timeout_s)
                    except asyncio.TimeoutError:
                        raise Timeout(f"no response within {self._timeout_s:g} s") from None
                    except StopAsyncIteration:
                        live = False
                        raise ServerError("the stream ended without an answer") from None
                    if error is not None:
                        live = False  # an error ends the request
                        raise error
                    delta, stats = read_response(result)
                    if STATS_ERROR in stats:  # the refusal itself follows as the error
                        status = stats[STATS_ERROR].get("status")
                        continue
                    received = True
                    self.logprobs += read_logprobs(result)
                    if delta:
                        self.text += delta
                        yield delta
                    if stats:  # the last response of every finished generation
                        self.stats, live = stats, False
                        return
            except (InferenceServerException, grpc.RpcError) as e:
                exc: EdgeVLMError = from_triton(e, status)
                delay = next(delays, None) if self._retry.retries(exc) and not received else None
                if delay is None:
                    raise exc from e
            finally:
                if call is not None:
                    # shielded: when this task is being cancelled (a gateway's HTTP client went
                    # away, Ctrl-C) the cancel message still goes out and the stream still closes
                    # gracefully, in a task of its own if this one cannot wait
                    await asyncio.shield(self._end(call, request_id, live))
            await asyncio.sleep(delay)

    async def _end(self, call: _Call, request_id: str, live: bool) -> None:
        """Close the stream; a generation still running is stopped first by a cancel message,
        and only a server that does not answer it in time gets a gRPC-level cancel."""
        wait = cancel_wait_s(self._timeout_s)
        if live:
            cancel_id = f"{request_id}-cancel"
            call.requests.put_nowait({"model_name": self._client.model, "inputs": cancel_inputs(request_id),
                                      "request_id": cancel_id})
            pending = {request_id, cancel_id}
            try:
                await asyncio.wait_for(self._finals(call, pending, request_id), wait)
            except (asyncio.TimeoutError, StopAsyncIteration):
                pass
            live = bool(pending)
        call.requests.put_nowait(None)
        if live:
            call.cancel()
            return
        try:  # half-closed: the server ends the stream once every request on it has finished
            await asyncio.wait_for(call.reader, wait)
        except asyncio.TimeoutError:
            call.cancel()

    async def _finals(self, call: _Call, pending: set[str], request_id: str) -> None:
        """Read until each request in `pending` has had its final response (the one with stats)."""
        while pending:
            result, error = await call.next()
            if error is not None:
                return
            stats = read_response(result)[1]
            if stats and STATS_ERROR not in stats:
                pending.discard(result.get_response().id)
                if result.get_response().id == request_id:
                    self.stats = stats


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
        return Result(s.text, s.stats, s.response_format, s.logprobs if "logprobs" in options else None)

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
