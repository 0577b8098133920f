"""Image preprocessing as upstream MobileVLM and LLaVA do it, with numpy and Pillow only.

decode -> RGB -> one of
  pad     (MobileVLM, LLaVA-1.5): a centred square with the CLIP-mean colour, PIL bicubic to S
  crop    (llava-hf 1.5's CLIPImageProcessor): shortest side to S, bicubic, centre crop S x S
  anyres  (LLaVA-1.6, anyres.py): a base tile plus the tiles of a fitted, black-padded canvas
-> scale to [0, 1] -> normalise with CLIP mean/std -> float32 [tiles, 3, S, S] (one tile but
for anyres).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from edgevlm_client.contract import IMAGE_FORMATS, MAX_IMAGE_PIXELS

from edgevlm.presets import ANYRES, CLIP_MEAN, CLIP_STD, CROP, PAD
from edgevlm.runtime import anyres

PAD_COLOUR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
# Pillow opens only the contract's formats (the client sniffs the same list before sending).
FORMATS = tuple(IMAGE_FORMATS)


class ImageError(ValueError):
    """An input that is not a decodable, acceptably sized image."""


def load_image(src, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """bytes, a path, a PIL image or an HxWx3 uint8 array -> RGB PIL image."""
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] not in (3, 4):
            raise ImageError(f"image array must be HxWx3 uint8, got {src.dtype} {src.shape}")
        img = Image.fromarray(src)
    else:
        data = Path(src).read_bytes() if isinstance(src, (str, Path)) else bytes(src)
        if not data:
            raise ImageError("image is empty")
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError:  # Pillow's own, higher limit
            raise ImageError(f"image is over the {max_pixels} pixel limit") from None
        except Image.UnidentifiedImageError:
            raise ImageError(f"cannot decode image: not {', '.join(FORMATS)}") from None
        except Exception as e:  # PIL raises several unrelated types for garbage input
            raise ImageError(f"cannot decode image: {e}") from None
    w, h = img.size
    if w * h > max_pixels:  # checked on the header, before any pixel is decoded
        raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the {max_pixels} pixel limit")
    if w < 1 or h < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    try:
        return img.convert("RGB")
    except Exception as e:
        raise ImageError(f"cannot decode image: {e}") from None


def expand_to_square(img: Image.Image, fill=PAD_COLOUR) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def normalise(img: Image.Image) -> np.ndarray:
    """An RGB tile -> float32 [3, S, S] with CLIP's mean and std."""
    x = (np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor: shortest side to `size` (bicubic), then the centre size x size."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
    img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess(src, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Any accepted image -> pixel_values float32 [3, size, size], padded to a square."""
    img = expand_to_square(load_image(src, max_pixels))
    # CLIPImageProcessor: shortest edge to `size` with PIL bicubic (a square gives size x size),
    # then a centre crop that is a no-op here.
    return normalise(img.resize((size, size), Image.Resampling.BICUBIC))


def preprocess_tiles(src, size: int, aspect: str = PAD, pinpoints=(),
                     max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Any accepted image -> (pixel_values float32 [tiles, 3, size, size], its (H, W))."""
    img = load_image(src, max_pixels)
    size_hw = (img.height, img.width)
    if aspect == ANYRES:
        return np.stack([normalise(t) for t in anyres.tiles(img, pinpoints, size)]), size_hw
    if aspect == CROP:
        return normalise(centre_crop(img, size))[None], size_hw
    if aspect == PAD:
        return preprocess(img, size)[None], size_hw
    raise ValueError(f"unknown image aspect mode {aspect!r}")
