"""The decode loop: splice, prefill, decode with a KV cache, sample, stop, stream text.

No Triton here: `generate` yields `Event`s, and the Triton `mobilevlm` model (or a test, or a
benchmark) forwards them. The decoder runner owns the KV cache (see onnxruntime.py, tensorrt.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from edgevlm.runtime.detokenize import IncrementalDecoder
from edgevlm.runtime.embedding import EmbeddingTable
from edgevlm.runtime.errors import BadRequest
from edgevlm.runtime.sampling import Sampler, SamplingParams


@dataclass
class Stats:
    image_encode_ms: float = 0.0
    image_cached: bool = False  # the image's embeddings came from the image cache (encode 0 ms)
    image_tokens: int = 0  # positions the image took (LLaVA-1.6: depends on its size)
    queue_ms: float = 0.0  # waiting for a slot (the scheduler's admission queue)
    prefill_tokens: int = 0  # prompt positions, cached ones included
    cached_tokens: int = 0  # of those, taken from the prefix cache instead of prefilled
    prefill_ms: float = 0.0
    decode_tokens: int = 0
    decode_ms: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or stop string), "length", "cancelled"

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes out of prefill; decode speed counts the steps after it
        steps = self.decode_tokens - 1
        return steps / (self.decode_ms / 1e3) if steps > 0 and self.decode_ms > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        computed = self.prefill_tokens - self.cached_tokens
        return computed / (self.prefill_ms / 1e3) if self.prefill_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
                "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2)}


@dataclass
class Event:
    text: str  # new text since the previous event (may be empty)
    stats: Stats | None = None  # set on the last event only

    @property
    def final(self) -> bool:
        return self.stats is not None


class Generator:
    """One model's decode loop. Thread-safe: each call keeps its own sequence state."""

    def __init__(self, decoder, table: EmbeddingTable, tokenizer, max_context: int):
        self.decoder = decoder  # .new_sequence(capacity) -> sequence with .forward(embeds)
        self.table = table
        self.tok = tokenizer
        self.max_context = max_context
        self._grammars = None
        self._grammars_lock = threading.Lock()

    @property
    def grammars(self):
        """Constrained decoding's compiled grammars (built at first use: 0.2-0.4 s for the
        vocabulary)."""
        with self._grammars_lock:
            if self._grammars is None:
                from edgevlm.runtime.grammar import Grammars
                self._grammars = Grammars(self.tok)
            return self._grammars

    def sampler(self, params: SamplingParams, input_ids: Sequence[int]) -> Sampler:
        constraint = self.grammars.constraint(params.response_format) if params.response_format else None
        return Sampler(params, input_ids, constraint, vocab=self.tok.vocab_size)

    def check(self, input_ids: Sequence[int], image_tokens: int, params: SamplingParams) -> int:
        """Validate a request before any work; returns the prompt length in positions."""
        params.validate()
        n = len(input_ids) + image_tokens - (image_tokens > 0)
        if len(input_ids) == 0:
            raise BadRequest("prompt is empty")
        if n >= self.max_context:
            raise BadRequest(f"prompt is {n} tokens, the context holds {self.max_context}")
        if params.response_format is not None:
            self.grammars.check(params.response_format)  # compiled once; a bad one is refused here
        return n

    def generate(self, input_ids: Sequence[int], image_embeds: np.ndarray | None,
                 params: SamplingParams, *, image_encode_ms: float = 0.0, image_cached: bool = False,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        n_image = 0 if image_embeds is None or image_embeds.shape[0] == 0 else image_embeds.shape[1]
        n_prompt = self.check(input_ids, n_image, params)
        max_new = min(params.max_tokens, self.max_context - n_prompt)
        stats = Stats(image_encode_ms=image_encode_ms, image_cached=image_cached, prefill_tokens=n_prompt,
                      image_tokens=n_image)
        sampler = self.sampler(params, input_ids)
        detok = IncrementalDecoder(self.tok, params.stop)
        seq = self.decoder.new_sequence(n_prompt + max_new)
        try:
            eos = self.tok.eos_id

            t0 = time.perf_counter()
            logits = seq.forward(self.table.embed(input_ids, image_embeds))  # prefill
            t1 = time.perf_counter()
            stats.prefill_ms = (t1 - t0) * 1e3
            finish = "length"
            for step in range(max_new):
                if cancelled():
                    finish = "cancelled"
                    break
                tok = sampler(logits)
                stats.decode_tokens += 1
                if tok == eos:
                    finish = "stop"
                    break
                delta = detok.push(tok)
                if detok.stopped or sampler.complete:  # a stop string, or the grammar is satisfied
                    finish = "stop"
                    if delta:
                        yield Event(delta)
                    break
                if delta:
                    yield Event(delta)
                if step + 1 < max_new:
                    logits = seq.forward(self.table.embed([tok]))  # one decode step
            stats.decode_ms = (time.perf_counter() - t1) * 1e3
            stats.finish_reason = finish
            yield Event(detok.flush() if finish != "cancelled" else "", stats)
        finally:  # pooled sequences (static-cache TensorRT) go back for the next request
            if hasattr(seq, "release"):
                seq.release()
