"""The scheduler and its KV pools, in process: batched text equals text alone, slots come
back, a full queue refuses at once, a faulty step fails its rows and the next request works."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgevlm.runtime.errors import BadRequest, Busy
from edgevlm.runtime.runners import load_generator
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.scheduler import Observer, Request, Scheduler
from edgevlm.runtime.slots import PackedPool, SequencePool, open_pool

PATIENCE_S = 120.0  # hangs only


class Counting(Observer):
    def __init__(self):
        self.steps, self.rows, self.outcomes = 0, 0, {}

    def step(self, rows, seconds):
        self.steps += 1
        self.rows += rows

    def finished(self, outcome, tokens):
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class Stream:
    """What a client stream sees: text deltas, a final event's stats, or an error."""

    def __init__(self):
        self.text, self.stats, self.error = [], None, None
        self.done = threading.Event()
        self.first = threading.Event()
        self.cancel = False

    def emit(self, event):
        self.text.append(event.text)
        self.first.set()
        if event.final:
            self.stats = event.stats
            self.done.set()

    def fail(self, exc):
        self.error = exc
        self.done.set()

    def request(self, ids, params, embeds=None):
        return Request(ids, embeds, params, self.emit, self.fail, lambda: self.cancel)

    def wait(self):
        assert self.done.wait(PATIENCE_S), "the stream never ended"
        return self


@pytest.fixture(scope="module", params=["static", "concat"])
def gen(request, tiny_onnx):
    return load_generator(tiny_onnx, kv_cache=request.param)


def _workload(gen):
    """Prompts of mixed lengths (one with an image) and parameters: greedy, seeded sampling,
    a repetition penalty, a stop string; different max_tokens so rows leave mid-batch."""
    rng = np.random.default_rng(0)
    cfg_tokens = 16  # tiny's image tokens
    image = rng.standard_normal((1, cfg_tokens, gen.table.table.shape[1])).astype(np.float32)
    prompts = [list(map(int, rng.integers(3, 1000, size=n))) for n in (5, 40, 100, 7, 70, 3, 150, 20)]
    prompts[1][3] = -200  # the image placeholder
    params = [SamplingParams(max_tokens=30), SamplingParams(max_tokens=90),
              SamplingParams(max_tokens=60, temperature=0.8, seed=3),
              SamplingParams(max_tokens=200, repetition_penalty=1.3),
              SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=5),
              SamplingParams(max_tokens=120, stop=("e",)),
              SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, seed=9),
              SamplingParams(max_tokens=33)]
    embeds = [image if 1 == i else None for i in range(len(prompts))]
    return prompts, params, embeds


def _alone(gen, ids, params, embeds):
    events = list(gen.generate(ids, embeds, params))
    return "".join(e.text for e in events), events[-1].stats


@pytest.mark.parametrize("chunk", [16, 1000])
def test_each_stream_under_batching_equals_its_text_alone(gen, chunk):
    prompts, params, embeds = _workload(gen)
    expected = [_alone(gen, *w) for w in zip(prompts, params, embeds)]
    pool = open_pool(gen.decoder, 4, 0, gen.max_context)
    assert isinstance(pool, PackedPool if gen.decoder.static else SequencePool)
    obs = Counting()
    sched = Scheduler(gen, pool, max_queue=8, prefill_chunk=chunk, observer=obs)
    try:
        streams = [Stream() for _ in prompts]
        for s, w in zip(streams, zip(prompts, params, embeds)):
            sched.submit(s.request(*w))
        for s, (text, stats) in zip(streams, expected):
            s.wait()
            assert s.error is None
            assert "".join(s.text) == text
            assert (s.stats.decode_tokens, s.stats.finish_reason) == (stats.decode_tokens, stats.finish_reason)
        assert sched.counts() == (0, 0) and pool.rows == []
        assert obs.outcomes == {"complete": len(prompts)}
        assert obs.rows > obs.steps  # rows did share steps (4 slots, 8 requests)
    finally:
        sched.close()


def test_packed_rows_stay_correct_when_the_width_grows_and_rows_move(tiny_onnx):
    """Long generations cross several width granules while shorter rows leave and the last
    row is moved into their place."""
    gen = load_generator(tiny_onnx, kv_cache="static")
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(3, 1000, size=n))) for n in (3, 120, 9, 60)]
    params = [SamplingParams(max_tokens=m) for m in (5, 250, 40, 300)]
    expected = [_alone(gen, p, sp, None)[0] for p, sp in zip(prompts, params)]
    pool = PackedPool(gen.decoder, 4, 4 * 512 * pool_bytes_per_position(gen))
    sched = Scheduler(gen, pool, max_queue=4, prefill_chunk=32)
    try:
        streams = [Stream() for _ in prompts]
        for s, p, sp in zip(streams, prompts, params):
            sched.submit(s.request(p, sp))
        assert ["".join(s.wait().text) for s in streams] == expected
    finally:
        sched.close()


def pool_bytes_per_position(gen) -> int:
    c = gen.decoder.cfg
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * gen.decoder.kv_dtype.itemsize


