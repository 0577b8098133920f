"""The decode loop's parts without Triton: detokenization, sampling, parameters, KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.runtime.detokenize import IncrementalDecoder
from edgevlm.runtime.embedding import EmbeddingTable
from edgevlm.runtime.onnxruntime import OrtDecoder
from edgevlm.runtime.scheduler import Scheduler
from edgevlm.runtime.text_model import TextModel
from edgevlm.manifest import OnnxArtifacts
from edgevlm.export.parity import onnx_greedy
from edgevlm.runtime.errors import BadRequest
from edgevlm.runtime.sampling import Sampler, SamplingParams
from edgevlm.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer(tiny_ckpt / "tokenizer.model")


def test_stream_adds_up_to_the_full_decode_even_through_multibyte_characters(tok):
    rng = np.random.default_rng(0)
    for text in ["Grüße aus 東京 🎉 und mehr", "plain words only", "\n\nlines\nand 1234"]:
        ids = tok.encode(text, add_bos=False) + [int(i) for i in rng.integers(3, tok.vocab_size, 20)]
        d = IncrementalDecoder(tok)
        out = "".join(d.push(i) for i in ids) + d.flush()
        assert out == tok.decode(ids)
        d = IncrementalDecoder(tok)
        partial = [d.push(i) for i in tok.encode(text, add_bos=False)]
        assert all("\ufffd" not in p for p in partial)  # never half a character mid-stream


def test_stop_string_is_never_streamed_and_cuts_the_text(tok):
    ids = tok.encode("The answer is yes. STOP here", add_bos=False)
    d = IncrementalDecoder(tok, stop=["STOP"])
    pieces = []
    for i in ids:
        pieces.append(d.push(i))
        if d.stopped:
            break
    pieces.append(d.flush())
    assert "".join(pieces) == "The answer is yes. "
    assert not any("S" in p for p in pieces)


@pytest.mark.parametrize("bad,reason", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=float("nan")), "temperature"),
                                        (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                                        (dict(repetition_penalty=0.0), "repetition_penalty"),
                                        (dict(stop=("x",) * 17), "stop"),
                                        (dict(presence_penalty=2.5), "presence_penalty"),
                                        (dict(frequency_penalty=-2.01), "frequency_penalty"),
                                        (dict(min_tokens=9, max_tokens=8), "min_tokens \\(9\\) is more than")])
def test_parameters_out_of_range_are_refused(bad, reason):
    with pytest.raises(BadRequest, match=reason):
        SamplingParams(**bad).validate()


def test_repetition_penalty_demotes_seen_tokens():
    logits = np.array([0.0, 2.0, 1.9], np.float32)
    assert Sampler(SamplingParams(), [1])(logits) == 1
    assert Sampler(SamplingParams(repetition_penalty=1.5), [1])(logits) == 2


def test_presence_and_frequency_penalties_follow_openais_definition():
    """logit[j] - count[j] * frequency - (count[j] > 0) * presence, counting generated tokens only."""
    logits = np.array([3.0, 2.5, 0.0, 2.9], np.float32)

    def run(**kw):
        s = Sampler(SamplingParams(**kw), [0, 0, 0])  # prompt tokens are not counted
        return [s(logits) for _ in range(4)]
    assert run() == [0, 0, 0, 0]
    assert run(presence_penalty=0.2) == [0, 3, 0, 0]  # 2.8 < 2.9, then 2.8 > 2.7: paid once, whatever the count
    assert run(frequency_penalty=0.3) == [0, 3, 0, 3]  # id 0's second use costs 0.6: 2.4 < 2.6
    assert run(presence_penalty=-1.0) == [0, 0, 0, 0]  # a negative penalty favours repeats


def test_min_tokens_and_ignore_eos_hold_back_the_end_of_answer_tokens():
    logits = np.array([0.0, 5.0, 1.0], np.float32)  # id 1 ends the answer
    s = Sampler(SamplingParams(min_tokens=2), [], stop_ids=[1])
    assert [s(logits) for _ in range(3)] == [2, 2, 1]
    s = Sampler(SamplingParams(ignore_eos=True), [], stop_ids=[1])
    assert [s(logits) for _ in range(5)] == [2] * 5
    assert Sampler(SamplingParams(), [], stop_ids=[1])(logits) == 1


def test_seeded_sampling_repeats_and_top_k_limits():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    p = SamplingParams(temperature=1.0, top_k=2, seed=3)
    a = [Sampler(p, [])(logits) for _ in range(30)]
    assert a == [Sampler(p, [])(logits) for _ in range(30)] and set(a) <= {0, 1}


@pytest.mark.parametrize("kv", ["concat", "static"])
def test_the_scheduler_alone_matches_plain_onnx_greedy_and_counts_stats(tiny_onnx, kv):
    art = OnnxArtifacts.open(tiny_onnx)
    cfg = art.config
    plain, table, tok = OrtDecoder(art.path("decoder"), cfg.text), EmbeddingTable(art.path("embed_tokens")), Tokenizer(art.path("tokenizer"))
    ids = tok.encode("USER: Name three colours. ASSISTANT:")
    want, _ = onnx_greedy(plain, table, ids, None, 16)
    served = OrtDecoder(art.path("decoder_static" if kv == "static" else "decoder"), cfg.text, static=kv == "static")
    sched = Scheduler(TextModel(tok, table, served.open_pool(1), cfg.text.max_position), max_queue=1)
    short = Scheduler(TextModel(tok, table, served.open_pool(1), 20), max_queue=1)
    try:
        events = list(sched.generate(ids, None, SamplingParams(max_tokens=16)))
        stats = events[-1].stats
        want_text = tok.decode(want[:want.index(tok.eos_id)] if tok.eos_id in want else want)
        assert "".join(e.text for e in events) == want_text
        assert stats.prefill_tokens == len(ids) and stats.decode_tokens == min(16, len(want))
        with pytest.raises(BadRequest, match="the context holds"):
            list(short.generate(ids, None, SamplingParams()))
    finally:
        sched.close()
        short.close()


def test_logprobs_are_those_of_the_distribution_sampled_from():
    logits = np.array([1.0, 3.0, 2.0, 0.5], np.float32)
    s = Sampler(SamplingParams(logprobs=2), [])
    assert s(logits) == 1
    lp, top = s.last_logprobs
    want = logits - np.log(np.exp(logits).sum())
    assert np.isclose(lp, want[1]) and [i for i, _ in top] == [1, 2] and np.allclose([v for _, v in top], want[[1, 2]])
    hot = Sampler(SamplingParams(logprobs=4, temperature=2.0, seed=1), [])
    tok = hot(logits)
    z = logits / 2.0
    assert np.isclose(hot.last_logprobs[0], (z - np.log(np.exp(z).sum()))[tok])  # the tempered distribution
    held = Sampler(SamplingParams(logprobs=4, ignore_eos=True), [], stop_ids=[1])
    assert held(logits) == 2 and 1 not in [i for i, _ in held.last_logprobs[1]]  # a token it cannot pick is absent
    assert Sampler(SamplingParams(), []).last_logprobs is None
