"""`make bench`, batching: one sequence at a time vs continuous batching, served.

For each precision the cpu target serves and each mode (`batching: off` | `continuous`), one
tritonserver, then text-only greedy requests at concurrency 1, 2, 4, 8 through the real
gRPC client: aggregate tok/s (tokens / wall time), p50 inter-token latency, p50 time to
first text. Then the newcomer case: 7 streams decoding, one more request arrives: its time
to first text against the same request on an idle server, and the longest gap the 7 saw
while it was prefilled (the stall chunked prefill bounds).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from edgevlm_client.aio import AsyncClient
from edgevlm_client.bench import run

from edgevlm.serve.repository import render_repository
from edgevlm.serve.tritonserver import TritonServer

LEVELS = (1, 2, 4, 8)
MODES = ("off", "continuous")
QUESTION = "Tell me a long story about a robot."
NEWCOMER = "What should the robot do next?"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


async def _first_text(client: AsyncClient, prompt: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    stream = client.stream(prompt, max_tokens=max_tokens, temperature=0.0)
    try:
        async for _ in stream:
            return (time.perf_counter() - t0) * 1e3
    finally:
        await stream.aclose()
    return float("nan")


async def newcomer(url: str, running: int, long_tokens: int) -> dict:
    """TTFT of one request alone, then while `running` streams decode; their longest gap meanwhile."""
    async with AsyncClient(url, timeout_s=1800) as client:
        alone = await _first_text(client, NEWCOMER, 2)
        started = [asyncio.Event() for _ in range(running)]
        stamps: list[list[float]] = [[] for _ in range(running)]
        stop = asyncio.Event()

        async def background(i: int) -> None:
            stream = client.stream(QUESTION + f" Chapter {i + 1}.", max_tokens=long_tokens, temperature=0.0)
            try:
                async for _ in stream:
                    stamps[i].append(time.perf_counter())
                    started[i].set()
                    if stop.is_set():
                        break
            finally:
                started[i].set()
                await stream.aclose()

        tasks = [asyncio.create_task(background(i)) for i in range(running)]
        for e in started:
            await e.wait()
        t0 = time.perf_counter()
        loaded = await _first_text(client, NEWCOMER, 2)
        t1 = t0 + loaded / 1e3
        stop.set()
        await asyncio.gather(*tasks)
    gaps = [(b - a) * 1e3 for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1]
    still = sum(1 for s in stamps if s and s[-1] > t1)  # streams that were still decoding when it began
    return {"running": running, "ttft_alone_ms": round(alone, 1), "ttft_with_running_ms": round(loaded, 1),
            "running_streams_max_gap_ms": round(max(gaps), 1) if gaps else None, "streams_still_running": still}


def _steps(server) -> tuple[float, float]:
    """(rows decoded, seconds spent in decode steps) so far: the scheduler's counters."""
    m = server.metrics()
    return (m.get('edgevlm_decode_step_rows_total{model="mobilevlm"}', 0.0),
            m.get('edgevlm_decode_step_seconds_total{model="mobilevlm"}', 0.0))


