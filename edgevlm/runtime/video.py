"""A clip's bytes -> the frames a video model reads: decoded in memory with PyAV (FFmpeg's
libraries, no subprocess, no temporary file), sampled uniformly over the clip.

LLaVA-NeXT-Video reads a fixed number of frames spread evenly over the clip (the frame count
is a request option with a model default and a cap), taken as transformers' video processors
take them: frame i * total // count, from the first; each frame is then prepared like a llava-hf
1.5 picture (resized and centre-cropped to the tower's size).
"""

from __future__ import annotations

import io
import time

from edgevlm_client.contract import BY_NAME, MAX_VIDEO_BYTES
from PIL import Image

from edgevlm.runtime.errors import BadRequest

DEFAULT_FRAMES = BY_NAME["video_frames"].default
MAX_FRAMES = BY_NAME["video_frames"].limit.high
MAX_DECODED_FRAMES = 10_000  # a clip longer than this (about 5 minutes at 30 fps) is refused while decoding


def sample_indices(total: int, frames: int) -> list[int]:
    """`frames` indices spread evenly over 0 .. total - 1, from the first (every frame once
    when the clip has no more)."""
    if total <= frames:
        return list(range(total))
    return [i * total // frames for i in range(frames)]


def decode_clip(data: bytes, frames: int, max_pixels: int) -> tuple[list[Image.Image], float]:
    """(the sampled frames as RGB pictures, decode ms); BadRequest naming what is wrong.

    Two passes over the bytes: one counts the frames (a container's own count is missing or
    approximate for webm/mkv), the other keeps only the sampled ones, so a long clip never
    holds more than `frames` pictures in memory."""
    import av

    if not data:
        raise BadRequest("video: empty")
    if len(data) > MAX_VIDEO_BYTES:
        raise BadRequest(f"video is {len(data)} bytes, over the {MAX_VIDEO_BYTES} limit")
    t0 = time.perf_counter()
    try:
        total = _frames_in(av, data, max_pixels)
        wanted = sample_indices(total, frames)
        pictures, keep = [], set(wanted)
        with av.open(io.BytesIO(data), mode="r") as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in keep:
                    pictures.append(frame.to_image().convert("RGB"))
                if i >= wanted[-1]:
                    break
    except BadRequest:
        raise
    except (av.error.FFmpegError, ValueError, OSError, IndexError) as e:
        raise BadRequest(f"video: cannot decode: {str(e).splitlines()[0][:200]}") from None
    if len(pictures) != len(wanted):  # the second pass ended early: the bytes are not what the first read
        raise BadRequest("video: cannot decode: the clip ended before its counted frames")
    return pictures, (time.perf_counter() - t0) * 1e3


def _frames_in(av, data: bytes, max_pixels: int) -> int:
    with av.open(io.BytesIO(data), mode="r") as container:
        if container.format.name.endswith("_pipe") or container.format.name == "image2":
            raise BadRequest(f"video: a still image ({container.format.name.split('_')[0]}); send it as an image")
        if not container.streams.video:
            raise BadRequest("video: the file holds no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise BadRequest(f"video: {w}x{h} frames, over the {max_pixels} pixel limit")
        total = 0
        for _ in container.decode(stream):
            total += 1
            if total > MAX_DECODED_FRAMES:
                raise BadRequest(f"video: over {MAX_DECODED_FRAMES} frames")
    if not total:
        raise BadRequest("video: no frames")
    return total
