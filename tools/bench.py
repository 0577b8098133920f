"""`make bench`: the tracked figures of the cpu target, same machine, same thread count.

    python tools/bench.py --onnx tiny=artifacts/tiny/onnx --onnx mobilevlm-v2-1.7b=artifacts/mobilevlm-v2-1.7b/onnx \
        [--checkpoint mobilevlm-v2-1.7b=artifacts/mobilevlm-v2-1.7b/checkpoint] [--quick] [--only caches,...]

Per model, medians of repeated runs:
  decode      ms/token of the decoder at context 200, 500, 1000 (KV-cache scaling), for the
              concat KV cache (decoder.onnx) and the in-place one (decoder.static.onnx), and
              the KV bytes each allocates for a sequence
  triton      per-token cost over Triton + gRPC streaming vs the in-process loop (ratio)
  ttft        time to first token with an image: image encode, prefill, first decode, and
              the client-seen TTFT; peak resident memory of the server (stubs included)
  hf          our ONNX Runtime path vs transformers' generate on the same checkpoint weights
  batching    one sequence at a time vs continuous batching at concurrency 1, 2, 4, 8,
              FP32 and INT4, served (tools/bench_batching.py)
  caches      time to first text of a cold turn, a chat follow-up and a repeated question
              about one camera frame, prefix and image caches on vs off (tools/bench_caches.py)
  constrained the grammar mask's cost per token, alone and 4 streams, and schema compile
              times; logprobs and tool calls against free text (tools/bench_constrained.py)
  aiperf      NVIDIA aiperf through the OpenAI gateway at concurrency 1, 4, 8 beside our own
              client's figures for the same load (tools/bench_aiperf.py)
  peers       FP32 / INT8 / INT4 served beside llama.cpp's MobileVLM port (f16 / q8_0 /
              q4_k_s): image encode, prefill, decode, memory, GB/s (tools/bench_peers.py)
  video       time to first text for an 8-frame clip against one picture, frames encoded
              per second, FP32 and INT4 served (tools/bench_video.py)
Writes docs/bench/<model>.json, docs/BENCHMARKS.md and docs/bench_decode_vs_context.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgevlm.export.isolated import run_isolated
from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.prompt import build_prompt, tokenize_prompt
from edgevlm.serve.repository import render_repository
from edgevlm.samples import sample_image
from edgevlm.runtime.embedding import EmbeddingTable
from edgevlm.runtime.runners import open_decoder
from edgevlm.runtime.scheduler import Scheduler
from edgevlm.runtime.text_model import open_text_model
from edgevlm.serve.tritonserver import TritonServer
from edgevlm_client import Client

from bench_aiperf import aiperf  # beside this script (python tools/bench.py)
from bench_aiperf import markdown as aiperf_markdown
from bench_batching import batching
from bench_batching import markdown as batching_markdown
from bench_caches import caches
from bench_caches import markdown as caches_markdown
from bench_constrained import constrained
from bench_constrained import markdown as constrained_markdown
from bench_peers import markdown as peers_markdown
from bench_peers import decoder_weight_bytes, peers
from bench_video import markdown as video_markdown
from bench_video import video

ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = (200, 500, 1000)
QUESTION = "Tell me a long story about a robot."


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import onnxruntime
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gb, 1), "gpu": "none",
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def med(values) -> float:
    return round(statistics.median(values), 3)


def random_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, vocab, n - 1).tolist()


def one_row(decoder, capacity: int):
    """(a one-row KV pool of the decoder, its row of `capacity` positions)."""
    pool = decoder.open_pool(1, max_context=capacity)
    return pool, pool.acquire(capacity)


def decode_scaling(onnx_dir: Path, contexts, steps: int, runs: int, kv_cache: str = "concat") -> dict:
    """ms per decode step (the pool's, as the scheduler calls it) with `ctx` positions already in the KV cache."""
    art = OnnxArtifacts.open(onnx_dir)
    decoder = open_decoder(onnx_dir, kv_cache=kv_cache)
    table = EmbeddingTable(art.path("embed_tokens"))
    max_context = decoder.max_context
    out = {}
    fits = [c for c in contexts if c + steps + 1 < max_context]
    if len(fits) < len(contexts):  # a short-context model: its longest context stands in
        log(f"  contexts over this model's {max_context} skipped; measuring {max_context - steps - 2}")
        fits.append(max_context - steps - 2)
    for ctx in fits:
        per_run = []
        for r in range(runs):
            pool, row = one_row(decoder, ctx + steps + 1)
            logits = pool.prefill(row, table.embed(random_ids(art.config.text.vocab_size, ctx, r)))
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                logits = pool.decode([row], table.embed([int(np.argmax(logits))]))[0]
                times.append((time.perf_counter() - t0) * 1e3)
            per_run.append(statistics.median(times))
            pool.close()
        out[str(ctx)] = med(per_run)
        log(f"  decode at context {ctx}: {out[str(ctx)]} ms/token")
    return out


def in_process_gaps(onnx_dir: Path, tokens: int, runs: int, kv_budget_mib: int = 0) -> list[float]:
    """Gaps between streamed texts of one request on the scheduler, in process (no Triton),
    with the served one's KV pool (one row; kv_budget_mib 0: the default budget)."""
    from edgevlm.runtime.sampling import SamplingParams
    model = open_text_model(onnx_dir, kv_budget_mib=kv_budget_mib)
    sched = Scheduler(model, max_queue=1)
    try:
        ids = tokenize_prompt(model.tok, build_prompt(QUESTION, image=False))
        list(sched.generate(ids, None, SamplingParams(max_tokens=4)))
        gaps = []
        for _ in range(runs):
            times = [time.perf_counter() for e in sched.generate(ids, None, SamplingParams(max_tokens=tokens))
                     if e.text]
            gaps += [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    finally:
        sched.close()
    return gaps


class PeakRSS:
    """Samples the server's resident memory (stubs included) in the background."""

    def __init__(self, server: TritonServer, interval_s: float = 0.2):
        self.server, self.interval_s, self.peak = server, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.server.rss_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def served(onnx_dir: Path, tokens: int, runs: int, ttft_tokens: int, kv_budget_mib: int = 0) -> dict:
    """Triton + gRPC: per-token gaps, TTFT split with an image, server memory (kv_budget_mib:
    the server's KV pool, 0 its default)."""
    image = sample_image("chelsea")
    with tempfile.TemporaryDirectory() as tmp:
        # caches off: the same photo and question are sent repeatedly, and these are the cold figures
        repo = render_repository(onnx_dir, Path(tmp) / "repository", max_sequences=1,
                                 prefix_cache_mib=0, image_cache_mib=0, kv_budget_mib=kv_budget_mib)
        with TritonServer(repo) as server, PeakRSS(server) as rss:
            client = Client(server.grpc_url, timeout_s=1800)
            client.generate(QUESTION, max_tokens=4)
            client.generate("What is in the image?", image=image, max_tokens=2)
            idle_mb = server.rss_mb()
            gaps = []
            for _ in range(runs):
                times = [time.perf_counter() for _ in client.stream(QUESTION, max_tokens=tokens)]
                gaps += [(b - a) * 1e3 for a, b in zip(times, times[1:])]
            split = {"image_encode_ms": [], "prefill_ms": [], "first_decode_ms": [], "client_ttft_ms": []}
            for _ in range(runs):
                t0 = time.perf_counter()
                stream = client.stream("What is in the image?", image=image, max_tokens=ttft_tokens)
                first = None
                for _delta in stream:
                    first = first or time.perf_counter()
                s = stream.stats
                split["image_encode_ms"].append(s["image_encode_ms"])
                split["prefill_ms"].append(s["prefill_ms"])
                split["first_decode_ms"].append(s["decode_ms"] / max(s["decode_tokens"], 1))
                split["client_ttft_ms"].append(((first or time.perf_counter()) - t0) * 1e3)
    ttft = {k: med(v) for k, v in split.items()}
    # the rest of the client's wait: image decode and resize, the BLS call, gRPC
    ttft["preprocess_and_transport_ms"] = round(ttft["client_ttft_ms"] - ttft["image_encode_ms"] - ttft["prefill_ms"], 3)
    return {"gaps": gaps, "ttft": ttft, "prompt_tokens": s["prefill_tokens"],
            "server_rss_idle_mb": round(idle_mb), "server_rss_peak_mb": round(rss.peak)}


def transformers_vs_ours(checkpoint: Path, onnx_dir: Path, prompt_len: int, tokens: int, runs: int) -> dict:
    """Greedy text-only generation, same weights, FP32 both: TTFT and decode tok/s."""
    import torch
    import transformers

    from edgevlm.model.checkpoint import read_checkpoint
    ck = read_checkpoint(checkpoint)
    t = ck.config.text
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=t.max_position, rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=False))
    hf.load_state_dict({k: v.float() for k, v in ck.weights().llm.items()}, strict=True)
    hf.eval()
    ids = random_ids(t.vocab_size, prompt_len, 7)
    x = torch.tensor([ids])

    def hf_run(n):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            return (time.perf_counter() - t0) * 1e3, out[0, prompt_len:].tolist()

    hf_run(2)
    hf_ttft = med([hf_run(1)[0] for _ in range(runs)])
    hf_total = [hf_run(tokens) for _ in range(runs)]
    hf_tok_s = (tokens - 1) / ((med([ms for ms, _ in hf_total]) - hf_ttft) / 1e3)
    del hf

    decoder, table = open_decoder(onnx_dir), EmbeddingTable(OnnxArtifacts.open(onnx_dir).path("embed_tokens"))

    def ours_run(n):  # greedy through the pool, never stopping at EOS (as min_new_tokens does there)
        t0 = time.perf_counter()
        pool, row = one_row(decoder, prompt_len + n + 1)
        logits = pool.prefill(row, table.embed(ids))
        got = [int(np.argmax(logits))]
        ttft = (time.perf_counter() - t0) * 1e3
        for _ in range(n - 1):
            logits = pool.decode([row], table.embed([got[-1]]))[0]
            got.append(int(np.argmax(logits)))
        pool.close()
        return ttft, (time.perf_counter() - t0) * 1e3, got

    ours_run(2)
    runs_ours = [ours_run(tokens) for _ in range(runs)]
    ttft = med([r[0] for r in runs_ours])
    tok_s = (tokens - 1) / ((med([r[1] for r in runs_ours]) - ttft) / 1e3)
    same = sum(a == b for a, b in zip(runs_ours[0][2], hf_total[0][1]))
    return {"prompt_tokens": prompt_len, "tokens": tokens,
            "transformers": {"ttft_ms": hf_ttft, "decode_tok_s": round(hf_tok_s, 2)},
            "ours": {"ttft_ms": ttft, "decode_tok_s": round(tok_s, 2)},
            "ttft_speedup": round(hf_ttft / ttft, 2), "decode_speedup": round(tok_s / hf_tok_s, 2),
            "greedy_tokens_identical": f"{same}/{tokens}"}


