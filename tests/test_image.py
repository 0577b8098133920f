"""Image preprocessing against hand-computed values, and refusal of bad images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgevlm.runtime.image import ImageError, expand_to_square, load_image, preprocess


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_landscape_is_padded_top_and_bottom_with_the_clip_mean_colour():
    img = Image.new("RGB", (4, 2), (1, 2, 3))
    sq = np.asarray(expand_to_square(img))
    assert sq.shape == (4, 4, 3)
    # offset (4 - 2) // 2 = 1: row 0 and row 3 are padding
    assert (sq[[0, 3]] == (122, 116, 104)).all()
    assert (sq[[1, 2]] == (1, 2, 3)).all()


def test_portrait_is_padded_left_and_right_centred():
    img = Image.new("RGB", (1, 4), (9, 9, 9))
    sq = np.asarray(expand_to_square(img))
    # width 1 in 4: offset (4 - 1) // 2 = 1, so columns 0, 2, 3 are padding
    assert (sq[:, 1] == 9).all()
    assert (sq[:, [0, 2, 3]] == (122, 116, 104)).all()


def test_normalised_values_match_hand_computation():
    # 20x10 of one colour -> 20x20 with rows 0-4 and 15-19 padding -> bicubic to 10x10.
    # Output row 0 only sees padding, row 4 only sees the photo (support is 4 source rows).
    img = Image.new("RGB", (20, 10), (10, 200, 255))
    x = preprocess(png_bytes(img), 10)
    assert x.shape == (3, 10, 10) and x.dtype == np.float32
    pad = [(122 / 255 - 0.48145466) / 0.26862954, (116 / 255 - 0.4578275) / 0.26130258,
           (104 / 255 - 0.40821073) / 0.27577711]
    colour = [(10 / 255 - 0.48145466) / 0.26862954, (200 / 255 - 0.4578275) / 0.26130258,
              (255 / 255 - 0.40821073) / 0.27577711]
    np.testing.assert_allclose(pad, [-0.011254, -0.011196, -0.001333], atol=1e-6)
    np.testing.assert_allclose(colour, [-1.646278, 1.249457, 2.145897], atol=1e-6)
    np.testing.assert_allclose(x[:, 0, :], np.tile(np.array(pad)[:, None], 10), atol=1e-5)
    np.testing.assert_allclose(x[:, 4, :], np.tile(np.array(colour)[:, None], 10), atol=1e-5)


def test_resize_is_pil_bicubic():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(arr).resize((12, 12), Image.Resampling.BICUBIC), np.float32) / 255
    got = preprocess(arr, 12) * np.array([0.26862954, 0.26130258, 0.27577711], np.float32)[:, None, None]
    got += np.array([0.48145466, 0.4578275, 0.40821073], np.float32)[:, None, None]
    np.testing.assert_allclose(got.transpose(1, 2, 0), want, atol=1e-5)


def test_greyscale_and_rgba_become_rgb():
    assert load_image(png_bytes(Image.new("L", (3, 3), 7))).mode == "RGB"
    assert load_image(png_bytes(Image.new("RGBA", (3, 3), (1, 2, 3, 4)))).mode == "RGB"


@pytest.mark.parametrize("data,reason", [(b"", "empty"), (b"not an image at all", "cannot decode"),
                                         (png_bytes(Image.new("RGB", (8, 8)))[:40], "cannot decode")])
def test_undecodable_input_is_refused_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        preprocess(data, 14)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels: a decompression bomb's first bytes."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [8000, 100_000])  # under and over Pillow's own bomb limit
def test_oversized_images_are_refused_before_decoding(side):
    with pytest.raises(ImageError, match="over the .* limit"):
        preprocess(_png_header_only(side, side), 14)


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageError, match="1600 pixels"):
        preprocess(png_bytes(Image.new("RGB", (40, 40))), 14, max_pixels=1000)
    with pytest.raises(ImageError, match="HxWx3 uint8"):
        preprocess(np.zeros((4, 4), np.float32), 14)
