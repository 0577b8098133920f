"""Which image positions each text position attends to, in a model whose images enter through
cross-attention (Llama-3.2-Vision): the rule of transformers' MllamaProcessor, in numpy.

An image's `<|image|>` token starts its span: that position and every later one attend to the
image, up to the next image's token (consecutive image tokens share the span that follows
them); the last image's span runs to the end, and each generated token attends as the last
prompt position does. Only an image's real tiles are attended to: its padding tile slots stay
masked. Positions before the first image attend to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def image_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(first, end) of the positions each image's token covers, in image order."""
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    spans = [[a, b] for a, b in zip(at, at[1:] + [len(ids)])]
    end = len(ids)
    for span in reversed(spans):  # a token right before the next one shares that one's span
        if span[1] == span[0] + 1:
            span[1] = end
        end = span[1]
    return [tuple(s) for s in spans]


def cross_mask(ids: Sequence[int], image_token_id: int, tiles: Sequence[int], max_tiles: int,
               tile_tokens: int) -> np.ndarray:
    """[S, images * max_tiles * tile_tokens] float32: 1 where a text position attends to an image
    position. tiles: each image's real tile count."""
    spans = image_spans(ids, image_token_id)
    if len(spans) != len(tiles):
        raise ValueError(f"the prompt has {len(spans)} image token(s) for {len(tiles)} image(s)")
    mask = np.zeros((len(ids), len(tiles), max_tiles, tile_tokens), np.float32)
    for i, ((first, end), n) in enumerate(zip(spans, tiles)):
        mask[first:end, i, :n] = 1
    return mask.reshape(len(ids), -1)


def decode_row(mask: np.ndarray) -> np.ndarray:
    """The mask row of a generated token: the last position's."""
    return mask[-1:]


@dataclass(eq=False)
class CrossImage:
    """What one image contributes to a cross-attention model, computed once (vision encoder,
    then each cross layer's K/V projection) and shared, read-only, by every request about it
    (the image cache keeps it): per cross tensor [kv_heads, L, head_dim], L = max_tiles *
    tile_tokens, of which the first `tiles` tiles are real."""
    kv: list[np.ndarray]
    tiles: int
    tile_tokens: int
    digest: bytes = b""  # the image bytes' hash: what stands for the image in prefix-cache keys

    def __post_init__(self):
        for a in self.kv:
            a.flags.writeable = False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv)

    @property
    def tokens(self) -> int:
        """The image positions text attends to (its real tiles')."""
        return self.tiles * self.tile_tokens


@dataclass(eq=False)
class CrossRow:
    """A sequence's cross-attention inputs: the image's K/V and which of its positions each
    prompt position attends to (mask [S, L]); generated tokens attend as the last prompt
    position does (decode_row)."""
    image: CrossImage
    mask: np.ndarray

    @property
    def decode_mask(self) -> np.ndarray:
        return decode_row(self.mask)[0]
