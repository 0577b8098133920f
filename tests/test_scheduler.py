"""The scheduler and its KV pools, in process: batched text equals text alone, rows come
back, a full queue refuses at once, a reservation comes back on every path, a faulty step
fails its rows and the next request works."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgevlm.runtime.concat_pool import ConcatPool
from edgevlm.runtime.errors import BadRequest, Busy
from edgevlm.runtime.kv_pool import KVPool
from edgevlm.runtime.observer import Observer
from edgevlm.runtime.ort_packed_pool import OrtPackedPool
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.scheduler import Request, Scheduler
from edgevlm.runtime.text_model import TextModel, open_text_model

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

    def cancelled(self):
        return self.cancel

    def request(self, ids, params, embeds=None):
        return Request(ids, embeds, params, self.emit, self.fail, self.cancelled)

    def wait(self):
        assert self.done.wait(PATIENCE_S), "the stream never ended"
        return self


def with_pool(model: TextModel, pool: KVPool) -> TextModel:
    """The model's tokenizer and table over another pool."""
    return TextModel(model.tok, model.table, pool, model.max_context)


@pytest.fixture(scope="module", params=["static", "concat"])
def kv(request):
    return request.param


@pytest.fixture(scope="module")
def model(kv, tiny_onnx):
    """A one-row pool: what a request alone runs on."""
    return open_text_model(tiny_onnx, kv_cache=kv, max_rows=1)


def alone(model: TextModel, ids, params, embeds=None):
    """(text, final stats) of one request on a scheduler of its own, one row."""
    sched = Scheduler(model, max_queue=1)
    try:
        events = list(sched.generate(ids, embeds, params))
    finally:
        sched.close()
    return "".join(e.text for e in events), events[-1].stats


def _workload(model):
    """Prompts of mixed lengths (one with an image) and parameters: greedy, seeded sampling,
    a repetition penalty, a stop string; different max_tokens so rows leave mid-batch."""
    rng = np.random.default_rng(0)
    cfg_tokens = 16  # tiny's image tokens
    image = rng.standard_normal((1, cfg_tokens, model.table.table.shape[1])).astype(np.float32)
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


@pytest.mark.parametrize("chunk", [16, 1000])
def test_each_stream_under_batching_equals_its_text_alone(model, tiny_onnx, kv, chunk):
    prompts, params, embeds = _workload(model)
    expected = [alone(model, *w) for w in zip(prompts, params, embeds)]
    batched = open_text_model(tiny_onnx, kv_cache=kv, max_rows=4)
    assert isinstance(batched.pool, KVPool) and isinstance(batched.pool, OrtPackedPool if kv == "static" else ConcatPool)
    pool = batched.pool
    obs = Counting()
    sched = Scheduler(batched, max_queue=8, prefill_chunk=chunk, observer=obs)
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
    model = open_text_model(tiny_onnx, kv_cache="static", max_rows=1)
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(3, 1000, size=n))) for n in (3, 120, 9, 60)]
    params = [SamplingParams(max_tokens=m) for m in (5, 250, 40, 300)]
    expected = [alone(model, p, sp)[0] for p, sp in zip(prompts, params)]
    pool = OrtPackedPool(model.pool.d, 4, 4 * 512 * model.pool.bytes_per_position)
    sched = Scheduler(with_pool(model, pool), max_queue=4, prefill_chunk=32)
    try:
        streams = [Stream() for _ in prompts]
        for s, p, sp in zip(streams, prompts, params):
            sched.submit(s.request(p, sp))
        assert ["".join(s.wait().text) for s in streams] == expected
    finally:
        sched.close()


def test_a_full_queue_refuses_at_once_and_a_cancel_frees_the_slot(tiny_onnx):
    model = open_text_model(tiny_onnx, max_rows=1)
    pool = model.pool
    obs = Counting()
    sched = Scheduler(model, max_queue=1, observer=obs)
    release = threading.Event()

    class Held(Stream):  # its first delta holds the scheduler until released: the slot stays taken
        def emit(self, event):
            super().emit(event)
            assert release.wait(PATIENCE_S)
    try:
        long, queued = Held(), Stream()
        sched.submit(long.request([5, 6, 7], SamplingParams(max_tokens=440)))
        assert long.first.wait(PATIENCE_S)  # admitted and streaming: the only slot is taken
        sched.submit(queued.request([8, 9], SamplingParams(max_tokens=4)))
        with pytest.raises(Busy, match=r"^busy: 1 sequences active, 1 queued$"):
            sched.submit(Stream().request([8, 9], SamplingParams(max_tokens=4)))
        long.cancel = True
        release.set()
        assert long.wait().stats.finish_reason == "cancelled"
        assert queued.wait().stats.finish_reason == "length"  # admitted once the slot was free
        assert obs.outcomes == {"cancelled": 1, "complete": 1}
        assert sched.counts() == (0, 0) and pool.rows == []
    finally:
        release.set()
        sched.close()


def test_bad_requests_are_refused_before_they_queue(tiny_onnx):
    sched = Scheduler(open_text_model(tiny_onnx, max_rows=2), max_queue=2)
    try:
        with pytest.raises(BadRequest, match="context holds"):
            sched.submit(Stream().request(list(range(3, 600)), SamplingParams()))
        with pytest.raises(BadRequest, match="temperature"):
            sched.submit(Stream().request([5], SamplingParams(temperature=-1.0)))
        assert sched.counts() == (0, 0)
    finally:
        sched.close()


