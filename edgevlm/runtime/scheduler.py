"""The decode loop: every live sequence advances by one token per decoder call.

The only code that turns logits into streamed text (sampling, stop rules, grammars,
max_tokens, cancellation, stats). One Scheduler per model instance, one thread; a request
alone is a batch of one, not another loop. The scheduler decides; the model's KV pool
(kv_pool.py) executes.

Requests are `submit`ted (checked at once: a bad one raises BadRequest, a full queue raises
Busy) and wait in a FIFO queue that holds at most `max_queue` requests beyond the free rows
(0: refuse whenever all rows are busy). A request still being prepared (its image encoded)
holds a `Reservation` of a queue place. Between steps the thread admits the head of the
queue when the pool has room, and each iteration then does:

  1. drop the rows whose client cancelled (they free their row now, not at their end),
  2. one decode step: a single pool call over all decoding rows, each at its own position;
     each row samples with its own parameters, seed, penalty, grammar and stop strings,
  3. one prefill chunk of the oldest admitted prompt, at most `prefill_chunk` positions, so
     a new request stalls the running streams by one chunk per token (`make bench` measures
     it); with no stream decoding the whole prompt goes in one call.

With a PrefixCache (prefix_cache.py), an admitted prompt first takes the KV of the longest
prefix it shares with an earlier sequence, and only the rest is prefilled; its prompt is
stored once prefilled, and its prompt and answer when it ends.

Events go out through each request's `emit` (text deltas, then a final event with stats)
or its `fail` (an exception); both are called on the scheduler thread. No Triton here: the
`mobilevlm` model is an adapter that submits requests and forwards these events; tests,
benchmarks and `make verify` drive it in process through `generate`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgevlm.runtime.detokenize import IncrementalDecoder
from edgevlm.runtime.embedding import prompt_positions
from edgevlm.runtime.errors import BadRequest, Busy
from edgevlm.runtime.events import CANCELLED, LENGTH, STOP, TOOL_CALLS, Event, Stats
from edgevlm.runtime.kv_pool import Row
from edgevlm.runtime.observer import CANCELLED as CANCELLED_OUTCOME
from edgevlm.runtime.observer import COMPLETE, ERROR, Observer, Quiet, outcome_of
from edgevlm.runtime.prefix_cache import PrefixCache, position_keys
from edgevlm.runtime.sampling import Sampler, SamplingParams
from edgevlm.runtime.text_model import TextModel

log = logging.getLogger(__name__)

PREFILL_CHUNK = 64  # positions per prefill call while other streams decode (see make bench)


@dataclass(eq=False)
class Request:
    input_ids: Sequence[int]
    image_embeds: Sequence[np.ndarray] | None  # each image's [N_i, D], in placeholder order
    params: SamplingParams
    emit: Callable[[Event], None]
    fail: Callable[[Exception], None]
    cancelled: Callable[[], bool] = lambda: False
    image_encode_ms: float = 0.0
    image_cached: bool = False  # the embeddings came from the image cache
    frames: int = 0  # a clip's frames (LLaVA-NeXT-Video), among image_embeds as one entry
    frame_tokens: int = 0  # of its positions, each frame's
    video_decode_ms: float = 0.0
    cross: object = None  # cross_attention.CrossRow: a cross-attention model's image (its ids hold its token)
    tools: object = None  # tools.Toolset: the answer may be calls, read back when it ends
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def image_tokens(self) -> int:
        return 0 if self.image_embeds is None else sum(int(e.shape[0]) for e in self.image_embeds)


class Reservation:
    """A queue place held for a request still being prepared (its image encoding), so a full
    queue refuses it before that work. `submit(..., reservation=)` uses the place; `release()`
    gives it back otherwise. Both may happen in any order, any number of times: the place is
    returned exactly once, so a `finally: reservation.release()` on every path is safe."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler = scheduler
        self.held = True  # guarded by the scheduler's lock

    def release(self) -> None:
        with self._scheduler.cond:
            self._give_back()

    def _give_back(self) -> None:  # with the scheduler's lock held
        if self.held:
            self.held = False
            self._scheduler.reserved -= 1
            self._scheduler._report_depth()


