"""The prefix and image caches through the real tritonserver: a repeated frame skips the
vision encoder and the prefill, a chat's follow-up prefills only its new turn, concurrent
questions about one frame share it, and every answer equals the answer of a server with both
caches off (greedy and seeded sampling). The metrics agree with what the requests' stats say."""

from __future__ import annotations

import asyncio

import pytest
from edgevlm_client import AsyncClient, Client

from edgevlm.samples import camera_frame as frame  # a photo no other test sends: its first request misses
from support import settle

CACHE_METRICS = ("edgevlm_prefix_cache_hits_total", "edgevlm_prefix_cache_misses_total",
                 "edgevlm_prefix_cache_reused_tokens_total", "edgevlm_image_cache_hits_total",
                 "edgevlm_image_cache_misses_total")


def cache_metrics(server) -> dict[str, float]:
    m = server.metrics()
    return {name: m.get(f'{name}{{model="mobilevlm"}}', 0.0) for name in CACHE_METRICS}


@pytest.fixture(scope="module")
def uncached(start_server, tiny_onnx):
    """The same model with both caches off: what every cached answer must equal."""
    with start_server(tiny_onnx, prefix_cache_mib=0, image_cache_mib=0) as srv:
        yield Client(srv.grpc_url, timeout_s=120)


def test_a_repeated_frame_skips_the_encoder_and_the_prefill(server, client, uncached):
    image = frame(1)
    settle(server, 0)  # what earlier tests sent has finished: the deltas below are these requests'
    before = cache_metrics(server)
    first = client.generate("What is in the image?", image=image, max_tokens=16)
    again = client.generate("What is in the image?", image=image, max_tokens=16)
    other = client.generate("Is there a cat?", image=image, max_tokens=16, temperature=0.9, seed=3)
    assert [first.text, again.text, other.text] == [
        uncached.generate("What is in the image?", image=image, max_tokens=16).text] * 2 + [
        uncached.generate("Is there a cat?", image=image, max_tokens=16, temperature=0.9, seed=3).text]
    assert not first.stats["image_cached"] and first.stats["image_encode_ms"] > 0
    # a new frame: at most the system line before it is reused (earlier requests left it cached)
    assert first.stats["cached_tokens"] < other.stats["cached_tokens"]
    for r in (again, other):
        assert r.stats["image_cached"] and r.stats["image_encode_ms"] == 0
    # the whole prompt but its last position, whose logits start the answer
    assert again.stats["cached_tokens"] == again.stats["prefill_tokens"] - 1
    # the other question shares the system line and the image
    assert 144 > other.stats["cached_tokens"] > 16
    settle(server, 0)
    delta = {k: v - before[k] for k, v in cache_metrics(server).items()}
    first_hit = int(first.stats["cached_tokens"] > 0)
    assert delta == {"edgevlm_prefix_cache_hits_total": 2 + first_hit,
                     "edgevlm_prefix_cache_misses_total": 1 - first_hit,
                     "edgevlm_prefix_cache_reused_tokens_total": sum(
                         r.stats["cached_tokens"] for r in (first, again, other)),
                     "edgevlm_image_cache_hits_total": 2, "edgevlm_image_cache_misses_total": 1}


def test_a_chats_follow_up_prefills_only_its_new_turn(client, uncached):
    image = frame(2)
    cached, plain = client.chat(image=image, max_tokens=20), uncached.chat(image=image, max_tokens=20)
    questions = ["Describe the image.", "What colour is it?", "And what is behind it?"]
    prompt_before = 0
    for i, q in enumerate(questions):
        r, expected = cached.ask(q), plain.ask(q)
        assert r.text == expected.text
        assert expected.stats["cached_tokens"] == 0
        if i:
            # at least the earlier prompt (system, image, questions): the answer re-tokenized
            # may match further
            assert r.stats["cached_tokens"] >= prompt_before
            assert r.stats["prefill_tokens"] - r.stats["cached_tokens"] < r.stats["prefill_tokens"] // 2
        prompt_before = r.stats["prefill_tokens"]


def test_concurrent_questions_about_one_frame_each_get_their_own_answer(server, uncached):
    image = frame(3)
    jobs = [dict(prompt=q, image=image, max_tokens=12 + 3 * i, **({"temperature": 0.8, "seed": i} if i % 2 else {}))
            for i, q in enumerate(["Is the door open?", "How many people?", "Is it dark?", "Any vehicles?"])]
    expected = [uncached.generate(**job).text for job in jobs]

    async def together():
        async with AsyncClient(server.grpc_url, timeout_s=120) as ac:
            return await asyncio.gather(*[ac.generate(**job) for job in jobs])
    results = asyncio.run(together())
    assert [r.text for r in results] == expected
    # the image was encoded at most once per burst and reused after; prompts share the frame
    assert sum(r.stats["cached_tokens"] > 0 for r in results) >= 1


def test_one_at_a_time_says_when_the_image_came_from_the_cache(start_server, tiny_onnx):
    """BATCHING=off (one sequence at a time) shares the image cache and reports it too."""
    with start_server(tiny_onnx, batching="off") as srv:
        client = Client(srv.grpc_url, timeout_s=120)
        first, again = (client.generate("What is in the image?", image=frame(4), max_tokens=4) for _ in range(2))
    assert not first.stats["image_cached"] and first.stats["image_encode_ms"] > 0
    assert again.stats["image_cached"] and again.stats["image_encode_ms"] == 0
