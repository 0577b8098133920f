"""Llama-3.2-Vision's image preprocessing (transformers' MllamaImageProcessor, PIL backend), with
numpy and Pillow only.

Among the canvases of the supported tile arrangements (tiles high x tiles wide, each tile S
pixels), take each one's scale: the smaller of its height and width ratios to the picture. If
some scale is at least 1 (the picture fits without shrinking) take the smallest of those,
else the largest; ties go to the smaller canvas. Resize the picture (bilinear) to fit inside
that canvas keeping its aspect ratio (never below one tile a side), pad it with black at the
bottom and right, scale to [0, 1] and normalise, and cut it into S x S tiles, row by row. The
model always sees `max_num_tiles` tile slots: the unused ones are zero, and the tile mask and
the arrangement's id (1-based in the supported list) say which are real.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from edgevlm.presets import MllamaVisionConfig


def canvas(height: int, width: int, tile: int, arrangements) -> tuple[int, int]:
    """(tiles high, tiles wide) of the canvas a height x width picture goes on."""
    scales = [min(th * tile / height, tw * tile / width) for th, tw in arrangements]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    chosen = [a for a, s in zip(arrangements, scales) if s == best]
    return min(chosen, key=lambda a: a[0] * a[1])  # the first of the smallest, as argmin picks


def fitted_size(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The picture's size inside the canvas: its aspect ratio kept, each side at least a tile
    (or the canvas, if smaller) and at most the canvas."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def preprocess(img: Image.Image, cfg: MllamaVisionConfig) -> tuple[np.ndarray, int, np.ndarray]:
    """An RGB picture -> (pixel_values float32 [max_num_tiles, 3, S, S], the arrangement's id,
    tile mask int64 [max_num_tiles])."""
    s = cfg.image_size
    th, tw = canvas(img.height, img.width, s, cfg.supported_aspect_ratios)
    h, w = fitted_size(img.height, img.width, th * s, tw * s, s)
    padded = np.zeros((th * s, tw * s, 3), np.uint8)
    padded[:h, :w] = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))
    x = (padded.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(cfg.image_mean, np.float32)) / np.array(cfg.image_std, np.float32)
    pixels = np.zeros((cfg.max_num_tiles, 3, s, s), np.float32)
    tiles = x.reshape(th, s, tw, s, 3).transpose(0, 2, 4, 1, 3).reshape(th * tw, 3, s, s)
    pixels[:th * tw] = tiles
    mask = np.zeros(cfg.max_num_tiles, np.int64)
    mask[:th * tw] = 1
    mask[0] = 1
    return pixels, cfg.supported_aspect_ratios.index((th, tw)) + 1, mask