class _Live:
    """One admitted request: its row, sampler, detokenizer, stats and progress."""

    def __init__(self, req: Request, row: Row, embeds: np.ndarray, max_new: int, sampler: Sampler, detok):
        self.req, self.row, self.max_new = req, row, max_new
        self.embeds: np.ndarray | None = embeds  # the prompt's, consumed chunk by chunk
        self.total = embeds.shape[1]  # prompt positions
        self.fed = 0  # prefilled so far
        self.sampler, self.detok = sampler, detok
        self.stats = Stats(images=(0 if req.image_embeds is None else len(req.image_embeds)) + (req.cross is not None)
                           - (req.frames > 0), frames=req.frames, frame_tokens=req.frame_tokens,
                           video_decode_ms=req.video_decode_ms,
                           image_encode_ms=req.image_encode_ms, prefill_tokens=self.total,
                           image_cached=req.image_cached,
                           image_tokens=req.image_tokens if req.cross is None else req.cross.image.tokens,
                           image_tiles=0 if req.cross is None else req.cross.image.tiles,
                           queue_ms=(time.perf_counter() - req.submitted) * 1e3)
        self.keys: np.ndarray | None = None  # the prompt's position keys (with a prefix cache)
        self.fed_tokens: list[int] = []  # generated tokens whose KV is in the row
        self.t_prefill = time.perf_counter()
        self.t_decode = 0.0
        self.next_token = -1  # fed at the next decode step
        self.logprobs: list[dict] | None = [] if req.params.logprobs is not None else None  # not yet sent
        self.text = ""  # with tools: the answer so far, read back into calls at its end

    @property
    def prefilling(self) -> bool:
        return self.fed < self.total