def quantized_decoders(onnx_dir: Path, steps: int, runs: int) -> dict:
    """FP32 vs the INT8 / INT4 weight-only exports beside it (make quantize), ONNX Runtime CPU."""
    out = {}
    for precision, root in (("fp32", onnx_dir), ("int8", onnx_dir.parent / "onnx-int8"),
                            ("int4", onnx_dir.parent / "onnx-int4")):
        if not (root / "manifest.json").is_file():
            log(f"  {precision}: no export at {root} (make quantize PRECISION={precision}), skipped")
            continue
        ms = decode_scaling(root, (200,), steps, runs, "concat").get("200")
        mb = decoder_weight_bytes(root) / 2**20  # the graph the cpu target serves (MatMulNBits)
        out[precision] = {"decode_ms_per_token_ctx200": ms, "decode_tok_s": round(1e3 / ms, 2) if ms else None,
                          "decoder_mb": round(mb, 1)}
        log(f"  {precision}: {ms} ms/token, decoder {mb:.0f} MB")
    return out


# Each section writes these keys of a model's report; `--only` re-measures some sections and
# keeps the others from the report on disk, so a change to one path is re-measured alone.
SECTIONS = {
    "decode": ("decode_ms_per_token", "decode_growth", "decode_static_ms_per_token", "kv_mb_per_sequence"),
    "triton": ("triton_overhead", "ttft_with_image", "server_rss_mb"),
    "batching": ("batching",),
    "caches": ("caches",),
    "constrained": ("constrained",),
    "quantized": ("quantized",),
    "hf": ("vs_transformers",),
    "peers": ("peers",),
    "aiperf": ("aiperf",),
    "video": ("video",),
}


