"""Real photos for demos, parity and calibration: scikit-image's bundled samples, encoded as
the bytes a client would send (JPEG for the colour photos, PNG for the greyscale one)."""

from __future__ import annotations

import io

from PIL import Image

# name -> (skimage.data loader, encoding); a mix of landscape, square and greyscale.
SAMPLES = {"chelsea": "JPEG", "astronaut": "JPEG", "coffee": "JPEG", "camera": "PNG"}


def sample_image(name: str) -> bytes:
    import skimage.data
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known: {', '.join(SAMPLES)}")
    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).save(buf, format=SAMPLES[name], quality=95)
    return buf.getvalue()


def camera_frame(seed: int, name: str = "chelsea") -> bytes:
    """A sample photo with a corner of pixels set by `seed`: a new frame (new bytes, as a
    camera's next frame would be) that no image cache has seen. PNG, so the pixels are exact."""
    import numpy as np
    pixels = np.array(Image.open(io.BytesIO(sample_image(name))).convert("RGB"))
    pixels[:4, :4] = np.random.default_rng(seed).integers(0, 255, (4, 4, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def sample_images(names=None) -> dict[str, bytes]:
    return {n: sample_image(n) for n in (names or SAMPLES)}
