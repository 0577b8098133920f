"""Load test against a running server: N requests at concurrency C, measured on the client.

Per request: time to first text (TTFT), gaps between text deltas (inter-token latency: one
delta per token, except where the server holds back an incomplete UTF-8 character or a
possible stop string), decode tok/s, end-to-end time. Reported as percentiles.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from edgevlm_client.aio import AsyncClient
from edgevlm_client.errors import EdgeVLMError

PERCENTILES = (50, 90, 99)


@dataclass
class Sample:
    start: float = 0.0  # perf_counter() when the request was sent
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    gaps_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def tok_s(self) -> float | None:
        """Decode rate after the first token, as the client saw it."""
        decode_s = (self.e2e_ms - self.ttft_ms) / 1e3
        return (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else None


def decode_aggregate(samples: list[Sample]) -> float:
    """Tokens after each request's first, over the time from the earliest first text to the
    latest end: the decode rate all streams together got (prefill waits before a stream's
    first text are left out; prefills that interleave with decoding are not)."""
    timed = [s for s in samples if s.tokens > 1]
    if not timed:
        return 0.0
    begin = min(s.start + s.ttft_ms / 1e3 for s in timed)
    end = max(s.start + s.e2e_ms / 1e3 for s in timed)
    return round(sum(s.tokens - 1 for s in timed) / (end - begin), 2) if end > begin else 0.0


def summary(values) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not v.size:
        return {"n": 0}
    out = {"n": int(v.size), "mean": round(float(v.mean()), 3)}
    out.update({f"p{p}": round(float(np.percentile(v, p)), 3) for p in PERCENTILES})
    out["max"] = round(float(v.max()), 3)
    return out


async def _one(client: AsyncClient, prompt: str, image: bytes | None, options: dict) -> Sample:
    s = Sample()
    t0 = last = s.start = time.perf_counter()
    stream = client.stream(prompt, image=image, **options)
    try:
        async for _ in stream:
            now = time.perf_counter()
            if not s.ttft_ms:
                s.ttft_ms = (now - t0) * 1e3
            else:
                s.gaps_ms.append((now - last) * 1e3)
            last = now
        s.tokens = int(stream.stats.get("decode_tokens", 0))
        s.prompt_tokens = int(stream.stats.get("prefill_tokens", 0))
    except EdgeVLMError as e:
        s.error = type(e).__name__
    finally:
        await stream.aclose()
    s.e2e_ms = (time.perf_counter() - t0) * 1e3
    return s


async def run(url: str, *, requests: int, concurrency: int, prompt: str, image: bytes | None = None,
              warmup: int = 1, tls=None, timeout_s: float = 300.0, **options) -> dict:
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be >= 1")
    async with AsyncClient(url, tls=tls, timeout_s=timeout_s) as client:
        await client.wait_ready(timeout_s=min(timeout_s, 30.0))
        for _ in range(warmup):  # first requests pay for lazy initialisation on the server
            await _one(client, prompt, image, options)
        gate = asyncio.Semaphore(concurrency)

        async def limited() -> Sample:
            async with gate:
                return await _one(client, prompt, image, options)

        t0 = time.perf_counter()
        samples = await asyncio.gather(*[limited() for _ in range(requests)])
        wall_s = time.perf_counter() - t0
    ok = [s for s in samples if not s.error]
    tokens = sum(s.tokens for s in ok)
    return {
        "url": url, "requests": requests, "concurrency": concurrency, "image": image is not None,
        "options": options, "ok": len(ok), "errors": dict(Counter(s.error for s in samples if s.error)),
        "wall_s": round(wall_s, 3), "tokens": tokens, "throughput_tok_s": round(tokens / wall_s, 2),
        "prompt_tokens": ok[0].prompt_tokens if ok else 0,
        "ttft_ms": summary(s.ttft_ms for s in ok),
        "itl_ms": summary(g for s in ok for g in s.gaps_ms),
        "tok_s": summary(s.tok_s for s in ok),
        "decode_tok_s_aggregate": decode_aggregate(ok),
        "e2e_ms": summary(s.e2e_ms for s in ok),
    }


def table(report: dict) -> str:
    rows = [("TTFT ms", report["ttft_ms"]), ("inter-token ms", report["itl_ms"]),
            ("decode tok/s per request", report["tok_s"]), ("end-to-end ms", report["e2e_ms"])]
    cols = ("mean",) + tuple(f"p{p}" for p in PERCENTILES) + ("max",)
    lines = [f"{report['ok']}/{report['requests']} requests ok at concurrency {report['concurrency']} "
             f"in {report['wall_s']:.2f} s: {report['tokens']} tokens, {report['throughput_tok_s']:.1f} tok/s in all"
             + (f"; errors {report['errors']}" if report["errors"] else ""),
             f"{'':26}" + "".join(f"{c:>10}" for c in cols)]
    for name, stats in rows:
        lines.append(f"{name:26}" + "".join(f"{stats.get(c, float('nan')):>10.2f}" for c in cols))
    return "\n".join(lines)
