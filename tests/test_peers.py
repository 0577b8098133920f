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


def _fake_cli(bins: Path, crashes_on: tuple[str, ...], decode_tok_s: float) -> Path:
    """A stand-in llama-mtmd-cli printing LOG's timing lines (decode at `decode_tok_s`), or,
    for a model whose file name holds one of `crashes_on`, printing its warm-up line and dying
    of SIGSEGV there, as the native build did on an AMX Xeon."""
    bins.mkdir(parents=True)
    script = bins / "llama-mtmd-cli"
    log = LOG.replace("32.31 tokens per second", f"{decode_tok_s} tokens per second")
    crash = " ".join(f'*{q}*) echo "warming up the model with an empty run"; kill -SEGV $$;;' for q in crashes_on)
    script.write_text(f"""#!/bin/sh
model=""
while [ $# -gt 0 ]; do [ "$1" = "-m" ] && model="$2"; shift; done
case "$model" in {crash} esac
cat <<'EOF_LOG'
{log}EOF_LOG
""")
    script.chmod(0o755)
    return bins


def test_a_tier_that_crashes_keeps_the_others_and_is_measured_on_the_fallback_build(tmp_path):
    """The native build crashes on q4_k_s (exit -11 after the warm-up line): that tier is
    recorded failed with its exit status and last lines, f16 and q8_0 keep their figures, and
    every tier runs again on the portable build; each tier's figures are its faster build's."""
    import bench_peers
    fakes = {"native": _fake_cli(tmp_path / "native" / "bin", ("q4_k_s",), 20.0),
             "portable": _fake_cli(tmp_path / "portable" / "bin", (), 10.0)}
    made = []

    def builds(flavour):
        made.append(flavour)
        return fakes[flavour], f"flags of {flavour}"
    files = {q: tmp_path / f"model-{q}.gguf" for q in llamacpp.QUANTS} | {"mmproj": tmp_path / "mmproj.gguf"}
    out = bench_peers.tiers(builds, files, tmp_path / "photo.png", runs=1, tokens=8, threads=2)
    assert made == ["native", "portable"]
    crashed = out["q4_k_s"]["builds"]["native"]["failed"]
    assert crashed["exit"] == -11 and "warming up" in crashed["tail"][-1]
    assert out["q4_k_s"]["build"] == "portable" and out["q4_k_s"]["decode_tok_s"] == 10.0
    for q in ("f16", "q8_0"):  # measured on both; the native build was faster
        assert out[q]["build"] == "native" and out[q]["decode_tok_s"] == 20.0
        assert out[q]["builds"]["portable"]["decode_tok_s"] == 10.0
    # nothing failed natively: no fallback build is made
    made.clear()
    fakes["native"] = _fake_cli(tmp_path / "native2" / "bin", (), 20.0)
    out = bench_peers.tiers(builds, files, tmp_path / "photo.png", runs=1, tokens=8, threads=2)
    assert made == ["native"] and all(out[q]["build"] == "native" for q in llamacpp.QUANTS)


def test_the_portable_build_turns_on_this_cpus_own_options_and_amx_off():
    flags = {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"}
    options = llamacpp.build_options("portable", flags)
    assert options[0] == "GGML_NATIVE=OFF" and "GGML_AVX512_BF16=ON" in options and "GGML_AVX512_VBMI=ON" not in options
    assert {"GGML_AMX_TILE=OFF", "GGML_AMX_INT8=OFF", "GGML_AMX_BF16=OFF"} <= set(options)
    assert llamacpp.build_options("native", flags) == ["GGML_NATIVE=ON"]
