"""Prefix KV cache: the KV of earlier sequences, kept so a prompt that begins the same way
prefills only what is new.

A camera pipeline asks several questions about one frame, and a chat sends its whole history
with every follow-up: the system line, the image (144 positions at the 1.7B shape) and the
earlier turns are the same positions every time. Their KV depends only on the positions up
to them (attention is causal), so it can be copied from an earlier sequence instead of
recomputed.

Each position of a prompt has a key: its token id, or, inside an image, a value derived from
the image's content hash (of its embeddings) and the index within the image; token ids are
>= 0 and image keys < 0, so neither can be taken for the other. In a cross-attention model
(Llama-3.2-Vision) an image changes the KV of every position of its request, even those before
its token (they attend to it too, unmasked, as transformers' mask makes them): there every
position's key mixes its token id with the image bytes' hash. An entry holds the keys and
KV of one sequence; a lookup finds the entry sharing the longest run of leading keys with the
new prompt. Entries are stored when a prompt is prefilled (so concurrent requests about the
same frame share it at once) and when a sequence ends (prompt plus answer: the next turn of a
chat begins with both), an entry already covered by another is not stored twice, and the
least recently used go first when the byte budget is reached.

The cache copies KV rows in and out of the pool rather than sharing them: a copy of a
200-position 1.7B prefix is ~80 MB of memcpy (milliseconds), its prefill a second or more on a
CPU, and the pool's packed layout stays as it is. Used by the scheduler thread only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgevlm.presets import IMAGE_TOKEN_INDEX

MIN_REUSE = 8  # positions: a shorter common prefix (BOS and a word) is a miss, not worth a copy
_IMAGE_KEY_MASK = (1 << 62) - 1


def image_key(embeds: np.ndarray) -> int:
    """A 62-bit content hash of one image's embeddings [N, D]."""
    digest = hashlib.blake2b(np.ascontiguousarray(embeds).view(np.uint8), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _IMAGE_KEY_MASK


def position_keys(input_ids: Sequence[int], image_embeds: Sequence[np.ndarray] | None, cross=None) -> np.ndarray:
    """One int64 key per prompt position (the i-th image placeholder expands to image i's rows;
    cross: a cross-attention row's CrossRow, whose image keys every position)."""
    ids = np.asarray(input_ids, np.int64)
    if cross is not None:
        h = np.uint64(int.from_bytes(hashlib.blake2b(cross.image.digest, digest_size=8).digest(), "little"))
        mixed = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ h  # wraps: a hash, not a sum
        return -1 - (mixed & np.uint64(_IMAGE_KEY_MASK)).astype(np.int64)
    where = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    parts, start = [], 0
    for i, pos in enumerate(where):
        n = image_embeds[i].shape[0]
        h = image_key(image_embeds[i])
        parts += [ids[start:pos], -1 - ((h + np.arange(n, dtype=np.int64)) & _IMAGE_KEY_MASK)]
        start = pos + 1
    parts.append(ids[start:])
    return np.concatenate(parts)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


@dataclass(eq=False)
class Entry:
    keys: np.ndarray        # [L] int64
    kv: list[np.ndarray]    # one per cache tensor: [kv_heads, L, head_dim]
    nbytes: int


@dataclass
class Lookup:
    entry: Entry | None
    positions: int  # reused positions (0: a miss)

    def kv(self) -> list[np.ndarray]:
        return [a[:, :self.positions] for a in self.entry.kv]


class PrefixCache:
    def __init__(self, budget_bytes: int, min_reuse: int = MIN_REUSE):
        self.budget = int(budget_bytes)
        self.min_reuse = min_reuse
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.hits = self.misses = self.reused = self.evictions = 0

    def describe(self) -> str:
        return f"prefix KV cache {self.budget / 2**20:.0f} MiB"

    def lookup(self, keys: np.ndarray, limit: int) -> Lookup:
        """The entry sharing the longest leading run with `keys`, reused for at most `limit`
        positions (the caller keeps at least its prompt's last position to prefill: its logits
        give the first token)."""
        best, n = None, 0
        for e in self.entries.values():
            m = common_prefix(e.keys, keys)
            if m > n:
                best, n = e, m
        n = min(n, limit)
        if best is None or n < self.min_reuse:
            self.misses += 1
            return Lookup(None, 0)
        self.entries.move_to_end(id(best))
        self.hits += 1
        self.reused += n
        return Lookup(best, n)

    def store(self, keys: np.ndarray, save: Callable[[int], list[np.ndarray]]) -> int:
        """Keep the KV of the positions `keys` stand for (`save(n)` copies the first n out of
        the pool). Returns how many entries were evicted to make room."""
        n = len(keys)
        if n < self.min_reuse or self.budget <= 0:
            return 0
        for k, e in self.entries.items():
            if len(e.keys) >= n and common_prefix(e.keys, keys) == n:  # already held
                self.entries.move_to_end(k)
                return 0
        for k in [k for k, e in self.entries.items() if common_prefix(e.keys, keys) == len(e.keys)]:
            self._drop(k)  # covered by the new entry, which holds those positions too
        kv = save(n)
        nbytes = sum(a.nbytes for a in kv)
        if nbytes > self.budget:
            return 0
        evicted = 0
        while self.bytes + nbytes > self.budget:
            self._drop(next(iter(self.entries)))
            evicted += 1
        entry = Entry(np.array(keys, np.int64), kv, nbytes)
        self.entries[id(entry)] = entry
        self.bytes += nbytes
        self.evictions += evicted
        return evicted

    def _drop(self, k: int) -> None:
        self.bytes -= self.entries.pop(k).nbytes
