"""Sync client: `stream()` yields text deltas over gRPC bidirectional streaming; `generate()`
returns the whole answer with the server's stats."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from edgevlm_client.chat import Chat
from edgevlm_client.connection import TLS, Retry
from edgevlm_client.contract import MODEL, STATS_ERROR
from edgevlm_client.errors import EdgeVLMError, ServerError, ServerUnavailable, Timeout, from_triton
from edgevlm_client.request import (ModelInfo, Result, build_inputs, cancel_inputs, cancel_wait_s, is_final,
                                    new_request_id, read_logprobs, read_response, split_options)

DEFAULT_URL = "127.0.0.1:8001"
T = TypeVar("T")


class Stream:
    """Iterate for text deltas; afterwards `.text` is the answer and `.stats` the server's stats.

    Closing it early (break, exception, `close()`, or dropping an iterator taken with `iter()`
    before its end) stops the generation on the server with a
    cancel message on the same stream (contract.CANCEL), waits for its final response and
    then closes the stream; only a server that does not answer the cancel in time gets a
    gRPC-level cancel (tritonserver 2.51 can crash when one races a response).
    """
    response_format: dict | None = None  # the constraint asked for, if any

    def __init__(self, client: Client, inputs, timeout_s: float):
        self.stats: dict = {}
        self.text = ""
        self.logprobs: list[dict] = []  # with logprobs=k: every token's so far (contract.LOGPROBS)
        self._client, self._inputs, self._timeout_s = client, inputs, timeout_s
        self._done = self._received = False
        self._status = None  # the Triton status a refusal announced in its stats
        self._grpc = None
        self._open()

    def _open(self) -> None:
        q = self._q = queue.Queue()  # one per attempt: a late callback of a failed one lands nowhere
        self._id = new_request_id()
        self._live = True  # the server holds the request until its final response or an error
        self._grpc = self._client.grpc_client()
        try:
            self._grpc.start_stream(callback=lambda result, error: q.put((result, error)))
            self._grpc.async_stream_infer(self._client.model, self._inputs, request_id=self._id,
                                          enable_empty_final_response=True)
        except InferenceServerException as e:
            q.put((None, e))

    def __iter__(self) -> Iterator[str]:
        delays = self._client.retry.delays()
        try:
            while not self._done:
                try:
                    result, error = self._q.get(timeout=self._timeout_s)
                except queue.Empty:
                    raise Timeout(f"no response within {self._timeout_s:g} s") from None
                if error is not None:
                    self._live = False  # an error ends the request
                    exc = from_triton(error, self._status)
                    delay = next(delays, None) if self._client.retry.retries(exc) and not self._received else None
                    if delay is None:
                        raise exc from error
                    self._close()
                    time.sleep(delay)
                    self._open()
                    continue
                delta, stats = read_response(result)
                if STATS_ERROR in stats:  # the refusal itself follows as the error
                    self._status = stats[STATS_ERROR].get("status")
                    continue
                self._received = True
                self.logprobs += read_logprobs(result)
                self.stats = stats or self.stats
                if delta:
                    self.text += delta
                    yield delta
                if is_final(result):
                    self._done, self._live = True, False
                    if not self.stats:  # every finished generation ends with its stats
                        raise ServerError("the stream ended without an answer")
        finally:
            self._close()

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _close(self) -> None:
        if self._grpc is None:
            return
        try:
            if self._live:
                self._cancel()
            self._grpc.stop_stream(cancel_requests=self._live)  # still live: the cancel went unanswered
        finally:
            self._grpc.close()
            self._grpc = None

    def _cancel(self) -> None:
        """Send a cancel message for the running generation and wait for both final responses
        (the generation's, with its stats, and the message's)."""
        cancel_id = f"{self._id}-cancel"
        try:
            self._grpc.async_stream_infer(self._client.model, cancel_inputs(self._id), request_id=cancel_id,
                                          enable_empty_final_response=True)
        except InferenceServerException:
            return
        deadline = time.monotonic() + cancel_wait_s(self._timeout_s)
        pending = {self._id, cancel_id}
        while pending:
            try:
                result, error = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if error is not None:  # a server that refuses the message, or a broken stream
                return
            if is_final(result):
                pending.discard(result.get_response().id)
                if result.get_response().id == self._id:
                    self._live = False
                    self.stats = read_response(result)[1] or self.stats


class Client:
    """Talks to the `mobilevlm` model over gRPC. Each request opens its own stream, so one
    Client serves many threads at once.

    timeout_s: the longest wait for the next response (a stream may run longer in all).
    tls: TLS(...) for a server started with gRPC TLS. retry: for connection failures only.
    """

    def __init__(self, url: str = DEFAULT_URL, *, model: str = MODEL, timeout_s: float = 300.0,
                 tls: TLS | None = None, retry: Retry = Retry()):
        self.url, self.model, self.timeout_s, self.tls, self.retry = url, model, timeout_s, tls, retry

    def grpc_client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.url, **(self.tls.client_kwargs() if self.tls else {}))

    def stream(self, prompt: str, *, image=None, timeout_s: float | None = None, **options) -> Stream:
        """Text deltas as they are generated. image: path, bytes, PIL image or uint8 array.
        Options: max_tokens, temperature, top_p, top_k, repetition_penalty, seed, presence_penalty,
        frequency_penalty, min_tokens, ignore_eos, logprobs (k alternatives: Result.logprobs), tools
        (OpenAI's list; tool_choice, parallel_tool_calls; Result.tool_calls), stop, system,
        history, raw_prompt; and at most one constraint on the answer: json_schema={...},
        json_object=True, regex="...", choices=[...] (or response_format={...} as the wire
        contract has it)."""
        options, fmt = split_options(options)
        s = Stream(self, build_inputs(prompt, image, response_format=fmt, **options), timeout_s or self.timeout_s)
        s.response_format = fmt
        return s

    def generate(self, prompt: str, *, image=None, timeout_s: float | None = None, **options) -> Result:
        """The whole answer. With json_schema= (or another constraint) `result.parsed` is the
        parsed object."""
        s = self.stream(prompt, image=image, timeout_s=timeout_s, **options)
        for _ in s:
            pass
        return Result(s.text, s.stats, s.response_format, s.logprobs if "logprobs" in options else None)

    def chat(self, image=None, **options) -> Chat:
        """A multi-turn conversation, about `image` if given (see Chat)."""
        return Chat(self, image, **options)

    def health(self) -> bool:
        """Server and model ready; never raises."""
        try:
            with self.grpc_client() as c:
                return c.is_server_ready(client_timeout=5.0) and c.is_model_ready(self.model, client_timeout=5.0)
        except InferenceServerException:
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.health():
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{self.url}: not ready after {timeout_s:g} s")
            time.sleep(0.25)

    def metadata(self) -> ModelInfo:
        def call() -> ModelInfo:
            with self.grpc_client() as c:
                return ModelInfo.from_triton(c.get_model_metadata(self.model, as_json=True, client_timeout=10.0),
                                             c.get_model_config(self.model, as_json=True, client_timeout=10.0)["config"])
        return self._unary(call)

    def _unary(self, call: Callable[[], T]) -> T:
        delays = self.retry.delays()
        while True:
            try:
                return call()
            except InferenceServerException as e:
                exc: EdgeVLMError = from_triton(e)
                delay = next(delays, None) if self.retry.retries(exc) else None
                if delay is None:
                    raise exc from e
                time.sleep(delay)
