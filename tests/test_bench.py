"""`make bench QUICK=1` as a smoke test: every section runs and lands in JSON and markdown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration  # tools/bench.py starts tritonserver
def test_quick_bench_writes_every_section(tiny_onnx, tiny_ckpt, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--onnx", f"tiny={tiny_onnx}",
                        "--checkpoint", f"tiny={tiny_ckpt}", "--out", str(tmp_path / "bench"),
                        "--doc", str(tmp_path / "docs" / "BENCHMARKS.md")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "bench" / "tiny.json").read_text())
    assert report["triton_overhead"]["ratio"] > 0 and report["decode_growth"]["ratio"] > 0
    assert report["ttft_with_image"]["client_ttft_ms"] >= report["ttft_with_image"]["prefill_ms"] > 0
    assert report["server_rss_mb"]["peak"] >= report["server_rss_mb"]["idle"] > 0
    assert report["vs_transformers"]["greedy_tokens_identical"] == "8/8"  # same weights, same greedy tokens
    assert "fp32" in report["quantized"]
    assert set(report["decode_static_ms_per_token"]) == set(report["decode_ms_per_token"])
    for mode in ("off", "continuous"):  # both served, every request answered, the newcomer measured
        b = report["batching"]["precisions"]["fp32"][mode]
        assert [v["ok"] for v in b["levels"].values()] == [v["requests"] for v in b["levels"].values()]
        assert b["newcomer"]["ttft_with_running_ms"] > 0
    c = report["caches"]  # a follow-up and a repeat found the frame cached; without caches they did not
    assert c["on"]["follow_up"]["cached_tokens"] > 0 and c["on"]["repeated"]["image_cached"]
    assert c["off"]["follow_up"]["cached_tokens"] == 0 and not c["off"]["repeated"]["image_cached"]
    assert c["ratios"]["follow_up_vs_cold"] > 0
    g = report["constrained"]
    assert set(g["served"]) == {"1", "4"} and all(v[f"{k}_stream_decode_tok_s"] > 0 for v in g["served"].values()
                                                  for k in ("constrained", "logprobs", "tools"))
    assert set(g["compile_ms"]) == {"detection", "boxes", "caption"} and g["mask_us_per_token"] > 0
    p = report["peers"]  # ours served beside llama.cpp; the quick run skips the peer and says so
    assert p["ours"]["fp32"]["decode_tok_s"] > 0 and p["ours"]["fp32"]["peak_rss_mb"] > 0
    assert p["llamacpp"] == {"skipped": "quick run"} and p["copy_bandwidth_gb_s"] > 0
    assert p["gemm_gflops"] > 0 and p["tower_gflop"] > 0  # the machine's ceilings beside the rows
    assert all(v > 0 for v in p["read_bandwidth_gb_s"].values())
    v = report["video"]["fp32"]  # a 2-frame clip of new frames against one picture, MobileVLM reading frames as pictures
    assert (v["clip"]["frames"], v["image"]["frames"]) == (2, 0) and v["frames_per_s"] > 0
    assert v["clip"]["prompt_tokens"] > v["image"]["prompt_tokens"] and v["clip"]["video_decode_ms"] > 0
    kv = report["kv_mb_per_sequence"]
    assert kv["static"] * 2 == kv["concat"] > 0  # one in-place buffer per tensor instead of two
    doc = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    for heading in ("Decode ms/token vs context", "concat vs in place", "Triton + gRPC", "Time to first token",
                    "transformers", "continuous batching", "prefix and image caches", "Constrained decoding",
                    "llama.cpp", "A clip against one picture"):
        assert heading in doc
    assert (tmp_path / "docs" / "bench_decode_vs_context.png").stat().st_size > 1000
    # ONLY=section re-measures that section alone and keeps every other figure from the JSON
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--onnx", f"tiny={tiny_onnx}",
                        "--only", "quantized", "--out", str(tmp_path / "bench"),
                        "--doc", str(tmp_path / "docs" / "BENCHMARKS.md")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "bench" / "tiny.json").read_text())
    assert {k: again[k] for k in ("caches", "batching", "triton_overhead", "vs_transformers")} == {
        k: report[k] for k in ("caches", "batching", "triton_overhead", "vs_transformers")}
    assert set(again["measured"]) == set(report["measured"]) >= {"decode", "caches", "quantized", "hf"}


def test_only_on_a_model_never_benched_writes_those_sections(tiny_onnx, tmp_path):
    """A model measured for some sections alone (the 7B video row) appears in their tables only."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--onnx", f"tiny={tiny_onnx}",
                        "--only", "decode", "--out", str(tmp_path / "bench"), "--doc", str(tmp_path / "B.md")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "bench" / "tiny.json").read_text())
    assert set(report["measured"]) == {"decode"} and "triton_overhead" not in report
    assert "| tiny | 200: " in (tmp_path / "B.md").read_text()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--onnx", f"tiny={tiny_onnx}",
                        "--only", "cache"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "unknown section(s) cache" in r.stderr
