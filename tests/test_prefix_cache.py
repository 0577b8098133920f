"""The prefix KV cache, in process: a request that reuses an earlier sequence's KV gives exactly
the tokens it gives from scratch (greedy and seeded sampling, both KV layouts), eviction keeps
the cache within its budget, requests sharing a prefix at the same time stay correct, and
what the scheduler reports adds up."""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.runtime.observer import Observer
from edgevlm.runtime.prefix_cache import PrefixCache, common_prefix, position_keys
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.scheduler import Scheduler
from edgevlm.runtime.text_model import open_text_model
from tests.test_scheduler import Stream, alone

IMG = -200


class Recording(Observer):
    def __init__(self):
        self.lookups, self.stores, self.evicted, self.bytes = [], 0, 0, 0

    def prefix(self, reused, cache_bytes, evicted):
        if reused >= 0:
            self.lookups.append(reused)
        else:
            self.stores += 1
        self.evicted += evicted
        self.bytes = cache_bytes


@pytest.fixture(scope="module", params=["static", "concat"])
def kv(request):
    return request.param


@pytest.fixture(scope="module")
def model(kv, tiny_onnx):
    """A one-row pool (what a request alone runs on)."""
    return open_text_model(tiny_onnx, kv_cache=kv, max_rows=1)


@pytest.fixture(scope="module")
def batched(kv, tiny_onnx):
    """The same layout with room for four rows at once."""
    return open_text_model(tiny_onnx, kv_cache=kv, max_rows=4)


def _ids(rng, n):
    return list(map(int, rng.integers(3, 1000, size=n)))


def _image(model, seed):
    return np.random.default_rng(seed).standard_normal((1, 16, model.table.table.shape[1])).astype(np.float32)


def _run(model, work, cache, *, together=False, obs=None):
    """work: [(ids, params, embeds)]; one after another, or all submitted at once."""
    pool = model.pool
    sched = Scheduler(model, max_queue=len(work), prefill_chunk=16, prefix_cache=cache, observer=obs)
    try:
        streams = [Stream() for _ in work]
        for s, w in zip(streams, work):
            sched.submit(s.request(*w))
            if not together:
                s.wait()
        for s in streams:
            assert s.wait().error is None
        assert sched.counts() == (0, 0) and pool.rows == []
        return ["".join(s.text) for s in streams], [s.stats for s in streams]
    finally:
        sched.close()


def _conversation(model):
    """A frame asked about, asked again, followed up (earlier answer in the prompt), sampled."""
    rng = np.random.default_rng(7)
    system, q1, q2 = _ids(rng, 30), _ids(rng, 12), _ids(rng, 9)
    first = system + [IMG] + q1
    answer = model.tok.encode(alone(model, first, SamplingParams(max_tokens=20), _image(model, 1))[0])
    image = _image(model, 1)
    greedy, seeded = SamplingParams(max_tokens=24), SamplingParams(max_tokens=24, temperature=0.9, seed=11)
    return [(first, greedy, image),
            (first, greedy, image),                            # the same question again
            (first + answer + q2, greedy, image),              # a follow-up with the answer as history
            (first + q2, seeded, image),                       # another question, sampled
            (system + [IMG] + q2, seeded, _image(model, 2)),     # another frame: only the system line
            (_ids(rng, 40), greedy, None)]                     # unrelated text


def test_a_cache_hit_gives_exactly_the_tokens_of_a_miss(model, batched):
    work = _conversation(model)
    expected = [alone(model, *w)[0] for w in work]
    obs = Recording()
    cache = PrefixCache(64 << 20)
    texts, stats = _run(batched, work, cache, obs=obs)
    assert texts == expected
    reused = [s.cached_tokens for s in stats]
    n_first = 30 + 16 + 12
    assert reused[0] == 0 and reused[5] == 0
    assert reused[1] == n_first - 1  # all but the last position, whose logits start the answer
    assert reused[2] >= n_first and reused[3] == n_first
    assert reused[4] == 30  # a different image: the system line only
    assert all(s.prefill_tokens > r for s, r in zip(stats, reused))
    # what the scheduler reported adds up
    assert obs.lookups == reused
    assert (cache.hits, cache.misses, cache.reused) == (4, 2, sum(reused))
    assert obs.bytes == cache.bytes > 0


def test_the_cache_stays_within_its_budget_and_evicts_the_oldest(model, batched):
    rng = np.random.default_rng(3)
    prompts = [_ids(rng, 100) for _ in range(3)]
    params = SamplingParams(max_tokens=12)
    # room for one 112-position sequence, not two
    budget = 150 * model.pool.bytes_per_position
    cache = PrefixCache(budget)
    work = [(p, params, None) for p in (prompts[0], prompts[1], prompts[0], prompts[2], prompts[2])]
    expected = [alone(model, *w)[0] for w in work]
    obs = Recording()
    texts, stats = _run(batched, work, cache, obs=obs)
    assert texts == expected
    assert [s.cached_tokens for s in stats] == [0, 0, 0, 0, 99]  # prompts[0] was evicted by prompts[1]
    assert cache.evictions == obs.evicted >= 3
    assert len(cache.entries) == 1 and cache.bytes <= budget


def test_requests_sharing_a_prefix_at_once_each_get_their_own_text(model, batched):
    rng = np.random.default_rng(5)
    shared, image = _ids(rng, 50) + [IMG], _image(model, 4)
    work = [(shared + _ids(rng, 5 + i), SamplingParams(max_tokens=16 + 4 * i, temperature=0.8 * (i % 2), seed=i),
             image) for i in range(6)]
    expected = [alone(model, *w)[0] for w in work]
    cache = PrefixCache(64 << 20)
    texts, stats = _run(batched, work, cache, together=True)
    assert texts == expected
    # one prompt is prefilled at a time, and each is stored once prefilled: all but the
    # first find the shared part
    assert [s.cached_tokens for s in stats][1:] == [50 + 16] * 5


def test_a_lookup_takes_the_longest_prefix_and_a_covered_entry_is_not_kept_twice():
    cache = PrefixCache(1 << 20, min_reuse=2)
    kv = lambda n: [np.full((1, n, 2), n, np.float32)]  # noqa: E731
    a, b = np.arange(10), np.r_[np.arange(6), 50, 51, 52]
    cache.store(a[:4], kv)
    cache.store(a, kv)  # covers a[:4]
    cache.store(b, kv)
    assert len(cache.entries) == 2
    cache.store(a[:7], kv)  # held by a's entry already
    assert len(cache.entries) == 2
    hit = cache.lookup(np.r_[np.arange(8), 99], limit=100)
    assert hit.positions == 8 and hit.kv()[0].shape == (1, 8, 2)
    assert cache.lookup(np.r_[np.arange(6), 50, 51, 7], limit=4).positions == 4
    assert cache.lookup(np.array([5, 6, 7]), limit=10).positions == 0
    assert common_prefix(np.arange(3), np.arange(5)) == 3


def test_an_image_position_is_keyed_by_the_images_content():
    rng = np.random.default_rng(0)
    one, two = rng.standard_normal((2, 1, 4, 8)).astype(np.float32)
    ids = [1, 2, IMG, 3]
    k1, k2 = position_keys(ids, one), position_keys(ids, two)
    assert len(k1) == 3 + 4 and (k1 == position_keys(ids, one.copy())).all()
    assert common_prefix(k1, k2) == 2  # the text before the image, then the images differ
    assert (k1[2:6] < 0).all() and len(set(k1[2:6])) == 4