def _decode(report, name, onnx_dir, art, steps, runs):
    log(f"{name}: decode ms/token vs context")
    report["decode_ms_per_token"] = decode_scaling(onnx_dir, CONTEXTS, steps, runs, "concat")
    d = report["decode_ms_per_token"]
    longest = max(d, key=int)
    report["decode_growth"] = {"from": 200, "to": int(longest), "ratio": round(d[longest] / d["200"], 3)}
    if "decoder_static" in art.manifest["files"]:
        log(f"{name}: decode ms/token vs context, static (in-place) KV cache")
        report["decode_static_ms_per_token"] = decode_scaling(onnx_dir, CONTEXTS, steps, runs, "static")
        capacity = int(longest) + steps + 1
        report["kv_mb_per_sequence"] = {"capacity": capacity, **{
            kv: round(one_row(open_decoder(onnx_dir, kv_cache=kv), capacity)[0].budget_bytes / 2**20, 1)
            for kv in ("concat", "static")}}
    else:
        log(f"{name}: no decoder.static.onnx in this export (older `make onnx`); static KV skipped")


def _triton(report, name, onnx_dir, art, runs, quick, kv_budget_mib=0):
    log(f"{name}: Triton + gRPC vs in process")
    tokens = 24 if quick else (64 if _big(art) else 200)
    # in a process of its own: a released decoder's arenas stay in this one (at 11B, 7 GB that
    # the server measured next would not have)
    local = run_isolated(in_process_gaps, onnx_dir, tokens, runs, kv_budget_mib)
    s = served(onnx_dir, tokens, runs, ttft_tokens=4, kv_budget_mib=kv_budget_mib)
    a, b = statistics.median(local), statistics.median(s["gaps"])
    report["triton_overhead"] = {"in_process_ms_per_token": round(a, 3), "triton_grpc_ms_per_token": round(b, 3),
                                 "ratio": round(b / a, 3), "samples": [len(local), len(s["gaps"])]}
    report["ttft_with_image"] = {**s["ttft"], "prompt_tokens": s["prompt_tokens"]}
    report["server_rss_mb"] = {"idle": s["server_rss_idle_mb"], "peak": s["server_rss_peak_mb"],
                               **({"kv_budget_mib": kv_budget_mib} if kv_budget_mib else {})}


