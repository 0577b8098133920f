"""Generation parameters, their validation, and next-token selection from logits (numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class InvalidRequest(ValueError):
    """A request the server refuses; the message is the one-line reason sent back."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self) -> SamplingParams:
        def bad(msg):
            raise InvalidRequest(msg)

        if not 1 <= self.max_tokens <= 1_000_000:
            bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (np.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            bad(f"temperature must be in [0, 100], got {self.temperature}")
        if not (np.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be >= 0, got {self.top_k}")
        if not (np.isfinite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0):
            bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if self.seed is not None and self.seed < 0:
            bad(f"seed must be >= 0, got {self.seed}")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            bad("stop takes at most 16 non-empty strings of at most 256 characters")
        return self


class Sampler:
    """Picks the next token: repetition penalty, then greedy or temperature / top-k / top-p."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        # Penalised ids: the prompt's (as transformers does) plus everything generated.
        self.seen = {int(i) for i in prompt_ids if i >= 0}

    def __call__(self, logits: np.ndarray) -> int:
        p = self.p
        if p.repetition_penalty != 1.0 and self.seen:
            logits = logits.astype(np.float32, copy=True)
            idx = np.fromiter(self.seen, np.int64)
            idx = idx[idx < logits.shape[0]]
            v = logits[idx]
            logits[idx] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if p.temperature == 0.0:
            tok = int(np.argmax(logits))
        else:
            tok = self._sample(logits.astype(np.float64) / p.temperature)
        self.seen.add(tok)
        return tok

    def _sample(self, z: np.ndarray) -> int:
        p = self.p
        if 0 < p.top_k < z.shape[0]:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z < kth, -np.inf, z)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_p = probs[order]
            # the smallest prefix whose mass reaches top_p; the top token always stays
            keep = (np.cumsum(sorted_p) - sorted_p) < p.top_p
            probs = np.zeros_like(probs)
            probs[order[keep]] = sorted_p[keep]
            probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
