"""The llama.cpp peer of `make bench`: its timing lines are read right, and a bench without it
says why instead of failing (the build and the GGUFs are the bench's business, not the tests')."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import llamacpp  # noqa: E402

# llama-mtmd-cli --perf -v, in the format its sources print (tools/mtmd, src/llama-context.cpp)
LOG = """\
encoding image slice...
image slice encoded in 1491 ms
decoding image batch 1/1, n_tokens_batch = 144
image decoded (batch 1/1) in 2410 ms
llama_perf_context_print:        load time =    1203.55 ms
llama_perf_context_print: prompt eval time =    2741.30 ms /   167 tokens (   16.41 ms per token,    60.92 tokens per second)
llama_perf_context_print:        eval time =    1950.12 ms /    63 runs   (   30.95 ms per token,    32.31 tokens per second)
llama_perf_context_print:       total time =    6120.02 ms /   230 tokens
"""


def test_the_timing_lines_are_read():
    assert llamacpp.parse(LOG) == {"image_encode_ms": 1491.0, "prompt_tokens": 167, "prefill_tok_s": 60.92,
                                   "decode_tokens": 63, "decode_tok_s": 32.31}


def test_missing_lines_make_the_peer_unavailable_not_a_wrong_figure():
    with pytest.raises(llamacpp.PeerUnavailable, match="no timing lines"):
        llamacpp.parse(LOG.replace("image slice encoded", "image slice done"))
    with pytest.raises(llamacpp.PeerUnavailable):
        llamacpp.parse("\n".join(line for line in LOG.splitlines() if " eval time" not in line
                                 or "prompt" in line))


def test_an_unknown_projector_is_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text('{"mm_projector_type": "qformer"}')
    with pytest.raises(llamacpp.PeerUnavailable, match="no projector for 'qformer'"):
        llamacpp.convert(tmp_path, tmp_path / "gguf", tmp_path, tmp_path, log=lambda m: None)
    assert not (tmp_path / "gguf").exists()