@pytest.mark.parametrize("broken", ["pack", "cache put"])
def test_a_queue_place_comes_back_when_a_step_after_the_encode_fails(tiny_onnx, monkeypatch, broken):
    """An image request holds a queue place while it is encoded; whatever fails after the
    encode (LLaVA-1.6's tile packing, the image cache), the place comes back: with no queue
    beyond the one row, a lost place would refuse the next request."""
    from edgevlm.runtime.image_cache import ImageCache
    from edgevlm.runtime.intake import Intake
    from edgevlm.runtime.observer import Quiet
    from edgevlm.runtime.requests import Preprocessor
    from edgevlm.runtime.runners import VisionEncoder
    from edgevlm.samples import sample_image
    model = open_text_model(tiny_onnx, max_rows=1)
    sched = Scheduler(model, max_queue=0)
    pre, cache = Preprocessor(tiny_onnx, tokenizer=model.tok), ImageCache(1 << 20)
    intake = Intake(pre, sched, VisionEncoder(tiny_onnx), image_cache=cache, observer=Quiet(), max_batch=2,
                    default_max_tokens=4)
    inputs = {"prompt": np.array([b"What is in the image?"], object),
              "image": np.array([sample_image("chelsea")], object)}

    def fault(*args):
        raise RuntimeError(f"injected {broken} fault")
    try:
        with monkeypatch.context() as m:
            m.setattr(*((pre, "pack") if broken == "pack" else (cache, "put")), fault)
            failed = Stream()
            intake.accept(inputs, failed)
            assert "injected" in str(failed.wait().error)
        assert sched.reserved == 0
        ok = Stream()
        intake.accept(inputs, ok)
        assert ok.wait().error is None and ok.stats.finish_reason == "length"
    finally:
        intake.close()
        sched.close()


def test_a_clip_is_decoded_off_the_thread_that_admits_requests(tiny_onnx, monkeypatch):
    """While a clip is being decoded, accept has returned and a text request admitted after it
    is answered; the clip's request then finishes (MobileVLM reading its frames as pictures);
    a clip that does not decode fails its stream, and its queue place comes back."""
    from edgevlm.runtime.errors import BadRequest as Refused
    from edgevlm.runtime.image_cache import ImageCache
    from edgevlm.runtime.intake import Intake
    from edgevlm.runtime.observer import Quiet
    from edgevlm.runtime.requests import Preprocessor
    from edgevlm.runtime.runners import VisionEncoder
    from test_llava_video import write_clip
    model = open_text_model(tiny_onnx, max_rows=2)
    sched = Scheduler(model, max_queue=2)
    pre = Preprocessor(tiny_onnx, tokenizer=model.tok)
    intake = Intake(pre, sched, VisionEncoder(tiny_onnx), image_cache=ImageCache(0), observer=Quiet(), max_batch=2,
                    default_max_tokens=4)
    decoding, release = threading.Event(), threading.Event()
    real = pre.decode_clip

    def held(clip):
        decoding.set()
        assert release.wait(PATIENCE_S)
        real(clip)
    monkeypatch.setattr(pre, "decode_clip", held)
    clip = {"prompt": np.array([b"What happens?"], object), "video": np.array([write_clip()], object),
            "video_frames": np.array([2], np.int32)}
    try:
        watched = Stream()
        intake.accept(clip, watched)  # returns with the decode still held
        assert decoding.wait(PATIENCE_S)
        text = Stream()
        intake.accept({"prompt": np.array([b"Hi"], object)}, text)
        assert text.wait().error is None and not watched.done.is_set()
        release.set()
        assert watched.wait().error is None and (watched.stats.frames, watched.stats.frame_tokens) == (
            2, pre.cfg.image_tokens)
        broken = Stream()
        intake.accept({**clip, "video": np.array([b"not a clip at all"], object)}, broken)
        assert isinstance(broken.wait().error, Refused) and "video:" in str(broken.error)
        assert sched.reserved == 0
    finally:
        release.set()
        intake.close()
        sched.close()


def test_a_cancel_message_stops_the_generation_it_names(tiny_onnx):
    """In-band cancellation, in process: a cancel message naming a running generation's
    request id ends it at its next step with its final event (finish_reason cancelled); an id
    in use is refused; once ended, the id is forgotten."""
    from edgevlm.runtime.errors import BadRequest as Refused
    from edgevlm.runtime.image_cache import ImageCache
    from edgevlm.runtime.intake import Intake
    from edgevlm.runtime.observer import Quiet
    from edgevlm.runtime.requests import Preprocessor
    model = open_text_model(tiny_onnx, max_rows=1)
    sched = Scheduler(model, max_queue=2)
    intake = Intake(Preprocessor(tiny_onnx, tokenizer=model.tok), sched, lambda px: (px, 0.0),
                    image_cache=ImageCache(0), observer=Quiet(), max_batch=1, default_max_tokens=440)
    story = {"prompt": np.array([b"Tell me a long story."], object)}
    cancel = {"cancel": np.array([b"story-1"], object)}
    try:
        for _ in range(3):  # a generation may end before its cancel lands; one in three must not
            running = Stream()
            intake.accept(story, running, "story-1")
            assert running.first.wait(PATIENCE_S)
            with pytest.raises(Refused, match="already in use"):
                intake.accept(story, Stream(), "story-1")
            found = intake.cancel(cancel)
            if running.wait().stats.finish_reason == "cancelled":
                assert found and running.stats.decode_tokens < 440
                break
        else:
            raise AssertionError("no generation was stopped by its cancel message")
        assert not intake.cancel(cancel)  # forgotten at its final event
    finally:
        intake.close()
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
    model = open_text_model(tiny_onnx, max_rows=2)
    pool = model.pool
    obs = Counting()
    sched = Scheduler(with_pool(model, FaultyOnce(pool)), max_queue=2, observer=obs)
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
    model = open_text_model(tiny_onnx, max_rows=2)
    pool = model.pool
    obs = Counting()
    sched = Scheduler(model, max_queue=2, observer=obs)
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