class Scheduler:
    def __init__(self, model: TextModel, *, max_queue: int, prefill_chunk: int = PREFILL_CHUNK,
                 observer: Observer | None = None, prefix_cache: PrefixCache | None = None):
        self.model, self.pool = model, model.pool
        self.max_queue = max_queue
        self.chunk = prefill_chunk if self.pool.chunked_prefill else None
        reusable = self.pool.reuses_prefix and self.pool.chunked_prefill  # copies KV in, prefills at an offset
        self.cache = prefix_cache if reusable and prefix_cache is not None and prefix_cache.budget > 0 else None
        self.obs = observer or Quiet()
        # The lock guards what request threads and the scheduler thread share: the queue, the
        # reserved places, `admitted` (rows taken, which admission and refusal count) and
        # `closing`. The live rows, the pool and the prefix cache are the scheduler thread's
        # alone, and the work of admission (embedding, prefix copies) runs outside the lock.
        self.cond = threading.Condition()
        self.queue: deque[tuple[Request, int, int]] = deque()  # (request, prompt positions, new tokens)
        self.reserved = 0
        self.admitted = 0
        self.closing = False
        self.live: list[_Live] = []
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    # -- called from request threads ------------------------------------------------------------
    def check(self, input_ids: Sequence[int], image_tokens: int, params: SamplingParams) -> tuple[int, int]:
        """(prompt positions, tokens to generate) of a request, or BadRequest."""
        params.validate()
        if len(input_ids) == 0:
            raise BadRequest("prompt is empty")
        n_prompt = prompt_positions(input_ids, image_tokens)
        context = self.model.max_context
        if n_prompt >= context:
            images = f" ({image_tokens} of them its images')" if image_tokens else ""
            raise BadRequest(f"prompt is {n_prompt} tokens{images}, the context holds {context}")
        if params.response_format is not None or params.grammar is not None:
            # compiled once; a bad one is refused here
            self.model.grammars.check(params.response_format, params.grammar)
        max_new = min(params.max_tokens, context - n_prompt)
        if self.pool.never_fits(n_prompt + max_new):
            raise BadRequest(f"prompt and max_tokens need {n_prompt + max_new} positions; "
                             "the KV cache of this server holds fewer (ask for fewer max_tokens)")
        return n_prompt, max_new

    def reserve(self) -> Reservation:
        """A queue place for a request still being prepared, or Busy."""
        with self.cond:
            self._refuse_if_full()
            self.reserved += 1
            self._report_depth()
            return Reservation(self)

    def submit(self, req: Request, reservation: Reservation | None = None) -> None:
        """Queue a request (BadRequest if it is invalid, Busy if the queue is full). A
        reservation is used for it, or given back when the request is refused."""
        try:
            n_prompt, max_new = self.check(req.input_ids, req.image_tokens, req.params)
        except BadRequest:
            if reservation is not None:
                reservation.release()
            raise
        with self.cond:
            if reservation is not None and reservation.held:
                reservation._give_back()
            else:
                self._refuse_if_full()
            self.queue.append((req, n_prompt, max_new))
            self._report_depth()
            self.cond.notify()

    def generate(self, input_ids: Sequence[int], image_embeds: np.ndarray | None = None,
                 params: SamplingParams | None = None, **request) -> Iterator[Event]:
        """Submit a request and yield its events as they come (in-process use: tests,
        benchmarks, `make verify`). Leaving the loop early cancels the request."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        left = threading.Event()
        self.submit(Request(input_ids, image_embeds, params or SamplingParams(), events.put, events.put,
                            left.is_set, **request))
        try:
            while True:
                event = events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if event.final:
                    return
        finally:
            left.set()

    def _refuse_if_full(self) -> None:  # with the lock held
        if self.closing:
            raise Busy("busy: the model is shutting down")
        waiting = len(self.queue) + self.reserved
        free = max(0, self.pool.max_rows - self.admitted)  # waiting requests a free row takes at once
        if waiting - free >= self.max_queue:
            raise Busy(f"busy: {self.admitted} sequences active, {waiting} queued")

    def counts(self) -> tuple[int, int]:
        """(sequences admitted, requests queued)."""
        with self.cond:
            return self.admitted, len(self.queue)

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
            self._end(live, CANCELLED)
        with self.cond:
            queued, self.queue = list(self.queue), deque()
            self._report_depth()
        for req, _, _ in queued:
            self._send_final(req, Stats(), "", CANCELLED)

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        decoding = [x for x in self.live if not x.prefilling]
        if decoding:
            embeds = self.model.table.embed([x.next_token for x in decoding])[0][:, None]  # [B, 1, D]
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
            self._end(live, CANCELLED)
        with self.cond:
            gone = [q for q in self.queue if self._is_cancelled(q[0])]
            for q in gone:
                self.queue.remove(q)
            if gone:
                self._report_depth()
        for req, _, _ in gone:
            self._send_final(req, Stats(), "", CANCELLED)

    @staticmethod
    def _is_cancelled(req: Request) -> bool:
        try:
            return bool(req.cancelled())
        except Exception:  # the stream is gone: nobody is listening
            return True

    def _admit(self) -> None:
        """Admit from the queue's head while the pool has room. One prompt is prefilled at a
        time, so a second waits in the queue (cancellable, costing no row) until it starts."""
        while not any(x.prefilling for x in self.live):
            with self.cond:
                if not self.queue or not self.pool.fits(self.queue[0][1] + self.queue[0][2]):
                    return
                req, n_prompt, max_new = self.queue.popleft()
                self.admitted += 1
                self._report_depth()
            row = None
            try:
                sampler = self._sampler(req)
                embeds = self.model.table.embed(req.input_ids, req.image_embeds)
                row = self.pool.acquire(n_prompt + max_new, req.cross)
                live = _Live(req, row, embeds, max_new, sampler, IncrementalDecoder(self.model.tok, req.params.stop))
                if self.cache is not None:
                    self._reuse_prefix(live)
            except Exception as e:
                if row is not None:
                    self.pool.release(row)
                self._leave()
                self._safe(req.fail, e)
                self.obs.finished(outcome_of(e), 0)
                continue
            self.live.append(live)

    def _sampler(self, req: Request) -> Sampler:
        p = req.params
        constraint = self.model.grammars.constraint(p.response_format, p.grammar) \
            if p.response_format or p.grammar else None
        return Sampler(req.params, req.input_ids, constraint, vocab=self.model.tok.vocab_size,
                       stop_ids=self.model.tok.stop_ids)

    def _leave(self) -> None:
        with self.cond:
            self.admitted -= 1
            self._report_depth()

    def _reuse_prefix(self, x: _Live) -> None:
        """Start x from the cached KV of its longest known prefix; its last prompt position is
        always prefilled (its logits give the first token)."""
        x.keys = position_keys(x.req.input_ids, x.req.image_embeds, x.req.cross)
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
        step = x.total - x.fed if (alone or self.chunk is None) else self.chunk
        piece = x.embeds[:, x.fed:x.fed + step]
        logits = self.pool.prefill(x.row, piece)
        x.fed += piece.shape[1]
        if not x.prefilling:  # the prompt is in: its last logits give the first token
            now = time.perf_counter()
            x.stats.prefill_ms = (now - x.t_prefill) * 1e3
            x.t_decode = now
            x.embeds = None  # the prompt's embeddings are no longer needed
            self._remember(x)  # requests about the same frame, arriving now, share it
            self._advance(x, logits)

    def _advance(self, x: _Live, logits: np.ndarray) -> None:
        """Sample one token for x and stream it; end x on EOS, a stop string or max_tokens."""
        tok = x.sampler(logits)
        x.stats.decode_tokens += 1
        if tok in self.model.tok.stop_ids:
            return self._end(x, STOP)
        # Checked here, just before the send, not only at the step's start: tritonserver
        # 2.51's gRPC frontend can crash when a response races the client's cancel
        # (triton-inference-server/server#7840, #8034; seen here once in a soak), and the
        # decode step between the two would widen that window to a whole step.
        if self._is_cancelled(x.req):
            return self._end(x, CANCELLED)
        if x.logprobs is not None:
            x.logprobs.append(self._logprob_entry(tok, *x.sampler.last_logprobs))
        delta = x.detok.push(tok)
        if x.req.tools is not None:
            x.text += delta
        if delta and not self._safe(x.req.emit, Event(delta, logprobs=_take(x))):
            return self._end(x, CANCELLED)
        if x.detok.stopped or x.sampler.complete:  # a stop string, or the grammar is satisfied
            return self._end(x, STOP)
        if x.stats.decode_tokens >= x.max_new:
            return self._end(x, LENGTH)
        x.next_token = tok

    def _end(self, x: _Live, finish: str = "", error: Exception | None = None) -> None:
        if x in self.live:
            self.live.remove(x)
            if error is None:
                self._remember(x)
            self.pool.release(x.row)
            self._leave()
        if error is not None:
            self._safe(x.req.fail, error)
            self.obs.finished(outcome_of(error), x.stats.decode_tokens)
            return
        if x.t_decode:
            x.stats.decode_ms = (time.perf_counter() - x.t_decode) * 1e3
        text = x.detok.flush() if finish != CANCELLED else ""
        if x.req.tools is not None and finish == STOP:
            x.stats.tool_calls = x.req.tools.read(x.text + text)
            finish = TOOL_CALLS if x.stats.tool_calls else finish
        self._send_final(x.req, x.stats, text, finish, _take(x))

    def _logprob_entry(self, tok: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        """One token's entry of the logprobs output (contract.LOGPROBS)."""
        def spelled(i: int) -> dict:
            data = self.model.tok.token_bytes(i)
            return {"token": data.decode("utf-8", errors="replace"), "bytes": list(data)}
        return {**spelled(tok), "logprob": logprob,
                "top_logprobs": [{**spelled(i), "logprob": lp} for i, lp in top]}

    def _send_final(self, req: Request, stats: Stats, text: str, finish: str,
                    logprobs: list[dict] | None = None) -> None:
        stats.finish_reason = finish
        sent = self._safe(req.emit, Event(text, stats, logprobs))
        outcome = CANCELLED_OUTCOME if finish == CANCELLED else (COMPLETE if sent else ERROR)
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
        # With the lock held: reports from different threads reach the gauges in order.
        self.obs.depth(self.admitted, len(self.queue) + self.reserved)


def _take(x: _Live) -> list[dict] | None:
    """x's logprobs entries not yet sent (None without the option), handed over once."""
    taken = x.logprobs
    if taken is not None:
        x.logprobs = []
    return taken