def _big(art) -> bool:
    return art.config.text.hidden_size >= 1024


def bench_model(name: str, onnx_dir: Path, checkpoint: Path | None, quick: bool,
                only: set[str] | None = None, previous: dict | None = None, kv_budget_mib: int = 0) -> dict:
    art = OnnxArtifacts.open(onnx_dir)
    runs = 2 if quick else (3 if _big(art) else 5)
    steps = 8 if quick else 32
    report = dict(previous or {})
    report.update({"model": name, "quick": quick, "machine": machine(), "runs": runs,
                   "decoder_onnx_mb": round(sum(f.stat().st_size for f in onnx_dir.glob("decoder.onnx*")) / 2**20)})
    measured = dict(report.get("measured", {}))

    def wanted(section: str) -> bool:
        return only is None or section in only

    def run(section: str, fn) -> None:
        for key in SECTIONS[section]:
            report.pop(key, None)
        fn()
        measured[section] = time.strftime("%Y-%m-%d")

    if wanted("decode"):
        run("decode", lambda: _decode(report, name, onnx_dir, art, steps, runs))
    if wanted("triton"):
        run("triton", lambda: _triton(report, name, onnx_dir, art, runs, quick, kv_budget_mib))
    if wanted("batching") and (_big(art) or quick):  # the tiny model is all per-call overhead
        log(f"{name}: one at a time vs continuous batching, served")
        run("batching", lambda: report.update(batching=batching(onnx_dir, quick)))
    if wanted("caches"):
        log(f"{name}: prefix and image caches, served")
        run("caches", lambda: report.update(caches=caches(onnx_dir, quick)))
    if wanted("constrained"):
        log(f"{name}: constrained decoding, served")
        run("constrained", lambda: report.update(constrained=constrained(onnx_dir, quick)))
    if wanted("quantized"):
        log(f"{name}: quantized decoders vs FP32")
        run("quantized", lambda: report.update(quantized=quantized_decoders(onnx_dir, steps, runs)))
    if wanted("hf") and checkpoint is not None:
        log(f"{name}: ONNX Runtime vs transformers generate")
        run("hf", lambda: report.update(vs_transformers=transformers_vs_ours(
            checkpoint, onnx_dir, 64 if quick else 128, 8 if quick else 32, runs)))
    if wanted("peers") and (_big(art) or quick):  # llama.cpp's recipe is for the real shapes
        log(f"{name}: served FP32 / INT8 / INT4 beside llama.cpp's MobileVLM port")
        run("peers", lambda: report.update(peers=peers(onnx_dir, checkpoint, quick, report["machine"]["threads"])))
    # its tokenizer is the checkpoint's; a quick run measures it only when asked (it installs aiperf)
    if wanted("aiperf") and checkpoint is not None and (_big(art) or (only and "aiperf" in only)):
        log(f"{name}: NVIDIA aiperf through the gateway beside our client")
        run("aiperf", lambda: report.update(aiperf=aiperf(onnx_dir, checkpoint, quick)))
    if wanted("video") and (_big(art) or quick or (only and "video" in only)):
        log(f"{name}: a clip against one picture, served")
        run("video", lambda: report.update(video=videos(onnx_dir, quick)))
    report["measured"] = measured
    return report


