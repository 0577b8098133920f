"""Image-embedding cache: the same frame asked about again skips decoding, resizing and the
vision encoder.

Keyed by a hash of the image's encoded bytes, as the client sent them: a camera pipeline that
asks several questions about one frame, or a chat whose every turn resends its image, sends
the same bytes each time. One cache per model instance, so the key needs no model name. LRU
under a byte budget (one 1.7B image is 144 x 2048 float32, 1.2 MB). Thread-safe: requests
look up on Triton's execute thread, the image batcher stores on its own.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np


def image_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class ImageCache:
    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.lock = threading.Lock()

    def describe(self) -> str:
        return f"image cache {self.budget / 2**20:.0f} MiB"

    def get(self, key: bytes) -> np.ndarray | None:
        """The embeddings [1, N, D] stored for key (counted as a hit), or None (a miss)."""
        with self.lock:
            embeds = self.entries.get(key)
            if embeds is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return embeds

    def put(self, key: bytes, embeds: np.ndarray) -> None:
        if embeds.nbytes > self.budget:
            return
        if isinstance(embeds, np.ndarray):
            embeds = embeds.copy()
            embeds.flags.writeable = False  # shared by every request for this frame
        # (a cross-attention model's CrossImage is read-only as made)
        with self.lock:
            if key in self.entries:
                return
            while self.bytes + embeds.nbytes > self.budget:
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.nbytes
            self.entries[key] = embeds
            self.bytes += embeds.nbytes
