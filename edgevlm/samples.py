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


def sample_images(names=None) -> dict[str, bytes]:
    return {n: sample_image(n) for n in (names or SAMPLES)}
