"""`make bench`, caches: time to first text of a conversation about a camera frame, served.

One tritonserver with the prefix and image caches on (the defaults), one with both off, the
same requests to each, a new frame per run (camera_frame: new bytes, nothing cached):

  cold        the first question about a new frame: decode, resize, encode, prefill all
  follow-up   the chat's second question, the first turn (question and answer) as history
  repeated    the first question again, about the same frame

The goal is a follow-up at most a quarter of the cold turn's time to first text.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgevlm_client import Client

from edgevlm.samples import camera_frame
from edgevlm.serve.repository import render_repository
from edgevlm.serve.tritonserver import TritonServer

FIRST, SECOND = "What is in the image?", "What colour is it, and is anything behind it?"
KINDS = ("cold", "follow_up", "repeated")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _timed(client: Client, question: str, image: bytes, history, tokens: int) -> tuple[dict, str]:
    t0 = time.perf_counter()
    stream = client.stream(question, image=image, history=history, max_tokens=tokens)
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    s = stream.stats
    return {"ttft_ms": ((first or time.perf_counter()) - t0) * 1e3, "image_encode_ms": s["image_encode_ms"],
            "prefill_ms": s["prefill_ms"], "prompt_tokens": s["prefill_tokens"],
            "cached_tokens": s.get("cached_tokens", 0), "image_cached": bool(s.get("image_cached"))}, stream.text


def _conversations(server: TritonServer, runs: int, tokens: int, seed0: int) -> dict:
    client = Client(server.grpc_url, timeout_s=1800)
    client.generate("Hi", max_tokens=2)  # warm-up
    out = {k: [] for k in KINDS}
    for run in range(runs):
        image = camera_frame(seed0 + run)
        cold, answer = _timed(client, FIRST, image, None, tokens)
        follow, _ = _timed(client, SECOND, image, [[FIRST, answer.strip()]], tokens)
        again, _ = _timed(client, FIRST, image, None, tokens)
        for k, v in zip(KINDS, (cold, follow, again)):
            out[k].append(v)
    return {k: {m: round(statistics.median(r[m] for r in rows), 1) if m != "image_cached" else all(r[m] for r in rows)
                for m in rows[0]} for k, rows in out.items()}


def caches(onnx_dir: Path, quick: bool) -> dict:
    runs, tokens = (2, 4) if quick else (3, 8)
    report = {"runs": runs, "tokens": tokens, "questions": [FIRST, SECOND]}
    for name, mib in (("on", None), ("off", 0)):
        log(f"caches {name}: cold turn, follow-up, repeated question")
        sizes = {} if mib is None else {"prefix_cache_mib": 0, "image_cache_mib": 0}
        with tempfile.TemporaryDirectory() as tmp:
            repo = render_repository(onnx_dir, Path(tmp) / "repository", max_sequences=1, **sizes)
            with TritonServer(repo) as server:
                report[name] = _conversations(server, runs, tokens, seed0=1000 * (mib is None))
    on, off = report["on"], report["off"]
    report["ratios"] = {
        "follow_up_vs_cold": round(on["follow_up"]["ttft_ms"] / on["cold"]["ttft_ms"], 3),
        "repeated_vs_cold": round(on["repeated"]["ttft_ms"] / on["cold"]["ttft_ms"], 3),
        "follow_up_vs_uncached_follow_up": round(on["follow_up"]["ttft_ms"] / off["follow_up"]["ttft_ms"], 3),
    }
    return report


def markdown(name: str, c: dict) -> list[str]:
    out = [f"### {name}", "",
           f"A new camera frame per run ({c['runs']} runs, medians), {c['tokens']} tokens per answer. Cold: "
           f"\"{c['questions'][0]}\" about a new frame. Follow-up: \"{c['questions'][1]}\" with the first turn "
           "as history (what `Chat.ask` sends). Repeated: the first question again. Time to first text as the "
           "gRPC client sees it.", "",
           "| caches | turn | TTFT ms | image encode ms | prefill ms | prompt tokens | from the prefix cache |",
           "|---|---|---|---|---|---|---|"]
    for mode in ("on", "off"):
        for kind in KINDS:
            v = c[mode][kind]
            image = "0 (cached)" if v["image_cached"] else f"{v['image_encode_ms']:.0f}"
            out.append(f"| {mode} | {kind.replace('_', '-')} | {v['ttft_ms']:.0f} | {image} | {v['prefill_ms']:.0f} | "
                       f"{v['prompt_tokens']:.0f} | {v['cached_tokens']:.0f} |")
    r = c["ratios"]
    out += ["", f"Follow-up / cold: **{r['follow_up_vs_cold']:.2f}×** (goal ≤ 0.25×); repeated / cold: "
            f"{r['repeated_vs_cold']:.2f}×; follow-up with caches / without: {r['follow_up_vs_uncached_follow_up']:.2f}×.",
            ""]
    return out