def test_a_full_queue_refuses_at_once_and_a_cancel_frees_the_slot(tiny_onnx):
    gen = load_generator(tiny_onnx)
    pool = open_pool(gen.decoder, 1, 0, gen.max_context)
    obs = Counting()
    sched = Scheduler(gen, pool, max_queue=1, observer=obs)
    try:
        long, queued = Stream(), Stream()
        sched.submit(long.request([5, 6, 7], SamplingParams(max_tokens=440)))
        assert long.first.wait(PATIENCE_S)  # admitted and streaming: the only slot is taken
        sched.submit(queued.request([8, 9], SamplingParams(max_tokens=4)))
        with pytest.raises(Busy, match=r"^busy: 1 sequences active, 1 queued$"):
            sched.submit(Stream().request([8, 9], SamplingParams(max_tokens=4)))
        long.cancel = True
        assert long.wait().stats.finish_reason == "cancelled"
        assert queued.wait().stats.finish_reason == "length"  # admitted once the slot was free
        assert obs.outcomes == {"cancelled": 1, "complete": 1}
        assert sched.counts() == (0, 0) and pool.rows == []
    finally:
        sched.close()


def test_bad_requests_are_refused_before_they_queue(tiny_onnx):
    gen = load_generator(tiny_onnx)
    sched = Scheduler(gen, open_pool(gen.decoder, 2, 0, gen.max_context), max_queue=2)
    try:
        with pytest.raises(BadRequest, match="context holds"):
            sched.submit(Stream().request(list(range(3, 600)), SamplingParams()))
        with pytest.raises(BadRequest, match="temperature"):
            sched.submit(Stream().request([5], SamplingParams(temperature=-1.0)))
        assert sched.counts() == (0, 0)
    finally:
        sched.close()


class FaultyOnce:
    """A pool whose next decode step raises (a stand-in for a runner fault)."""

    def __init__(self, pool):
        self.pool, self.armed = pool, True

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def decode(self, rows, embeds):
        if self.armed:
            self.armed = False
            raise RuntimeError("injected step fault")
        return self.pool.decode(rows, embeds)


def test_a_faulty_step_fails_its_rows_and_the_next_request_succeeds(tiny_onnx):
    gen = load_generator(tiny_onnx)
    pool = open_pool(gen.decoder, 2, 0, gen.max_context)
    faulty = FaultyOnce(pool)
    obs = Counting()
    sched = Scheduler(gen, faulty, max_queue=2, observer=obs)
    try:
        hit = Stream()
        sched.submit(hit.request([5, 6], SamplingParams(max_tokens=8)))
        assert isinstance(hit.wait().error, RuntimeError)
        ok = Stream()
        sched.submit(ok.request([5, 6], SamplingParams(max_tokens=8)))
        assert ok.wait().stats.finish_reason == "length"
        assert obs.outcomes == {"error": 1, "complete": 1} and pool.rows == []
    finally:
        sched.close()


def test_a_stream_that_cannot_be_sent_to_leaves_the_batch(tiny_onnx):
    gen = load_generator(tiny_onnx)
    pool = open_pool(gen.decoder, 2, 0, gen.max_context)
    obs = Counting()
    sched = Scheduler(gen, pool, max_queue=2, observer=obs)
    gone = threading.Event()

    def broken(event):
        gone.set()
        raise ConnectionError("client went away")
    try:
        sched.submit(Request([5, 6, 7], None, SamplingParams(max_tokens=440), broken, lambda e: None))
        assert gone.wait(PATIENCE_S)
        ok = Stream()
        sched.submit(ok.request([5], SamplingParams(max_tokens=4)))
        ok.wait()
        assert obs.outcomes == {"cancelled": 1, "complete": 1} and pool.rows == []
    finally:
        sched.close()


def test_images_that_arrive_during_an_encode_go_in_one_call():
    """The first image is encoded alone; the three that arrive while it runs share one call,
    each gets its own rows back, and a failing call fails only the requests in it."""
    import numpy as np

    from edgevlm.runtime.batcher import Batcher
    started, release = threading.Event(), threading.Event()
    calls = []

    def encode(x):
        calls.append(x.shape[0])
        if len(calls) == 1:
            started.set()
            assert release.wait(PATIENCE_S)
        if (x == -1).any():
            raise RuntimeError("encoder fault")
        return x[:, :1] * 10, 5.0
    got, done = {}, threading.Semaphore(0)

    def receiver(name):
        def done_cb(rows, ms, error):
            got[name] = (None if rows is None else rows[:, 0].tolist(), ms, error)
            done.release()
        return done_cb
    b = Batcher(encode, max_batch=8)
    try:
        b.put(np.full((1, 2), 1.0), receiver("first"))
        assert started.wait(PATIENCE_S)
        b.put(np.full((1, 2), 2.0), receiver("a"))
        b.put(np.full((2, 2), 3.0), receiver("b"))  # a request of two images
        b.put(np.full((1, 2), 4.0), receiver("c"))
        release.set()
        for _ in range(4):
            assert done.acquire(timeout=PATIENCE_S)
        assert calls == [1, 4]
        assert got["first"] == ([10.0], 5.0, None) and got["a"][0] == [20.0]
        assert got["b"][0] == [30.0, 30.0] and got["c"][0] == [40.0]
        b.put(np.full((1, 2), -1.0), receiver("bad"))
        assert done.acquire(timeout=PATIENCE_S)
        assert isinstance(got["bad"][2], RuntimeError)
        b.put(np.full((1, 2), 5.0), receiver("after"))
        assert done.acquire(timeout=PATIENCE_S) and got["after"][0] == [50.0]
    finally:
        b.close()
