"""Frames -> a short clip's bytes, as the server takes a `video` (LLaVA-NeXT-Video): H.264 in
MP4, encoded in memory with PyAV (`pip install 'edgevlm-client[watch]'`).

The server samples its frames from the clip (contract VIDEO), so a clip made here keeps what
a camera saw over a few seconds at a modest rate and size, not every frame at full size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from edgevlm_client.errors import InvalidRequest

MAX_SIDE = 448  # the tower reads 336-pixel crops: a larger frame only costs bytes


def encode_clip(frames: Sequence, fps: float = 4.0) -> bytes:
    """PIL images, HxWx3 uint8 arrays or encoded images (bytes) -> MP4 bytes, `fps` frames a
    second, each scaled to at most MAX_SIDE and to even sides (H.264's 4:2:0 needs them)."""
    try:
        import av
        from PIL import Image
    except ImportError:
        raise InvalidRequest("making a clip from frames needs PyAV: pip install 'edgevlm-client[watch]'") from None
    if not frames:
        raise InvalidRequest("a clip needs at least one frame")
    pictures = [_picture(f, Image) for f in frames]
    w, h = pictures[0].size
    scale = min(1.0, MAX_SIDE / max(w, h))
    w, h = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps * 1000) / 1000 if fps != int(fps) else int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for p in pictures:
            frame = av.VideoFrame.from_image(p.convert("RGB").resize((w, h)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def _picture(frame, Image):
    if isinstance(frame, Image.Image):
        return frame
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] not in (3, 4):
            raise InvalidRequest(f"a frame array must be HxWx3 uint8, got {frame.dtype} {frame.shape}")
        return Image.fromarray(frame)
    if isinstance(frame, (bytes, bytearray)):
        return Image.open(io.BytesIO(bytes(frame)))
    raise InvalidRequest(f"a frame must be a PIL image, an array or image bytes, got {type(frame).__name__}")
