"""A request's way from its tensors to the scheduler.

Checked and preprocessed at once (requests.py: prompt, template, tokens, parameters; each
image decoded and resized unless its embeddings are in the image cache; a clip only checked),
then refused or taken: a text-only request or one whose images are all cached goes to the
scheduler directly; one with images to encode first holds a queue place (so a full server
refuses before that work) and hands each of them to the image batcher, whose thread encodes
every image that arrived meanwhile in one vision-encoder call and hands each its rows; those
become the image's tokens (LLaVA-1.6: tiles packed into one picture) and enter the image
cache; once the request's last image is in, it enters the scheduler. A clip is decoded on a
thread of its own first (two passes over the file would hold up the requests behind it),
then encoded the same way. The place is given back on every path, whatever fails after the
encode.

A cancel message (contract.CANCEL: a request holding only the id of a generation to stop)
marks that generation, which the scheduler ends at its next step with its final response.
Generations are known by the request id their client gave them, from their admission until
their final response.

No Triton here: the `mobilevlm` model passes each request's inputs, id and stream.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
from edgevlm_client.contract import CANCEL, MAX_REQUEST_ID_CHARS

from edgevlm.manifest import OnnxArtifacts
from edgevlm.presets import MLLAMA
from edgevlm.runtime import requests
from edgevlm.runtime.batcher import Batcher
from edgevlm.runtime.errors import BadRequest
from edgevlm.runtime.events import Event
from edgevlm.runtime.image_cache import ImageCache, image_digest
from edgevlm.runtime.observer import Observer, outcome_of
from edgevlm.runtime.runners import cpu_form
from edgevlm.runtime.scheduler import Request, Scheduler
from edgevlm.runtime.video import DEFAULT_FRAMES


class Stream(Protocol):
    """Where one request's events go (the Triton model's response sender, in process a queue)."""

    def emit(self, event: Event) -> None: ...

    def fail(self, exc: Exception) -> None: ...

    def cancelled(self) -> bool: ...


Encode = Callable[[np.ndarray], tuple[np.ndarray, float]]  # pixel_values -> (features, ms)


def open_preprocessor(onnx_dir, tokenizer, max_image_pixels: int, template: str | None = None):
    """The export's request preprocessor, and the image encoder it runs in process (None: the
    `vision_encoder` model, through Triton). A cross-attention model encodes in process: what
    its encoder makes is too large to cross Triton (cross_requests.CrossImageEncoder).
    template: the prompt layout served by default (None: the export's)."""
    if OnnxArtifacts.open(onnx_dir).config.family == MLLAMA:
        from edgevlm.runtime.cross_requests import CrossImageEncoder, CrossPreprocessor
        return CrossPreprocessor(onnx_dir, max_image_pixels, tokenizer), CrossImageEncoder(onnx_dir)
    return requests.Preprocessor(onnx_dir, max_image_pixels, tokenizer, template), None


class _Named:
    """A generation's stream while it is known by its request id: a cancel message sets
    `stop`; its final response (or failure) forgets the id."""

    def __init__(self, stream: Stream, forget: Callable[[], None]):
        self.stream, self.forget = stream, forget
        self.stop = threading.Event()

    def cancelled(self) -> bool:
        return self.stop.is_set() or self.stream.cancelled()

    def emit(self, event: Event) -> None:
        if event.final:
            self.forget()
        self.stream.emit(event)

    def fail(self, exc: Exception) -> None:
        self.forget()
        self.stream.fail(exc)


class _Gathered:
    """A request's images as their encodes come back (from the batcher's thread, in any
    order): it goes to the scheduler once the last is in, or fails once."""

    def __init__(self, images: list, missing: int):
        self.images, self.missing = images, missing
        self.encode_ms, self.failed = 0.0, False
        self.lock = threading.Lock()

    def add(self, i: int, image, encode_ms: float) -> bool:
        """True for the image that completes the request (none after a failure)."""
        with self.lock:
            self.images[i] = image
            self.encode_ms += encode_ms
            self.missing -= 1
            return self.missing == 0 and not self.failed

    def fail(self) -> bool:
        """True the first time: the request fails once."""
        with self.lock:
            first, self.failed = not self.failed, True
            return first

    def done(self) -> bool:
        """Nothing more will use the queue place: failed, or every image in."""
        with self.lock:
            return self.failed or self.missing == 0


def open_video_encoder(onnx_dir, threads: int | None = None) -> Encode | None:
    """LLaVA-NeXT-Video's clip encoder, run in the serving process (ONNX Runtime): frames ->
    (each frame's pooled tokens, ms). None for a model without video."""
    art = OnnxArtifacts.open(onnx_dir)
    key = cpu_form(art, "video_encoder")  # a quantized export's int8 twin
    if key not in art.manifest["files"]:
        if art.config.video_pool:  # read as pictures, its frames would answer wrongly
            raise ValueError(f"{art.root}: {art.config.name} pools a clip's frames, but the export has no video "
                             "encoder (re-export it: make onnx, make quantize)")
        return None
    from edgevlm.runtime.onnxruntime import OrtVisionEncoder
    encoder = OrtVisionEncoder(art.path(key), threads)

    def encode(frames: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        out = encoder(frames)
        return out, (time.perf_counter() - t0) * 1e3
    return encode


class Intake:
    def __init__(self, pre: requests.Preprocessor, scheduler: Scheduler, encode: Encode, *,
                 image_cache: ImageCache, observer: Observer, max_batch: int, default_max_tokens: int,
                 encode_video: Encode | None = None):
        self.pre, self.scheduler = pre, scheduler
        self.image_cache, self.obs = image_cache, observer
        self.default_max_tokens = default_max_tokens
        self.images = Batcher(encode, max_batch=max_batch)
        # clips of concurrent requests encoded together, up to a default clip's frames per call
        self.videos = Batcher(encode_video, max_batch=DEFAULT_FRAMES) if encode_video is not None else None
        # clips are decoded here, one at a time, not on the thread that admits requests
        self.clips = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-decoder")
        self.named: dict[str, _Named] = {}  # request id -> its generation, while it runs
        self.lock = threading.Lock()  # guards `named`

    def close(self) -> None:
        self.clips.shutdown(wait=True)  # before the batchers its decodes feed
        self.images.close()
        if self.videos is not None:
            self.videos.close()

    def cancel(self, inputs: dict[str, np.ndarray]) -> bool:
        """A cancel message: stop the generation it names (False: none is running by that id,
        it may have ended already)."""
        self.obs.cancel_message()
        with self.lock:
            target = self.named.get(requests.text(inputs[CANCEL], CANCEL))
        if target is not None:
            target.stop.set()
        return target is not None

    def _name(self, stream: Stream, request_id: str) -> _Named:
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise BadRequest(f"request id is {len(request_id)} characters, over the {MAX_REQUEST_ID_CHARS} limit")
        named = _Named(stream, lambda: self._forget(request_id, named))
        with self.lock:
            if request_id in self.named:
                raise BadRequest(f"request id {request_id!r} is already in use by a running generation")
            self.named[request_id] = named
        return named

    def _forget(self, request_id: str, named: _Named) -> None:
        with self.lock:
            if self.named.get(request_id) is named:
                del self.named[request_id]

    def accept(self, inputs: dict[str, np.ndarray], stream: Stream, request_id: str = "") -> None:
        """Take one request (its inputs by contract name; `request_id`: its client's id, which a
        cancel message names). Raises what refuses it at once (BadRequest, Busy); a later
        failure ends the stream through stream.fail."""
        images = requests.check_images(requests.image_list(inputs))
        keys = [image_digest(data) for data in images]
        clip = requests.clip_bytes(inputs)
        if clip is not None:  # the same clip sampled at another frame count is another entry
            frames = requests.scalar(inputs, "video_frames", "iu", int)
            keys.append(image_digest(image_digest(clip) + f"|frames={frames or DEFAULT_FRAMES}".encode()))
        cached = [self.image_cache.get(key) if self.image_cache.budget else None for key in keys]
        tools = requests.toolset(inputs, self.pre.tool_style)
        prepared = self.pre.from_inputs(inputs, decode=[c is None for c in cached], tools=tools)
        for image, key, hit in zip(prepared.images, keys, cached):
            image.digest = key
            if self.image_cache.budget:
                self.obs.image(hit is not None, self.image_cache.bytes)
        params = requests.sampling_params(inputs, self.default_max_tokens)
        if tools is not None:
            if params.response_format is not None:
                raise BadRequest("tools and response_format exclude each other (a call's arguments follow its schema)")
            params = dataclasses.replace(params, grammar=tools.grammar())
        ids = prepared.input_ids.tolist()
        self.scheduler.check(ids, sum(self.pre.image_positions(c, p) for c, p in zip(cached, prepared.images)),
                             params)
        if request_id:
            stream = self._name(stream, request_id)
        try:
            self._start(stream, ids, params, prepared, cached, tools)
        except BaseException:
            if isinstance(stream, _Named):
                stream.forget()
            raise

    def _decode_clip(self, clip, done) -> None:
        """On the clip decoder's thread: read the frames, then hand them to the video encoder
        (a model without one reads them as pictures); a failure ends the request."""
        try:
            self.pre.decode_clip(clip)
            (self.videos or self.images).put(clip.pixel_values, done)
        except Exception as e:
            done(None, 0.0, e)

    def _start(self, stream: Stream, ids: list[int], params, prepared, cached: list, tools) -> None:
        clip = next((i for i, p in enumerate(prepared.images) if p.kind == "video"), None)

        def request(images: list, encode_ms=0.0) -> Request:
            fields = {"image_embeds": None, "tools": tools, **self.pre.attach(ids, prepared.placed(images))}
            video = {}
            if clip is not None:  # its frames as read (a cached clip's from its rows)
                per_frame = self.pre.cfg.frame_tokens
                video = dict(frames=images[clip].shape[0] // per_frame, frame_tokens=per_frame,
                             video_decode_ms=prepared.images[clip].decode_ms)
            return Request(ids, params=params, emit=stream.emit, fail=stream.fail, cancelled=stream.cancelled,
                           image_encode_ms=encode_ms, image_cached=bool(images) and all(c is not None for c in cached),
                           **video, **fields)
        missing = [i for i, c in enumerate(cached) if c is None]
        if not missing:
            self.scheduler.submit(request(cached))
            return
        place = self.scheduler.reserve()
        gathered = _Gathered(list(cached), len(missing))

        def encoded(i: int, features, encode_ms, error) -> None:
            try:
                if error is not None:
                    raise error
                image = self.pre.pack(features, prepared.images[i])  # LLaVA-1.6: tiles -> one picture's tokens
                if self.image_cache.budget:
                    self.image_cache.put(prepared.images[i].digest, image)
                if gathered.add(i, image, encode_ms):  # the request's last image: it goes in
                    self.scheduler.submit(request(gathered.images, gathered.encode_ms), reservation=place)
            except Exception as e:
                place.release()  # before the client hears of it: it may retry at once
                if gathered.fail():  # once, whichever of its images failed first
                    self.obs.finished(outcome_of(e))
                    stream.fail(e)
            finally:
                if gathered.done():
                    place.release()  # a no-op once submit took it or the failure gave it back
        try:
            for i in missing:
                done = lambda features, ms, error, i=i: encoded(i, features, ms, error)  # noqa: E731
                if prepared.images[i].kind == "video":
                    self.clips.submit(self._decode_clip, prepared.images[i], done)
                else:
                    self.images.put(prepared.images[i].pixel_values, done)
        except BaseException:
            gathered.fail()
            place.release()
            raise
