"""OpenAI-compatible HTTP gateway in front of the Triton gRPC server (Starlette + uvicorn).

    POST /v1/chat/completions   text and image_url parts, `stream: true` as server-sent events
    GET  /v1/models             the one model served
    GET  /health                200 when the model server is ready
    GET  /                      a web page that uses the API above (web/: no CDN, strict CSP)

Every answer asked for (`n` of them) is one gRPC stream to `mobilevlm`; nothing is computed here. Remote image
URLs are refused unless enabled, request bodies and images are capped, and a client that
goes away cancels its generation on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgevlm_client import openai_api as api
from edgevlm_client.aio import AsyncClient
from edgevlm_client.connection import TLS, Retry
from edgevlm_client.contract import MAX_VIDEO_BYTES
from edgevlm_client.errors import EdgeVLMError

MB = 1 << 20
WEB = Path(__file__).resolve().parent / "web"
PAGE_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "app.css": "text/css; charset=utf-8"}
# The page loads only its own files; images are data: URLs, the camera a local stream.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                "media-src 'self' data: blob: mediastream:; object-src 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class GatewayConfig:
    grpc_url: str = "127.0.0.1:8001"
    tls: TLS | None = None
    model_id: str | None = None        # default: the checkpoint name the server reports
    api_key: str | None = None         # when set, requests need "Authorization: Bearer <key>"
    allow_remote_images: bool = False  # fetch http(s) image URLs (off: the gateway makes no outbound calls)
    video_dir: str | None = None  # video_url may name a file under this directory (off: data: URLs only)
    max_body_bytes: int = 20 * MB
    max_image_bytes: int = 10 * MB
    remote_timeout_s: float = 10.0
    timeout_s: float = 300.0           # longest wait for the model server's next response


def _error(e: api.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class Gateway:
    def __init__(self, config: GatewayConfig):
        self.config = config
        # A full model queue is answered 429 + Retry-After at once, not retried here: the
        # HTTP client (the OpenAI SDKs retry 429) decides when to come back.
        self.client = AsyncClient(config.grpc_url, tls=config.tls, timeout_s=config.timeout_s,
                                  retry=Retry(busy=False))
        self._model_id = config.model_id

    async def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = (await self.client.metadata()).model_name or self.client.model
        return self._model_id

    def _authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.config.api_key.encode()):
            raise api.APIError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                               type="authentication_error", code="invalid_api_key")

    async def _json_body(self, request: Request):
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise api.APIError(413, f"request body is {declared} bytes, over the {limit} byte limit",
                               code="body_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise api.APIError(413, f"request body is over the {limit} byte limit", code="body_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise api.APIError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:  # "[[[[..." 100 000 deep exhausts the parser's stack
            raise api.APIError(400, "request body nests too deeply") from None

    async def _image(self, url: str | None) -> bytes | None:
        if url is None:
            return None
        if url.startswith("data:"):
            return api.decode_data_url(url, self.config.max_image_bytes)
        if not url.startswith(("http://", "https://")):
            raise api.APIError(400, "image_url must be a data: URL" +
                               (" or http(s)" if self.config.allow_remote_images else ""), param="image_url")
        if not self.config.allow_remote_images:
            raise api.APIError(400, "remote image URLs are disabled on this gateway: send the image as a "
                               "base64 data URL (or start the gateway with --allow-remote-images)",
                               param="image_url", code="remote_images_disabled")
        return await asyncio.to_thread(self._fetch, url)

    def _video(self, url: str) -> bytes:
        """A clip: a data:video/... URL, or a file under the gateway's --video-dir (a path or
        file:// URL; nothing outside it, nothing when it is not set)."""
        if url.startswith("data:"):
            return api.decode_data_url(url, MAX_VIDEO_BYTES, kind="video")
        if self.config.video_dir is None:
            raise api.APIError(400, "video_url must be a data: URL (this gateway reads no files: start it with "
                               "--video-dir to allow a directory)", param="video_url")
        root = Path(self.config.video_dir).resolve()
        path = Path(url.removeprefix("file://")).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise api.APIError(400, f"video_url: no such file under {root}", param="video_url")
        if path.stat().st_size > MAX_VIDEO_BYTES:
            raise api.APIError(413, f"video is over the {MAX_VIDEO_BYTES} byte limit", param="video_url",
                               code="video_too_large")
        return path.read_bytes()

    def _fetch(self, url: str) -> bytes:
        limit = self.config.max_image_bytes
        try:
            with urllib.request.urlopen(url, timeout=self.config.remote_timeout_s) as r:
                data = r.read(limit + 1)
        except Exception as e:  # URLError, HTTPError, timeouts, bad hosts: all the caller's URL
            raise api.APIError(400, f"cannot fetch image_url: {e}", param="image_url") from None
        if len(data) > limit:
            raise api.APIError(413, f"image is over the {limit} byte limit", param="image_url",
                               code="image_too_large")
        return data

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        mid = await self.model_id()
        return JSONResponse({"object": "list", "data": [
            {"id": mid, "object": "model", "created": 0, "owned_by": "edgevlm"}]})

    async def page(self, request: Request) -> Response:
        """The demo page and its two files (web/): everything local, nothing from a CDN."""
        name = request.path_params.get("name", "index.html")
        if name not in PAGE_FILES:
            raise api.APIError(404, f"no such file: {name}", code="not_found")
        return Response((WEB / name).read_bytes(), media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    async def health(self, request: Request) -> Response:
        ok = await self.client.health()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        req = api.parse_chat_request(await self._json_body(request))
        mid = await self.model_id()
        if req.model not in (mid, self.client.model):
            raise api.APIError(404, f"model {req.model!r} is not served here; this gateway serves {mid!r}",
                               param="model", code="model_not_found")
        images = [await self._image(url) for url in req.image_urls]
        image = images if len(images) > 1 else images[0] if images else None
        video = await asyncio.to_thread(self._video, req.video_url) if req.video_url else None
        # n answers are n streams, one row of the model's batch each: the first prefill is
        # stored in the prefix cache and the others start from it
        streams = [self.client.stream(req.question, image=image, video=video, history=req.history, system=req.system,
                                      **api.choice_options(req, i)) for i in range(req.n)]
        cid = api.new_id()
        with_logprobs = "logprobs" in req.options
        if not req.stream:
            try:
                await asyncio.gather(*(_drain(s) for s in streams))
            finally:
                for s in streams:
                    await _closed(s)
            return JSONResponse(api.completion(cid, mid, [(s.text, s.stats, s.logprobs if with_logprobs else None)
                                                          for s in streams]))
        # Wait for each choice's first text before answering, so a refused request still gets
        # its status.
        deltas = [s.__aiter__() for s in streams]
        try:
            firsts = await asyncio.gather(*(_first(d) for d in deltas))
        except BaseException:
            for s in streams:
                await _closed(s)
            raise
        return StreamingResponse(self._events(streams, deltas, firsts, cid, mid, req.include_usage, with_logprobs,
                                              "tools" in req.options),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _events(self, streams, deltas: list[AsyncIterator[str]], firsts: list[str], cid: str, mid: str,
                      include_usage: bool, logprobs: bool, tools: bool) -> AsyncIterator[bytes]:
        """Chunks of every choice as they come (`index` says whose), each choice's finish chunk
        when it ends, then the usage and [DONE]. With tools, an answer that opens with "[" or "{"
        is calls (the grammar allows no text to): they go out as `tool_calls` deltas
        (api.CallStream), never as text."""
        created, sent = int(time.time()), [0] * len(streams)
        calling = [api.CallStream() if tools and first.startswith(("[", "{")) else None for first in firsts]

        def chunk(i: int, delta: dict, finish: str | None = None) -> dict:
            entries = None
            if logprobs:  # the tokens choice i received since its previous chunk
                entries, sent[i] = streams[i].logprobs[sent[i]:], len(streams[i].logprobs)
            return api.chunk(cid, mid, delta, finish, created=created, logprobs=entries, index=i)

        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for delta in deltas[i]:
                    await merged.put((i, delta, None))
                await merged.put((i, None, None))
            except BaseException as e:  # noqa: B036 - handed to the writer, which ends the response
                await merged.put((i, None, e))
        tasks = []
        try:
            for i, first in enumerate(firsts):
                if calling[i] is None:
                    yield _sse(chunk(i, {"role": "assistant", "content": first}))
                    continue
                yield _sse(chunk(i, {"role": "assistant", "content": None}))
                for call in calling[i].feed(first):
                    yield _sse(chunk(i, {"tool_calls": [call]}))
            tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
            running = len(streams)
            while running:
                i, delta, error = await merged.get()
                if error is not None:
                    raise error
                if delta is not None:
                    if calling[i] is None:
                        yield _sse(chunk(i, {"content": delta}))
                    else:  # calls, streamed as OpenAI streams them: name first, then argument pieces
                        for call in calling[i].feed(delta):
                            yield _sse(chunk(i, {"tool_calls": [call]}))
                    continue
                running -= 1
                last = chunk(i, {}, streams[i].stats.get("finish_reason") or "stop")
                last["edgevlm"] = streams[i].stats  # not OpenAI's: the timings the web page shows (SDKs ignore it)
                yield _sse(last)
            if include_usage:
                yield _sse(api.usage_chunk(cid, mid, [s.stats for s in streams], created=created))
            yield _sse("[DONE]")
        except EdgeVLMError as e:  # after the status line: the error goes in the stream
            yield _sse(api.from_client_error(e).body())
        finally:  # also on client disconnect: stops the generations with cancel messages
            for t in tasks:
                t.cancel()
            for s in streams:
                await _closed(s)


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def _first(deltas: AsyncIterator[str]) -> str:
    try:
        return await deltas.__anext__()
    except StopAsyncIteration:
        return ""


async def _closed(stream) -> None:
    """Close a stream even while this task is being cancelled (the HTTP client went away): the
    close sends a cancel message and waits, boundedly, for the generation's final response."""
    with anyio.CancelScope(shield=True):
        await stream.aclose()


def create_app(config: GatewayConfig) -> Starlette:
    gw = Gateway(config)

    async def api_error(request, exc: api.APIError):
        return _error(exc)

    async def client_error(request, exc: EdgeVLMError):
        return _error(api.from_client_error(exc))

    async def http_error(request, exc: HTTPException):
        return _error(api.APIError(exc.status_code, exc.detail or "error",
                                   type="invalid_request_error" if exc.status_code < 500 else "server_error"))

    async def unexpected(request, exc: Exception):
        return _error(api.APIError(500, f"gateway error: {type(exc).__name__}: {exc}", type="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await gw.client.close()

    app = Starlette(routes=[
        Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/health", gw.health, methods=["GET"]),
        Route("/", gw.page, methods=["GET"]),
        Route("/static/{name}", gw.page, methods=["GET"]),
    ], exception_handlers={api.APIError: api_error, EdgeVLMError: client_error, HTTPException: http_error,
                           Exception: unexpected}, lifespan=lifespan)
    app.state.gateway = gw
    return app


def serve(config: GatewayConfig, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    import uvicorn
    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level)
