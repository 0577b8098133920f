"""Token embedding lookup with image embeddings spliced in at the placeholder (numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgevlm.presets import IMAGE_TOKEN_INDEX


def prompt_positions(ids: Sequence[int], image_tokens: int) -> int:
    """Positions a prompt takes once `embed` splices its images in: each placeholder id
    becomes its image's rows (`image_tokens` in all)."""
    placeholders = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
    return len(ids) - placeholders + image_tokens if image_tokens else len(ids)


class EmbeddingTable:
    def __init__(self, path: str | Path):
        self.table = np.load(path, mmap_mode="r")  # [vocab, D]; pages in only the rows used

    def embed(self, ids: Sequence[int], image_embeds: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """ids (IMAGE_TOKEN_INDEX marks an image) -> inputs_embeds float32 [1, L, D].

        The i-th placeholder takes image_embeds[i] ([N_i, D]; N_i differ for LLaVA-1.6's
        pictures): L = len(ids) + sum(N_i - 1).
        """
        ids = np.asarray(ids, dtype=np.int64)
        where = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
        n_images = 0 if image_embeds is None else len(image_embeds)
        if len(where) > n_images:
            raise ValueError(f"the prompt has {len(where)} image placeholder(s) but {n_images} image(s)")
        parts, start = [], 0
        for i, pos in enumerate(where):
            parts += [self.table[ids[start:pos]], image_embeds[i]]
            start = pos + 1
        parts.append(self.table[ids[start:]])
        return np.concatenate(parts).astype(np.float32, copy=False)[None]