def videos(onnx_dir: Path, quick: bool) -> dict:
    """The video section for each export served: FP32 (unless its weights are kept 16-bit,
    which is for building, not serving) and INT4 when `make quantize` made one beside it."""
    out = {}
    if OnnxArtifacts.open(onnx_dir).manifest.get("weights", {}).get("storage") != "half":
        out["fp32"] = video(onnx_dir, quick, "fp32")
    if (onnx_dir.parent / "onnx-int4" / "manifest.json").is_file():
        out["int4"] = video(onnx_dir.parent / "onnx-int4", quick, "int4")
    return out


def soak_markdown(soak: dict) -> list[str]:
    """`make soak` (tools/soak.py --report): tritonserver 2.51's crashes by how clients cancel."""
    out = ["", "## Cancellation and tritonserver 2.51's crash (`make soak`)", "",
           "The tiny model under `make soak`: requests at concurrency 8 with random prompts, images and "
           "sampling, about 10 % of them cancelled after two responses, with dropped connections and killed "
           "client processes throughout; tritonserver 2.51 (the nvidia-pytriton wheel) under the supervisor. "
           "`inband`: our clients' cancel message on the stream (`make soak`); `grpc`: a gRPC-level cancel as "
           "raw tritonclient sends it (`make soak CANCELS=grpc`). A crash is the server dying (SIGSEGV in its "
           "gRPC frontend) and being restarted.", "",
           "| cancels | runs x requests | streams cancelled | crashes | crashes per 10k cancels | measured |",
           "|---|---|---|---|---|---|"]
    for mode in ("inband", "grpc"):
        if mode in soak:
            s = soak[mode]
            out.append(f"| {mode} | {s['runs']} x {s['requests_per_run']} | {s['cancels']} | {s['crashes']} | "
                       f"{s['crashes_per_10k_cancels']:.1f} | {s['date']} |")
    return out


