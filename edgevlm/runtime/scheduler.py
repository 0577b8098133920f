"""Continuous batching: every live sequence advances by one token per decoder call.

One Scheduler per model instance, one thread. Requests are `submit`ted (checked at once:
a bad one raises BadRequest, a full queue raises Busy) and wait in a FIFO queue that holds
at most `max_queue` requests beyond the free slots (0: refuse whenever all slots are busy).
Between steps the thread admits the head of the queue when the KV pool has room, and
each loop iteration then does:

  1. drop the rows whose client cancelled (they free their slot now, not at their end),
  2. one decode step: a single decoder call over all decoding rows, each at its own
     position; each row samples with its own parameters, seed, penalty and stop strings,
  3. one prefill chunk of the oldest admitted prompt, at most `prefill_chunk` positions, so
     a new request stalls the running streams by one chunk per token (`make bench` measures
     it); with no stream decoding the whole prompt goes in one call.

With a PrefixCache (prefix_cache.py), an admitted prompt first takes the KV of the longest
prefix it shares with an earlier sequence, and only the rest is prefilled; its prompt is
stored once prefilled, and its prompt and answer when it ends.

Events go out through each request's `emit` (text deltas, then a final event with stats)
or its `fail` (an exception); both are called on the scheduler thread. No Triton here: the
`mobilevlm` model is an adapter that submits requests and forwards these events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgevlm.runtime.detokenize import IncrementalDecoder
from edgevlm.runtime.errors import BadRequest, Busy
from edgevlm.runtime.generation import Event, Generator, Stats
from edgevlm.runtime.prefix_cache import PrefixCache, position_keys
from edgevlm.runtime.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

PREFILL_CHUNK = 64  # positions per prefill call while other streams decode (see make bench)


@dataclass(eq=False)
class Request:
    input_ids: Sequence[int]
    image_embeds: np.ndarray | None
    params: SamplingParams
    emit: Callable[[Event], None]
    fail: Callable[[Exception], None]
    cancelled: Callable[[], bool] = lambda: False
    image_encode_ms: float = 0.0
    image_cached: bool = False  # the embeddings came from the image cache
    submitted: float = field(default_factory=time.perf_counter)


class Observer:
    """What the scheduler reports; the Triton adapter turns it into Prometheus metrics."""

    def step(self, rows: int, seconds: float) -> None: ...
    def depth(self, active: int, queued: int) -> None: ...
    def finished(self, outcome: str, tokens: int) -> None: ...
    def prefix(self, reused: int, cache_bytes: int, evicted: int) -> None:
        """A prefix-cache lookup (reused 0: a miss) or store (reused -1)."""


class _Live:
    """One admitted request: its row, sampler, detokenizer, stats and progress."""

    def __init__(self, req: Request, row, n_prompt: int, max_new: int, embeds: np.ndarray, tok, sampler: Sampler):
        self.req, self.row, self.max_new = req, row, max_new
        self.embeds = embeds  # the prompt's, consumed chunk by chunk
        self.fed = 0  # prompt positions prefilled so far
        self.sampler = sampler
        self.detok = IncrementalDecoder(tok, req.params.stop)
        images = req.image_embeds
        self.stats = Stats(image_encode_ms=req.image_encode_ms, prefill_tokens=n_prompt,
                           image_cached=req.image_cached,
                           image_tokens=0 if images is None or images.shape[0] == 0 else images.shape[1])
        self.keys: np.ndarray | None = None  # the prompt's position keys (with a prefix cache)
        self.fed_tokens: list[int] = []  # generated tokens whose KV is in the row
        self.stats.queue_ms = (time.perf_counter() - req.submitted) * 1e3
        self.t_prefill = time.perf_counter()
        self.t_decode = 0.0
        self.next_token = -1  # fed at the next decode step

    @property
    def prefilling(self) -> bool:
        return self.fed < self.embeds.shape[1]


class Scheduler:
    def __init__(self, gen: Generator, pool, *, max_queue: int, prefill_chunk: int = PREFILL_CHUNK,
                 observer: Observer | None = None, prefix_cache: PrefixCache | None = None):
        self.gen, self.pool = gen, pool
        self.max_queue = max_queue
        self.chunk = prefill_chunk if getattr(pool, "chunked_prefill", True) else None
        # reuse needs a pool that copies KV in and out and prefills at any offset
        reusable = getattr(pool, "reuses_prefix", False) and self.chunk is not None
        self.cache = prefix_cache if reusable and prefix_cache is not None and prefix_cache.budget > 0 else None
        self.obs = observer or Observer()
        self.queue: deque[tuple[Request, int, int]] = deque()  # (request, prompt positions, new tokens)
        self.live: list[_Live] = []
        self.reserved = 0  # queue places held by requests whose images are being encoded
        self.cond = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    # -- called from request threads ------------------------------------------------------------
    def check(self, input_ids: Sequence[int], image_tokens: int, params: SamplingParams) -> tuple[int, int]:
        """(prompt positions, tokens to generate) of a request, or BadRequest."""
        n_prompt = self.gen.check(input_ids, image_tokens, params)
        max_new = min(params.max_tokens, self.gen.max_context - n_prompt)
        if self.pool.never_fits(n_prompt + max_new):
            raise BadRequest(f"prompt and max_tokens need {n_prompt + max_new} positions; "
                             "the KV cache of this server holds fewer (ask for fewer max_tokens)")
        return n_prompt, max_new

    def reserve(self) -> None:
        """Hold a queue place for a request still being prepared (its image encoding), so a
        full queue refuses it before that work; submit(reserved=True) uses the place and
        release_reservation() gives it back."""
        with self.cond:
            self._refuse_if_full()
            self.reserved += 1
            self._report_depth()

    def release_reservation(self) -> None:
        with self.cond:
            self.reserved -= 1
            self._report_depth()

    def submit(self, req: Request, reserved: bool = False) -> None:
        """Queue a request (BadRequest if it is invalid, Busy if the queue is full)."""
        n_image = 0 if req.image_embeds is None else req.image_embeds.shape[1]
        try:
            n_prompt, max_new = self.check(req.input_ids, n_image, req.params)
        except BadRequest:
            if reserved:
                self.release_reservation()
            raise
        with self.cond:
            if reserved:
                self.reserved -= 1
            else:
                self._refuse_if_full()
            self.queue.append((req, n_prompt, max_new))
            self._report_depth()
            self.cond.notify()

    def _refuse_if_full(self) -> None:
        if self.closing:
            raise Busy("busy: the model is shutting down")
        waiting = len(self.queue) + self.reserved
        free = max(0, self.pool.max_rows - len(self.live))  # waiting requests a free slot takes at once
        if waiting - free >= self.max_queue:
            raise Busy(f"busy: {len(self.live)} sequences active, {waiting} queued")

    def counts(self) -> tuple[int, int]:
        """(sequences admitted, requests queued)."""
        with self.cond:
            return len(self.live), len(self.queue)

    def close(self) -> None:
        """Stop the thread; whatever is queued or live ends as cancelled."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()

    # -- the scheduler thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.closing or self.live or self.queue):
                    self.cond.wait()
                if self.closing:
                    break
            try:
                self._iteration()
            except Exception as e:  # a fault in a step: its rows fail, the server keeps serving
                log.exception("scheduler step failed")
                for live in list(self.live):
                    self._end(live, error=e)
        for live in list(self.live):
            self._end(live, "cancelled")
        with self.cond:
            queued, self.queue = list(self.queue), deque()
        for req, _, _ in queued:
            self._send_final(req, Stats(finish_reason="cancelled"), "", "cancelled")

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        decoding = [x for x in self.live if not x.prefilling]
        if decoding:
            embeds = self.gen.table.embed([x.next_token for x in decoding])[0][:, None]  # [B, 1, D]
            t0 = time.perf_counter()
            logits = self.pool.decode([x.row for x in decoding], embeds)
            self.obs.step(len(decoding), time.perf_counter() - t0)
            for x in decoding:
                x.fed_tokens.append(x.next_token)
            for x, row_logits in zip(decoding, logits):
                self._advance(x, row_logits)
        prefilling = next((x for x in self.live if x.prefilling), None)
        if prefilling is not None:
            self._prefill_chunk(prefilling, alone=not decoding)

    def _drop_cancelled(self) -> None:
        # Decoding rows are checked right before each send instead (_advance): one check per
        # row per step either way.
        for live in [x for x in self.live if x.prefilling and self._is_cancelled(x.req)]:
            self._end(live, "cancelled")
        with self.cond:
            gone = [q for q in self.queue if self._is_cancelled(q[0])]
            for q in gone:
                self.queue.remove(q)
        for req, _, _ in gone:
            self._send_final(req, Stats(finish_reason="cancelled"), "", "cancelled")
        if gone:
            self._report_depth()

    @staticmethod
    def _is_cancelled(req: Request) -> bool:
        try:
            return bool(req.cancelled())
        except Exception:  # the stream is gone: nobody is listening
            return True

    def _admit(self) -> None:
        """Admit from the queue's head while the pool has room. One prompt is prefilled at a
        time, so a second waits in the queue (cancellable, costing no slot) until it starts."""
        with self.cond:
            while self.queue and not any(x.prefilling for x in self.live):
                req, n_prompt, max_new = self.queue[0]
                if not self.pool.fits(n_prompt + max_new):
                    break
                self.queue.popleft()
                row = None
                try:
                    embeds = self.gen.table.embed(req.input_ids, req.image_embeds)
                    row = self.pool.acquire(n_prompt + max_new)
                    live = _Live(req, row, n_prompt, max_new, embeds, self.gen.tok,
                                 self.gen.sampler(req.params, req.input_ids))
                    if self.cache is not None:
                        self._reuse_prefix(live)
                except Exception as e:
                    if row is not None:
                        self.pool.release(row)
                    self._safe(req.fail, e)
                    self.obs.finished("error", 0)
                    continue
                self.live.append(live)
        self._report_depth()

    def _reuse_prefix(self, x: _Live) -> None:
        """Start x from the cached KV of its longest known prefix; its last prompt position is
        always prefilled (its logits give the first token)."""
        x.keys = position_keys(x.req.input_ids, x.req.image_embeds)
        hit = self.cache.lookup(x.keys, limit=len(x.keys) - 1)
        if hit.positions:
            self.pool.load(x.row, hit.kv())
            x.fed = hit.positions
            x.stats.cached_tokens = hit.positions
        self.obs.prefix(hit.positions, self.cache.bytes, 0)

    def _remember(self, x: _Live) -> None:
        """Store the KV x's row holds (its prompt, and the answer fed back so far)."""
        if self.cache is None or x.keys is None or x.row.length == 0:
            return
        keys = np.concatenate([x.keys, np.asarray(x.fed_tokens, np.int64)])[:x.row.length]
        try:
            evicted = self.cache.store(keys, lambda n: self.pool.save(x.row, n))
        except Exception:  # a cache fault must not fail the request
            log.exception("prefix cache: store failed")
            return
        self.obs.prefix(-1, self.cache.bytes, evicted)

    def _prefill_chunk(self, x: _Live, alone: bool) -> None:
        total = x.embeds.shape[1]
        step = total - x.fed if (alone or self.chunk is None) else self.chunk
        piece = x.embeds[:, x.fed:x.fed + step]
        logits = self.pool.prefill(x.row, piece)
        x.fed += piece.shape[1]
        if not x.prefilling:  # the prompt is in: its last logits give the first token
            now = time.perf_counter()
            x.stats.prefill_ms = (now - x.t_prefill) * 1e3
            x.t_decode = now
            x.embeds = x.embeds[:, :0]  # the prompt's embeddings are no longer needed
            self._remember(x)  # requests about the same frame, arriving now, share it
            self._advance(x, logits)

    def _advance(self, x: _Live, logits: np.ndarray) -> None:
        """Sample one token for x and stream it; end x on EOS, a stop string or max_tokens."""
        tok = x.sampler(logits)
        x.stats.decode_tokens += 1
        if tok == self.gen.tok.eos_id:
            return self._end(x, "stop")
        # Checked here, just before the send, not only at the step's start: tritonserver
        # 2.51's gRPC frontend can crash when a response races the client's cancel
        # (triton-inference-server/server#7840, #8034; seen here once in a soak), and the
        # decode step between the two would widen that window to a whole step.
        if self._is_cancelled(x.req):
            return self._end(x, "cancelled")
        delta = x.detok.push(tok)
        if delta and not self._safe(x.req.emit, Event(delta)):
            return self._end(x, "cancelled")
        if x.detok.stopped or x.sampler.complete:  # a stop string, or the grammar is satisfied
            return self._end(x, "stop")
        if x.stats.decode_tokens >= x.max_new:
            return self._end(x, "length")
        x.next_token = tok

    def _end(self, x: _Live, finish: str = "", error: Exception | None = None) -> None:
        if x in self.live:
            self.live.remove(x)
            if error is None:
                self._remember(x)
            self.pool.release(x.row)
        if error is not None:
            self._safe(x.req.fail, error)
            self.obs.finished("invalid" if getattr(error, "status", None) == "INVALID_ARG" else "error",
                              x.stats.decode_tokens)
        else:
            if x.t_decode:
                x.stats.decode_ms = (time.perf_counter() - x.t_decode) * 1e3
            self._send_final(x.req, x.stats, x.detok.flush() if finish != "cancelled" else "", finish)
        self._report_depth()

    def _send_final(self, req: Request, stats: Stats, text: str, finish: str) -> None:
        stats.finish_reason = finish
        sent = self._safe(req.emit, Event(text, stats))
        outcome = "cancelled" if finish == "cancelled" else ("complete" if sent else "error")
        self.obs.finished(outcome, stats.decode_tokens)

    @staticmethod
    def _safe(callback, arg) -> bool:
        """Run a request's callback; False if it raised (the client's stream is gone)."""
        try:
            callback(arg)
            return True
        except Exception as e:
            log.warning("could not deliver to a stream: %s", e)
            return False

    def _report_depth(self) -> None:
        self.obs.depth(len(self.live), len(self.queue) + self.reserved)
