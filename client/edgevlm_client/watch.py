"""Ask about a live video: frames from a file, an RTSP or HTTP stream, or a V4L2 camera,
decoded with PyAV (FFmpeg's demuxers and decoders, one pip wheel with FFmpeg inside; OpenCV
would bring the same FFmpeg plus a GUI and image-processing library the client does not use,
and hides the stream's timestamps and options behind integer property ids).

Latest-frame semantics, as a robot wants them: a thread decodes the source at its own pace
and keeps only the newest frame; the question goes about whichever frame is newest when the
previous answer is done. Frames that arrive meanwhile are dropped and counted, never queued,
so answers never fall behind the camera. A server that is busy (its admission queue full)
refuses at once; that frame is dropped too and the next question takes a fresher one. A file
is played at its own frame rate, as a camera would deliver it.

With clip_seconds, each question goes about the last that many seconds instead of one frame
("did the door open?"): the decoder thread also keeps that window's frames (at most
CLIP_FPS a second, scaled down), and each question sends them as a short clip for a video
model (LLaVA-NeXT-Video) to sample; the first question waits until the window is full.

    async with AsyncClient(url) as client:
        async for answer in watch(client, "rtsp://cam/stream", ["Is anyone at the door?"]):
            print(answer["frame"], answer["answer"])
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from edgevlm_client.errors import InvalidRequest, ServerBusy


CLIP_FPS = 4.0  # frames a second kept for a clip: the server samples 8 by default from it


@dataclass
class Frame:
    index: int            # position in the source, from 0
    pts_s: float | None   # the frame's timestamp in the stream, seconds
    image: bytes          # JPEG, as sent to the server
    clip: bytes | None = None  # with clip_seconds: the window up to this frame, as MP4


class LatestFrame:
    """Decodes a source on a thread, keeping only the newest frame (see the module's doc).

    source: a path, a URL (rtsp://, http://, ...) or a device (/dev/video0 with fmt="v4l2").
    options: FFmpeg demuxer options, e.g. {"rtsp_transport": "tcp"}. realtime: play a file
    at its frame rate (the default for regular files; live sources pace themselves).
    realtime=False reads frame by frame as they are taken, none dropped: every frame of a
    recording, answered in order (a live source then falls behind).
    """

    def __init__(self, source: str, *, fmt: str | None = None, options: dict | None = None,
                 realtime: bool | None = None, jpeg_quality: int = 90, open_timeout_s: float = 10.0,
                 clip_seconds: float = 0.0):
        try:
            import av
        except ImportError:
            raise InvalidRequest("watch needs PyAV: pip install 'edgevlm-client[watch]'") from None
        try:
            self.container = av.open(str(source), format=fmt, options=options or {}, timeout=open_timeout_s)
        except (av.error.FFmpegError, OSError) as e:
            raise InvalidRequest(f"cannot open video source {source}: {e}") from None
        if not self.container.streams.video:
            self.container.close()
            raise InvalidRequest(f"{source}: no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.realtime = os.path.isfile(str(source)) if realtime is None else realtime
        self.lossless = realtime is False
        self.quality = jpeg_quality
        self.decoded = self.dropped = self.taken = 0
        self.error: Exception | None = None
        self._latest = None  # (index, pts_s, av.VideoFrame) not yet taken
        self.clip_seconds = clip_seconds
        self._window: list[tuple[float, object]] = []  # (seconds, scaled PIL image), the last clip_seconds
        self._ended = False
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._decode, name="watch-decoder", daemon=True)
        self._thread.start()

    def _decode(self) -> None:
        start = None
        try:
            for frame in self.container.decode(self.stream):
                if self._stop.is_set():
                    break
                pts = float(frame.time) if frame.time is not None else None
                if self.clip_seconds > 0:
                    self._keep(pts if pts is not None else time.monotonic(), frame)
                if self.realtime and pts is not None:
                    # play at the stream's rate: frame i is due at start + its timestamp
                    start = time.monotonic() - pts if start is None else start
                    if self._stop.wait(max(0.0, start + pts - time.monotonic())):
                        break
                with self._cond:
                    while self.lossless and self._latest is not None and not self._stop.is_set():
                        self._cond.wait(0.5)  # the next frame waits for this one to be taken
                    if self._latest is not None:
                        self.dropped += 1  # replaced before anyone asked about it
                    self._latest = (self.decoded, pts, frame)
                    self.decoded += 1
                    self._cond.notify_all()
        except Exception as e:  # a broken stream ends the watch with its reason
            self.error = e
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _keep(self, t: float, frame) -> None:
        """Add a frame to the clip window (at most CLIP_FPS a second), dropping what is older."""
        from edgevlm_client.clips import MAX_SIDE
        with self._cond:
            if self._window and t - self._window[-1][0] < 1.0 / CLIP_FPS:
                return
        image = frame.to_image()
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        with self._cond:
            self._window.append((t, image))
            while self._window and t - self._window[0][0] > self.clip_seconds:
                self._window.pop(0)

    def _window_full(self) -> bool:
        w = self._window
        return bool(w) and w[-1][0] - w[0][0] >= self.clip_seconds - 1.0 / CLIP_FPS

    def take(self) -> Frame | None:
        """The newest frame not taken yet (waits for one; with clip_seconds, also for a full
        window); None when the source has ended."""
        with self._cond:
            # (frame by frame, lossless, nothing waits for the window: the decoder waits for us)
            while not self._ended and (self._latest is None or (self.clip_seconds > 0 and not self.lossless
                                                                and not self._window_full())):
                self._cond.wait(0.05 if self._latest is not None else None)
            if self._latest is None:
                return None
            index, pts, frame = self._latest
            self._latest = None
            self.taken += 1
            window = [image for _, image in self._window]
            self._cond.notify_all()
        buf = io.BytesIO()
        frame.to_image().save(buf, format="JPEG", quality=self.quality)
        clip = None
        if self.clip_seconds > 0:
            from edgevlm_client.clips import encode_clip
            clip = encode_clip(window, fps=CLIP_FPS)
        return Frame(index, pts, buf.getvalue(), clip)

    def drop(self) -> None:
        """Count a taken frame as dropped after all (the server was busy)."""
        with self._cond:
            self.dropped += 1
            self.taken -= 1

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join()
        self.container.close()


async def watch(client, source: str, questions: Sequence[str], *, every_s: float = 0.0,
                max_frames: int | None = None, fmt: str | None = None, options: dict | None = None,
                realtime: bool | None = None, clip_seconds: float = 0.0, **generation) -> AsyncIterator[dict]:
    """One dict per question per frame answered: wall time, frame index and timestamp, the
    question and answer, time to first text, frames dropped since the previous answered
    frame (and in all), the server's stats. Ends at the end of the source or after
    `max_frames` answered frames. every_s: ask at most once per this many seconds (0: as
    fast as the model keeps up). `client` is an AsyncClient; its retry of busy refusals is
    not used: a busy server costs a frame, not a wait. clip_seconds: ask about the last that
    many seconds as a clip, not about one frame."""
    if not questions:
        raise InvalidRequest("watch needs at least one question")
    frames = await asyncio.to_thread(LatestFrame, source, fmt=fmt, options=options, realtime=realtime,
                                     clip_seconds=clip_seconds)
    answered, dropped_before = 0, 0
    try:
        while max_frames is None or answered < max_frames:
            t_ask = time.monotonic()
            frame = await asyncio.to_thread(frames.take)
            if frame is None:
                if frames.error is not None:
                    raise InvalidRequest(f"video source {source}: {frames.error}")
                return
            lines = []
            try:
                for q in questions:
                    lines.append(await _ask(client, q, frame, generation))
            except ServerBusy:
                frames.drop()
                continue
            answered += 1
            dropped = frames.dropped  # one reading: the decoder thread keeps counting
            for line in lines:
                line.update(frames_dropped=dropped - dropped_before, frames_dropped_total=dropped)
                yield line
            dropped_before = dropped
            if every_s > 0:
                await asyncio.sleep(max(0.0, t_ask + every_s - time.monotonic()))
    finally:
        await asyncio.to_thread(frames.close)


async def _ask(client, question: str, frame: Frame, generation: dict) -> dict:
    from edgevlm_client.connection import Retry
    t0 = time.monotonic()
    ttft = None
    media = {"video": frame.clip} if frame.clip is not None else {"image": frame.image}
    stream = client.stream(question, retry=Retry(busy=False), **media, **generation)
    async with stream:
        async for _ in stream:
            if ttft is None:
                ttft = (time.monotonic() - t0) * 1e3
    line = {"wall_time": round(time.time(), 3), "frame": frame.index,
            "pts_s": None if frame.pts_s is None else round(frame.pts_s, 3), "question": question,
            "answer": stream.text, "ttft_ms": round(ttft if ttft is not None else (time.monotonic() - t0) * 1e3, 1),
            "stats": stream.stats}
    fmt = stream.response_format
    if fmt is not None and fmt["type"] in ("json_schema", "json_object") and stream.stats.get("finish_reason") != "length":
        line["parsed"] = json.loads(stream.text)  # the object itself, for the program reading the lines
    return line