def markdown(reports: list[dict], soak: dict | None = None) -> str:
    m = reports[0]["machine"]
    out = ["# Benchmarks", "",
           f"Measured by `make bench` on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; "
           f"ONNX Runtime {m['onnxruntime']}, torch {m['torch']} ({m['threads']} threads), Python {m['python']}. "
           "FP32, cpu target, random weights in the exact upstream layout (speed does not depend on the "
           "values). Medians of repeated runs; the machine is shared, and repeated `make bench` runs have differed "
           "by up to ~15 % at the 1.7B shape. TensorRT figures on an Orin come from `make jetson-bench`.", ""]
    dates = {d for r in reports for d in r.get("measured", {}).values()}
    if len(dates) > 1:
        out += ["Sections were measured on different days (`make bench ONLY=section,...` re-measures some and keeps "
                "the rest): " + "; ".join(f"{r['model']}: " + ", ".join(f"{k} {v}" for k, v in r["measured"].items())
                                            for r in reports) + ".", ""]
    out += ["## Decode ms/token vs context (KV cache)", "",
            "One decode step with the context already in the KV cache. A model whose context is shorter than "
            "1000 shows its longest instead.", "",
            "| model | contexts: ms/token | growth from 200 |", "|---|---|---|"]
    for r in _with(reports, "decode_ms_per_token"):
        d, g = r["decode_ms_per_token"], r["decode_growth"]
        out.append(f"| {r['model']} | " + ", ".join(f"{c}: {v:.2f}" for c, v in d.items())
                   + f" | {g['ratio']:.2f}× at {g['to']} |")
    out += ["", "![decode ms/token vs context](bench_decode_vs_context.png)", "",
            "## KV cache layouts: concat vs in place (cpu target)", "",
            "`decoder.onnx` appends to the cache by concatenation into a second buffer; `decoder.static.onnx` "
            "writes the new position into the one buffer it was given (ONNX TensorScatter; the layout TensorRT "
            "10.15+ runs in place and captures as a CUDA graph). Same tokens; the cpu target serves the static one by default (`make repo KV=concat` for the other). "
            "KV MB is what a sequence of the stated capacity allocates. On a CPU each decode step reads every weight, "
            "so the layout moves ms/token by less than this machine's run-to-run noise; what it saves here is "
            "memory. The copy it avoids and the CUDA graph it allows matter on TensorRT (`make jetson-bench`).", "",
            "| model | concat ms/token | static ms/token | KV MB per sequence: concat / static (capacity) |",
            "|---|---|---|---|"]
    for r in _with(reports, "decode_static_ms_per_token"):
        d, st, kv = r["decode_ms_per_token"], r["decode_static_ms_per_token"], r["kv_mb_per_sequence"]
        out.append(f"| {r['model']} | " + ", ".join(f"{c}: {_ms(v)}" for c, v in d.items()) + " | "
                   + ", ".join(f"{c}: {_ms(v)}" for c, v in st.items())
                   + f" | {kv['concat']} / {kv['static']} ({kv['capacity']}) |")
    out += ["",
            "## Triton + gRPC streaming vs the in-process decode loop", "",
            "| model | in process ms/token | Triton + gRPC ms/token | ratio |", "|---|---|---|---|"]
    for r in _with(reports, "triton_overhead"):
        t = r["triton_overhead"]
        out.append(f"| {r['model']} | {t['in_process_ms_per_token']:.2f} | {t['triton_grpc_ms_per_token']:.2f} "
                   f"| {t['ratio']:.2f} |")
    out += ["", "## Time to first token with an image (through Triton)", "",
            "The first token comes from the prefill's logits; the client's wait is image encode + prefill + "
            "the rest (image decode and resize, the BLS call to the vision encoder, gRPC). The first decode step is the "
            "cost of each token after it.", "",
            "| model | prompt tokens | encode ms | prefill ms | the rest ms | client TTFT ms | "
            "first step ms | RSS MiB idle / peak |", "|---|---|---|---|---|---|---|---|"]
    for r in _with(reports, "ttft_with_image"):
        t = r["ttft_with_image"]
        out.append(f"| {r['model']} | {t['prompt_tokens']} | {t['image_encode_ms']:.1f} | {t['prefill_ms']:.1f} | "
                   f"{t['preprocess_and_transport_ms']:.1f} | {t['client_ttft_ms']:.1f} | {t['first_decode_ms']:.1f} | "
                   f"{r['server_rss_mb']['idle']} / {r['server_rss_mb']['peak']} |")
    # the served sections: a heading, what is compared, then each model's own tables
    for key, heading, intro, render in (
            ("batching", "Many streams: one at a time vs continuous batching (served)",
             "The same tritonserver setup, `BATCHING=off` (one sequence at a time: a one-row KV pool) "
             "against `BATCHING=continuous` (one decoder call per step for every stream), measured in the "
             "same run through the real gRPC client.", batching_markdown),
            ("caches", "Conversations about a frame: prefix and image caches (served)",
             "The same requests to a tritonserver with the caches on (`PREFIX_CACHE_MIB`, `IMAGE_CACHE_MIB` "
             "defaults) and to one with both off, in the same run.", caches_markdown),
            ("constrained", "Constrained decoding: the grammar mask's cost (served)", "", constrained_markdown),
            ("aiperf", "NVIDIA aiperf through the OpenAI gateway (served)", "", aiperf_markdown),
            ("video", "A clip against one picture (served)",
             "A camera asking about motion sends a clip. LLaVA-NeXT-Video pools each frame 2x2 (144 tokens a "
             "frame at 7B); a model without a video mode (MobileVLM) reads each frame as a picture. The 7B is "
             "measured with `python tools/bench.py --onnx llava-next-video-7b=artifacts/llava-next-video-7b-hf/onnx "
             "--only video` after `make quantize PRESET=llava-next-video-7b FORMAT=llava-hf PRECISION=int4`.",
             video_markdown),
            ("peers", "The cpu target against llama.cpp's MobileVLM port (served, same run)",
             "The tiers a CPU user picks between, ours served through tritonserver (`make repo PRECISION=int4`, "
             "`int8`, or FP32) and llama.cpp's `llama-mtmd-cli` on GGUFs converted from the same checkpoint by "
             "its MobileVLM recipe. Decode on a CPU reads every weight once per token, so bytes per token sets "
             "the pace; the GB/s column says how close each side runs to the machine's bandwidth.", peers_markdown)):
        measured = [r for r in reports if key in r]
        if measured:
            out += ["", f"## {heading}", ""] + ([intro, ""] if intro else [])
            for r in measured:
                out += render(r["model"], r[key])
    hf = [r for r in reports if "vs_transformers" in r]
    if hf:
        out += ["", "## Our ONNX Runtime path vs transformers `generate` (same weights, FP32, greedy)", "",
                "Each cell is transformers / ours.", "",
                "| model | prompt | tokens | TTFT ms | decode tok/s | TTFT speed-up | decode speed-up | same greedy tokens |",
                "|---|---|---|---|---|---|---|---|"]
        for r in hf:
            v = r["vs_transformers"]
            out.append(f"| {r['model']} | {v['prompt_tokens']} | {v['tokens']} | {v['transformers']['ttft_ms']:.1f} / "
                       f"{v['ours']['ttft_ms']:.1f} | {v['transformers']['decode_tok_s']:.1f} / "
                       f"{v['ours']['decode_tok_s']:.1f} | {v['ttft_speedup']:.2f}× | {v['decode_speedup']:.2f}× | "
                       f"{v['greedy_tokens_identical']} |")
    q = [r for r in reports if len(r.get("quantized", {})) > 1]
    if q:
        out += ["", "## Weight-only quantized decoders vs FP32 (ONNX Runtime CPU, context 200)", "",
                "The `make quantize` exports in the form the cpu target serves them (the MatMulNBits decoder; "
                "lm_head 8-bit for INT8, 4-bit for INT4), in process: decode reads every weight once per token, so fewer bytes per token "
                "is most of the gain. Accuracy figures are in each export's manifest.", "",
                "| model | precision | decode ms/token | tok/s | decoder MB |", "|---|---|---|---|---|"]
        for r in q:
            for precision, v in r["quantized"].items():
                out.append(f"| {r['model']} | {precision} | {v['decode_ms_per_token_ctx200']:.2f} | "
                           f"{v['decode_tok_s']:.1f} | {v['decoder_mb']:.0f} |")
    if soak:
        out += soak_markdown(soak)
    out.append("")
    return "\n".join(fit(out))