def sweep(onnx_dir: Path, mode: str, tokens: int, levels, long_tokens: int) -> dict:
    out = {"levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # caches off: every request repeats one prompt, and a prefix hit would skip its prefill
        repo = render_repository(onnx_dir, Path(tmp) / "repository", batching=mode, max_sequences=max(levels),
                                 max_queue=4 * max(levels), default_max_tokens=tokens,
                                 prefix_cache_mib=0, image_cache_mib=0)
        with TritonServer(repo) as server:
            for c in levels:
                rows0, secs0 = _steps(server)
                r = asyncio.run(run(server.grpc_url, requests=max(2, c), concurrency=c, prompt=QUESTION,
                                    warmup=1 if c == levels[0] else 0, timeout_s=1800, max_tokens=tokens,
                                    temperature=0.0))
                out["levels"][str(c)] = {"aggregate_tok_s": r["throughput_tok_s"],
                                         "aggregate_decode_tok_s": r["decode_tok_s_aggregate"],
                                         "itl_p50_ms": r["itl_ms"].get("p50"),
                                         "ttft_p50_ms": r["ttft_ms"].get("p50"), "requests": r["requests"],
                                         "ok": r["ok"], "tokens": r["tokens"]}
                rows, secs = (a - b for a, b in zip(_steps(server), (rows0, secs0)))
                if mode == "continuous" and secs > 0:  # the decode steps alone, as the server timed them
                    out["levels"][str(c)]["decode_step_rows_per_s"] = round(rows / secs, 2)
                log(f"    {mode} c={c}: {r['throughput_tok_s']} tok/s (decode {r['decode_tok_s_aggregate']}), p50 ITL {r['itl_ms'].get('p50')} ms, "
                    f"p50 TTFT {r['ttft_ms'].get('p50')} ms ({r['ok']}/{r['requests']} ok)")
            out["newcomer"] = asyncio.run(newcomer(server.grpc_url, max(levels) - 1, long_tokens))
            log(f"    {mode} newcomer: {out['newcomer']}")
    return out


def batching(onnx_dir: Path, quick: bool) -> dict:
    """Both modes for FP32 and for the INT4 export beside it (if `make quantize PRECISION=int4` made one)."""
    levels = (1, 4) if quick else LEVELS
    tokens, long_tokens = (8, 24) if quick else (32, 96)
    report = {"tokens": tokens, "prompt": QUESTION, "precisions": {}}
    for precision, root in (("fp32", onnx_dir), ("int4", onnx_dir.parent / "onnx-int4")):
        if not (root / "manifest.json").is_file():
            log(f"  batching {precision}: no export at {root}, skipped")
            continue
        log(f"  batching {precision}")
        modes = {mode: sweep(root, mode, tokens, levels, long_tokens) for mode in MODES}
        one, top = str(levels[0]), str(levels[-1])
        cont, off = modes["continuous"]["levels"], modes["off"]["levels"]
        modes["ratios"] = {
            f"continuous_c{top}_vs_c{one}_aggregate": round(cont[top]["aggregate_tok_s"] / cont[one]["aggregate_tok_s"], 2),
            f"continuous_c{top}_vs_c{one}_aggregate_decode": round(
                cont[top]["aggregate_decode_tok_s"] / cont[one]["aggregate_decode_tok_s"], 2),
            f"continuous_c{top}_vs_c{one}_decode_step_rate": round(
                cont[top]["decode_step_rows_per_s"] / cont[one]["decode_step_rows_per_s"], 2),
            f"continuous_vs_off_c{top}_aggregate": round(cont[top]["aggregate_tok_s"] / off[top]["aggregate_tok_s"], 2),
            f"continuous_c{top}_itl_vs_c{one}": round(cont[top]["itl_p50_ms"] / cont[one]["itl_p50_ms"], 2),
        }
        report["precisions"][precision] = modes
    return report


def markdown(name: str, b: dict) -> list[str]:
    out = [f"### {name}", "", *([b["note"].capitalize() + ".", ""] if b.get("note") else []),
           f"Text-only greedy, {b['tokens']} tokens per request (\"{b['prompt']}\"), concurrency c = requests in "
           "flight. Aggregate = all tokens / wall time (prefills included); aggregate decode = tokens after each "
           "stream's first / the time from the earliest first text to the last end (later prefills interleave); "
           "decode steps = rows per second of the scheduler's decode steps alone (its metrics).", "",
           "Columns: aggregate tok/s, aggregate decode tok/s, decode steps rows/s, p50 inter-token (ITL) ms, "
           "p50 time to first text (TTFT) ms.", "",
           "| precision | mode | c | aggregate | aggregate decode | decode steps | p50 ITL ms | p50 TTFT ms |",
           "|---|---|---|---|---|---|---|---|"]
    for precision, modes in b["precisions"].items():
        for mode in MODES:
            for c, v in modes[mode]["levels"].items():
                out.append(f"| {precision} | {mode} | {c} | {v['aggregate_tok_s']:.1f} | "
                           f"{v.get('aggregate_decode_tok_s', float('nan')):.1f} | "
                           f"{v.get('decode_step_rows_per_s', '–')} | {v['itl_p50_ms']:.0f} | "
                           f"{v['ttft_p50_ms']:.0f} |")
    out += ["", "| precision | ratio | value |", "|---|---|---|"]
    for precision, modes in b["precisions"].items():
        for k, v in modes["ratios"].items():
            out.append(f"| {precision} | {k.replace('_', ' ')} | {v:.2f}× |")
    out += ["", "A new request while the others decode (its time to first text; the longest gap the running "
            "streams saw meanwhile):", "",
            "| precision | mode | running | TTFT alone ms | TTFT with them ms | their longest gap ms |",
            "|---|---|---|---|---|---|"]
    for precision, modes in b["precisions"].items():
        for mode in MODES:
            n = modes[mode]["newcomer"]
            out.append(f"| {precision} | {mode} | {n['running']} | {n['ttft_alone_ms']:.0f} | "
                       f"{n['ttft_with_running_ms']:.0f} | {n['running_streams_max_gap_ms']} |")
    out.append("")
    return out
