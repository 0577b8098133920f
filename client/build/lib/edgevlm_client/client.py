"""Sync client: `stream()` yields text deltas over gRPC bidirectional streaming; `generate()`
returns the whole answer with the server's timing stats."""

from __future__ import annotations

import io
import json
import queue
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from edgevlm_client.errors import InvalidRequest, ServerError, ServerUnavailable, Timeout, from_triton

DEFAULT_URL = "127.0.0.1:8001"
MODEL = "mobilevlm"


@dataclass
class Result:
    text: str
    stats: dict = field(default_factory=dict)

    @property
    def finish_reason(self) -> str:
        return self.stats.get("finish_reason", "")

    @property
    def tokens(self) -> int:
        return int(self.stats.get("decode_tokens", 0))


def image_bytes(image) -> bytes:
    """A path, encoded bytes, a PIL image or an HxWx3 uint8 array -> encoded image bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        try:
            return Path(image).read_bytes()
        except OSError as e:
            raise InvalidRequest(f"cannot read image {image}: {e.strerror}") from e
    try:
        from PIL import Image
    except ImportError:
        raise InvalidRequest("pass images as paths or bytes, or install Pillow "
                             "(edgevlm-client[images]) for PIL images and arrays") from None
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InvalidRequest(f"unsupported image type {type(image).__name__}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _tensor(name: str, value, dtype: str) -> grpcclient.InferInput:
    np_type = {"BYTES": object, "BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}[dtype]
    arr = np.array(value if isinstance(value, list) else [value], dtype=np_type)
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def build_inputs(prompt: str, image=None, *, raw_prompt: bool = False,
                 history: Sequence[tuple[str, str]] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop: Sequence[str] | None = None) -> list[grpcclient.InferInput]:
    inputs = [_tensor("prompt", prompt.encode("utf-8"), "BYTES")]
    if image is not None:
        inputs.append(_tensor("image", image_bytes(image), "BYTES"))
    if raw_prompt:
        inputs.append(_tensor("raw_prompt", True, "BOOL"))
    if history:
        inputs.append(_tensor("history", json.dumps([list(t) for t in history]).encode("utf-8"), "BYTES"))
    for name, value, dtype in (("max_tokens", max_tokens, "INT32"), ("temperature", temperature, "FP32"),
                               ("top_p", top_p, "FP32"), ("top_k", top_k, "INT32"),
                               ("repetition_penalty", repetition_penalty, "FP32"), ("seed", seed, "INT64")):
        if value is not None:
            inputs.append(_tensor(name, value, dtype))
    if stop:
        inputs.append(_tensor("stop", [s.encode("utf-8") for s in stop], "BYTES"))
    return inputs


class Stream:
    """Iterate for text deltas; afterwards `.stats` holds the server's final stats.

    Closing it early (break, exception, `close()`) cancels the request on the server.
    """

    def __init__(self, url: str, model: str, inputs, timeout_s: float):
        self.stats: dict = {}
        self.text = ""
        self._done = False
        self._q: queue.Queue = queue.Queue()
        self._timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url)
        try:
            self._client.start_stream(callback=lambda result, error: self._q.put((result, error)))
            self._client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        except InferenceServerException as e:
            self._close(cancel=False)
            raise from_triton(e) from e

    def __iter__(self) -> Iterator[str]:
        try:
            while not self._done:
                try:
                    result, error = self._q.get(timeout=self._timeout_s)
                except queue.Empty:
                    raise Timeout(f"no response within {self._timeout_s:.0f} s") from None
                if error is not None:
                    raise from_triton(error) from error
                response = result.get_response()
                final = response.parameters["triton_final_response"].bool_param
                if response.outputs:
                    delta = result.as_numpy("text")[0].decode("utf-8")
                    stats = result.as_numpy("stats")[0]
                    if stats:
                        self.stats = json.loads(stats)
                    if delta:
                        self.text += delta
                        yield delta
                if final:
                    self._done = True
                    if not self.stats:  # every finished generation ends with its stats
                        raise ServerError("the stream ended without an answer")
        finally:
            self._close(cancel=not self._done)

    def close(self) -> None:
        self._close(cancel=not self._done)

    def _close(self, cancel: bool) -> None:
        if self._client is not None:
            try:
                self._client.stop_stream(cancel_requests=cancel)
            finally:
                self._client.close()
                self._client = None


class Client:
    """Talks to the `mobilevlm` ensemble over gRPC. Each request opens its own stream, so one
    Client serves many threads at once."""

    def __init__(self, url: str = DEFAULT_URL, *, model: str = MODEL, timeout_s: float = 300.0):
        self.url, self.model, self.timeout_s = url, model, timeout_s

    def stream(self, prompt: str, *, image=None, timeout_s: float | None = None, **options) -> Stream:
        """Text deltas as they are generated. Options: max_tokens, temperature, top_p, top_k,
        repetition_penalty, seed, stop, raw_prompt."""
        return Stream(self.url, self.model, build_inputs(prompt, image, **options),
                      timeout_s or self.timeout_s)

    def generate(self, prompt: str, *, image=None, timeout_s: float | None = None, **options) -> Result:
        s = self.stream(prompt, image=image, timeout_s=timeout_s, **options)
        for _ in s:
            pass
        return Result(s.text, s.stats)

    def chat(self, image=None, **options) -> Chat:
        """A multi-turn conversation, about `image` if given (see Chat)."""
        return Chat(self, image, **options)

    def health(self) -> bool:
        try:
            with grpcclient.InferenceServerClient(self.url) as c:
                return c.is_server_ready(client_timeout=5.0) and c.is_model_ready(self.model, client_timeout=5.0)
        except InferenceServerException:
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.health():
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"{self.url}: not ready after {timeout_s:.0f} s")
            time.sleep(0.25)


class Chat:
    """Follow-up questions about the same frame. Each request carries the earlier turns; the
    server lays them out in the model's template, with the image in the first turn."""

    def __init__(self, client: Client, image=None, **options):
        self.client = client
        self.image = image_bytes(image) if image is not None else None  # encoded once
        self.options = options
        self.turns: list[tuple[str, str]] = []

    def stream(self, question: str, **options) -> Iterator[str]:
        """Text deltas of the answer; the turn joins the history once the answer is complete."""
        s = self.client.stream(question, image=self.image, history=self.turns, **{**self.options, **options})
        yield from s
        self.turns.append((question, s.text.strip()))

    def ask(self, question: str, **options) -> Result:
        s = self.client.stream(question, image=self.image, history=self.turns, **{**self.options, **options})
        for _ in s:
            pass
        self.turns.append((question, s.text.strip()))
        return Result(s.text, s.stats)
