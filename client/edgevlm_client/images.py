"""Images as the server takes them: encoded bytes in one of the formats it decodes.

A path, bytes, a PIL image or a numpy array all become bytes here, and anything the server
would refuse as unsupported (contract.IMAGE_FORMATS) is refused before it crosses the network.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from edgevlm_client.contract import IMAGE_FORMATS_TEXT, image_format
from edgevlm_client.errors import InvalidRequest

def image_bytes(image) -> bytes:
    """A path, encoded bytes, a PIL image or a uint8 array (HxW, HxWx3, HxWx4) -> encoded bytes.

    PIL images and arrays are encoded as PNG, losslessly: the server sees exactly these pixels.
    """
    if isinstance(image, (str, Path)):
        try:
            data = Path(image).read_bytes()
        except OSError as e:
            raise InvalidRequest(f"cannot read image {image}: {e.strerror}") from e
        return _checked(data, str(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _checked(bytes(image), "image bytes")
    return _encode(image)


def _checked(data: bytes, what: str) -> bytes:
    if not data:
        raise InvalidRequest(f"{what}: empty")
    if image_format(data) is None:
        raise InvalidRequest(f"{what}: unsupported image type (send {IMAGE_FORMATS_TEXT})")
    return data


def _encode(image) -> bytes:
    try:
        from PIL import Image
    except ImportError:
        raise InvalidRequest("pass images as paths or bytes, or install Pillow "
                             "(edgevlm-client[images]) for PIL images and arrays") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InvalidRequest(f"image array must be uint8 HxW, HxWx3 or HxWx4, "
                                 f"got {image.dtype} {tuple(image.shape)}")
        image = Image.fromarray(np.ascontiguousarray(image))
    if not isinstance(image, Image.Image):
        raise InvalidRequest(f"unsupported image type {type(image).__name__} "
                             "(pass a path, bytes, a PIL image or a numpy array)")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