def _with(reports: list[dict], key: str) -> list[dict]:
    """The reports that measured `key` (a model benched for some sections only lacks the rest)."""
    return [r for r in reports if key in r]


def _ms(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fit(lines: list[str], width: int = 100) -> list[str]:
    """Prose wrapped to `width` (the docs keep every line under 120 characters); tables,
    headings, images and list items as they are."""
    import textwrap
    out = []
    for line in lines:
        if len(line) <= width or line.startswith(("|", "#", "!", "-", "*")):
            out.append(line)
        else:
            out += textwrap.wrap(line, width, break_on_hyphens=False, break_long_words=False)
    return out


def plot(reports: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in _with(reports, "decode_ms_per_token"):
        d = r["decode_ms_per_token"]
        xs = [int(c) for c in d]
        ax.plot(xs, [d[str(c)] for c in xs], marker="o", label=r["model"])
    ax.set_xlabel("context (tokens in the KV cache)")
    ax.set_ylabel("decode ms/token")
    ax.set_yscale("log")
    ax.set_title("Decoder step cost vs context, ONNX Runtime FP32, CPU")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def pairs(values: list[str]) -> dict[str, Path]:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"bench: expected NAME=DIR, got {v!r}")
        out[name] = Path(path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", action="append", required=True, help="NAME=DIR of an ONNX export (repeatable)")
    ap.add_argument("--checkpoint", action="append", help="NAME=DIR: also compare with transformers")
    ap.add_argument("--quick", action="store_true", help="fewer runs and tokens: a smoke test")
    ap.add_argument("--only", help=f"comma-separated sections to re-measure ({', '.join(SECTIONS)}); "
                    "the rest is kept from the JSON in --out")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="the per-model JSON the doc is made from")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--report-only", action="store_true", help="re-render the doc from the JSON in --out")
    ap.add_argument("--kv-budget-mib", type=int, default=0,
                    help="the served KV pool of the triton section (0: the server's default, at most RAM/4; "
                         "the 11B on a 24 GiB machine needs room for its image encoder beside it)")
    args = ap.parse_args(argv)
    only = None
    if args.only:
        only = {x.strip() for x in args.only.split(",") if x.strip()}
        if unknown := only - set(SECTIONS):
            raise SystemExit(f"bench: unknown section(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(SECTIONS)}")
    onnx, ckpts = pairs(args.onnx), pairs(args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name, onnx_dir in onnx.items():
        if args.report_only:
            reports.append(json.loads((out / f"{name}.json").read_text()))
            continue
        saved = out / f"{name}.json"
        previous = None
        if only and saved.exists():  # the other sections are kept; a new model has only these
            previous = json.loads(saved.read_text())
        report = bench_model(name, onnx_dir, ckpts.get(name), args.quick, only, previous, args.kv_budget_mib)
        (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        log(f"{name}: wrote {out / f'{name}.json'}")
        reports.append(report)
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    soak_path = out / "soak.json"
    soak = json.loads(soak_path.read_text()) if soak_path.is_file() else None
    doc.write_text(markdown(reports, soak))
    plot(reports, doc.parent / "bench_decode_vs_context.png")
    log(f"wrote {doc} and {doc.parent / 'bench_decode_vs_context.png'}")
    print(markdown(reports, soak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
