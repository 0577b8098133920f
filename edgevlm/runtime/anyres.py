"""LLaVA-1.6 "anyres": an image becomes a base tile plus a grid of tiles, and their features are
packed back into one sequence (unpadded to the picture's aspect, a newline vector after each
row). numpy and Pillow only: the runtime packs, the reference model reuses the geometry.

Why the runtime packs rather than the vision graph: the unpad crop depends on the original
picture's size, so it is data-dependent; the vision encoder stays a fixed per-tile graph with a
batch axis (one TensorRT profile, batched across requests), and packing is a gather of at most
a few thousand rows, negligible beside the tower.

Conventions (pinned in tests/test_llava.py): pinpoints are (height, width) and sizes (H, W),
llava-hf's reading. The original LLaVA code reads pinpoints as (width, height); the set is
symmetric, so the two only differ on ties (pictures that fit unscaled in 336x672), where the
first pinpoint wins: 300x200 (W x H) gives 1464 tokens here and 976 there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image


def best_resolution(size_hw: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps the most of the picture's pixels, then wastes the least."""
    h0, w0 = size_hw
    best, best_eff, best_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / w0, h / h0)
        eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def grid_shape(size_hw, pinpoints, tile: int) -> tuple[int, int]:
    """(tile rows, tile columns) of the canvas the picture is fitted into."""
    h, w = best_resolution(size_hw, pinpoints)
    return h // tile, w // tile


def fitted_size(size_hw, target_hw) -> tuple[int, int]:
    """(h, w) of the picture resized into target keeping its aspect: the limiting side fits
    exactly, the other is rounded up and capped."""
    h0, w0 = size_hw
    th, tw = target_hw
    scale_w, scale_h = tw / w0, th / h0
    if scale_w < scale_h:
        return min(math.ceil(h0 * scale_w), th), tw
    return th, min(math.ceil(w0 * scale_h), tw)


def unpadded(rows: int, cols: int, size_hw) -> tuple[slice, slice]:
    """The rows and columns of the feature map that hold the picture, not the black padding.
    The rounding to 7 places is llava-hf's (it keeps 0.99999 products from flooring down)."""
    h0, w0 = size_hw
    if w0 / h0 > cols / rows:
        new = int(round(h0 * (cols / w0), 7))
        pad = (rows - new) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new = int(round(w0 * (rows / h0), 7))
    pad = (cols - new) // 2
    return slice(0, rows), slice(pad, cols - pad)


def token_count(size_hw, pinpoints, tile: int, grid: int) -> int:
    """Tokens a picture of size (H, W) becomes: base tile + unpadded grid with a newline column."""
    gh, gw = grid_shape(size_hw, pinpoints, tile)
    base = grid * grid
    if gh * gw == 1:
        return base + 1
    r, c = unpadded(gh * grid, gw * grid, size_hw)
    return base + (r.stop - r.start) * (c.stop - c.start + 1)


def tiles(img: Image.Image, pinpoints, tile: int) -> list[Image.Image]:
    """[base, tile_0, ...]: the picture squashed to tile x tile, then the fitted canvas (black
    padding, centred) cut row-major into tile x tile crops."""
    size_hw = (img.height, img.width)
    th, tw = best_resolution(size_hw, pinpoints)
    nh, nw = fitted_size(size_hw, (th, tw))
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(img.resize((nw, nh), Image.Resampling.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    crops = [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, th, tile) for x in range(0, tw, tile)]
    return [img.resize((tile, tile), Image.Resampling.BICUBIC), *crops]


def pack(features: np.ndarray, size_hw, pinpoints, tile: int, newline: np.ndarray) -> np.ndarray:
    """features [1 + tiles, grid*grid, D] of one picture -> [token_count, D]."""
    n, t, d = features.shape
    grid = int(round(t ** 0.5))
    base = features[0]
    if n == 1:
        return np.concatenate([base, newline[None].astype(base.dtype)])
    gh, gw = grid_shape(size_hw, pinpoints, tile)
    if gh * gw != n - 1:
        raise ValueError(f"{n - 1} tiles for a {gh}x{gw} grid")
    m = features[1:].reshape(gh, gw, grid, grid, d).transpose(0, 2, 1, 3, 4).reshape(gh * grid, gw * grid, d)
    rows, cols = unpadded(gh * grid, gw * grid, size_hw)
    m = m[rows, cols]
    column = np.broadcast_to(newline.astype(m.dtype), (m.shape[0], 1, d))
    return np.concatenate([base, np.concatenate([m, column], axis=1).reshape(-1, d)])
