"""`make soak`: a long soak of the served model (not in `make test`).

    python tools/soak.py --onnx artifacts/tiny/onnx [--requests 1000] [--concurrency 8] [--runs 3]
                         [--cancels inband|grpc] [--report docs/bench/soak.json]

Each run starts a tritonserver under the supervisor and sends `--requests` requests at
`--concurrency`, random prompts (some with a photo, some with broken image bytes) and
sampling settings, of these kinds:
  complete   read to the end
  cancel     ~10 %: read a few deltas, then cancel: with our client's cancel message on the
             stream (--cancels inband, the default), or with a gRPC-level cancel as raw
             tritonclient sends it (--cancels grpc: `stop_stream(cancel_requests=True)`)
  invalid    ~5 %: an out-of-range parameter or broken image bytes (INVALID_ARG)
  drop       ~3 %: read a delta, then close the gRPC channel under the stream (no cancel)
  killed     ~2 %: a child process opens two streams, reads a delta and kills itself
A busy refusal (UNAVAILABLE) is counted and the request sent again after a pause.

A run passes when every request is accounted for (the server's outcome counters add up to
the attempts sent, with no `error`), the supervisor never restarted the server, the active
and queue gauges are back to 0, and the server's RSS grew less than --rss-growth-mb after
warm-up. Exits 1 naming the first broken property; a dead server's log is kept (supervisor).

With --cancels grpc the point is to count tritonserver 2.51's crashes (its gRPC frontend can
take SIGSEGV when a cancel races a response): a restart is recorded, not a failure, and the
counters of a run with a restart are not compared (they start again at 0). --report writes
the runs' crashes and cancels as JSON (make bench puts it in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from edgevlm.runtime.observer import OUTCOMES

WORDS = ("cat robot door red open table light what where how many is the a of describe colour left right "
         "near far box person car tree sky é 猫 🙂").split()
KILLED_STREAMS = 2  # per killed child

CHILD = """
import os, signal, sys
from edgevlm_client import Client
url = sys.argv[1]
c = Client(url, timeout_s=60)
streams = [iter(c.stream("Tell me a long story about " + w, max_tokens=400)) for w in ("a cat", "a robot")]
for s in streams:
    next(s)
os.kill(os.getpid(), signal.SIGKILL)
"""


def log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


def grpc_cancelled(url: str, prompt: str, image, **options) -> str:
    """A stream cancelled at the gRPC level after two responses, as raw tritonclient does it
    (`stop_stream(cancel_requests=True)`). How it ended: "cancelled", "complete" (it finished
    first), or the status a refusal announced ("UNAVAILABLE", "INVALID_ARG"; "error" if none)."""
    import queue

    import tritonclient.grpc as grpcclient
    from edgevlm_client.contract import MODEL, STATS_ERROR
    from edgevlm_client.request import build_inputs, read_response
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    status, n = None, 0
    try:
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer(MODEL, build_inputs(prompt, image, **options))
        while n < 2:
            result, error = got.get(timeout=120)
            if error is not None:
                return status or "error"
            _, stats = read_response(result)
            if STATS_ERROR in stats:
                status = stats[STATS_ERROR].get("status")
                continue
            if stats:
                return "complete"
            n += 1
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return "cancelled"


class Soak:
    def __init__(self, url: str, images: list[bytes], seed: int, cancels: str = "inband"):
        self.url, self.images, self.cancels = url, images, cancels
        self.rng = random.Random(seed)
        self.attempts = Counter()  # what the server should count, by expected outcome group
        self.endings = Counter()

    def plan(self) -> dict:
        r, roll = self.rng, self.rng.random()
        kind = ("cancel" if roll < 0.10 else "invalid" if roll < 0.15 else "drop" if roll < 0.18
                else "killed" if roll < 0.20 else "complete")
        image = r.choice([None, None, *self.images])
        req = dict(prompt=" ".join(r.choice(WORDS) for _ in range(r.randint(1, 60))), image=image,
                   max_tokens=r.randint(1, 48), temperature=r.choice([0.0, 0.0, 0.8]), seed=r.randint(0, 999))
        if kind == "invalid":
            if r.random() < 0.5:  # refused by the server (the client library refuses bad numbers itself)
                req["prompt"] = "word " * 600
            else:
                req["image"] = b"\x89PNG\r\n\x1a\n broken"
        if kind in ("cancel", "drop"):
            req["max_tokens"] = 400
        return {"kind": kind, "req": req}

    async def one(self, client, job: dict) -> None:
        from edgevlm_client import EdgeVLMError, InvalidRequest, ServerBusy
        kind = job["kind"]
        if kind == "killed":
            return await self.killed()
        if kind == "drop":
            return await self.drop(dict(job["req"]))
        if kind == "cancel" and self.cancels == "grpc":
            return await self.grpc_cancel(dict(job["req"]))
        while True:  # again after a busy refusal, which the server counts as one request
            req = dict(job["req"])
            self.attempts["sent"] += 1
            stream = client.stream(req.pop("prompt"), image=req.pop("image"), **req)
            try:
                n = 0
                async for _ in stream:
                    n += 1
                    if kind == "cancel" and n >= 2:
                        break
                self.endings["cancelled" if kind == "cancel" and n >= 2 else "complete"] += 1
                return
            except ServerBusy:
                self.endings["refused"] += 1
            except InvalidRequest:
                self.endings["invalid"] += 1
                return
            except EdgeVLMError as e:  # typed: what a crashed server gives its streams
                self.endings[type(e).__name__] += 1
                return
            finally:
                await stream.aclose()
            await asyncio.sleep(0.2)

    async def grpc_cancel(self, req: dict) -> None:
        options = {k: v for k, v in req.items() if k not in ("prompt", "image")}
        while True:  # again after a busy refusal, as in one()
            self.attempts["sent"] += 1
            ending = await asyncio.to_thread(grpc_cancelled, self.url, req["prompt"], req["image"], **options)
            if ending != "UNAVAILABLE":
                self.endings[{"INVALID_ARG": "invalid"}.get(ending, ending)] += 1
                return
            self.endings["refused"] += 1
            await asyncio.sleep(0.2)

    async def drop(self, req: dict) -> None:
        """A stream whose connection goes away under it: a channel of its own, closed mid-stream."""
        from edgevlm_client import AsyncClient
        self.attempts["sent"] += 1
        client = AsyncClient(self.url, timeout_s=60)
        stream = client.stream(req.pop("prompt"), image=req.pop("image"), **req)
        try:
            async for _ in stream:
                break
        except Exception as e:  # busy: counted by the server as refused
            self.endings[type(e).__name__] += 1
            return
        await client.close()  # the channel closes; the stream is never cancelled by us
        self.endings["dropped"] += 1

    async def killed(self) -> None:
        self.attempts["sent"] += KILLED_STREAMS
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, self.url,
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        code = await proc.wait()
        self.endings["killed" if code == -signal.SIGKILL else f"child exit {code}"] += KILLED_STREAMS

    async def run(self, requests: int, concurrency: int) -> None:
        from edgevlm_client import AsyncClient, Retry
        jobs = [self.plan() for _ in range(requests)]
        async with AsyncClient(self.url, timeout_s=120, retry=Retry(attempts=1)) as client:
            gate = asyncio.Semaphore(concurrency)

            async def limited(job):
                async with gate:
                    await self.one(client, job)
            await asyncio.gather(*[limited(j) for j in jobs])


def soak_once(onnx: Path, requests: int, concurrency: int, seed: int, rss_growth_mb: float, work: Path,
              cancels: str = "inband") -> dict:
    """One run: {"problems": [...], "crashes": restarts, "cancels": streams the clients cancelled}."""
    from edgevlm.samples import sample_images
    from edgevlm.serve.repository import render_repository
    from edgevlm.serve.supervisor import Supervisor
    from edgevlm.serve.tritonserver import TritonServer
    repo = render_repository(onnx, work / "repository", max_sequences=concurrency, default_max_tokens=32)
    images = list(sample_images().values())
    problems = []
    server = TritonServer(repo, log_path=work / "tritonserver.log")
    with server:
        supervisor = Supervisor(server, interval_s=0.5, log=log).start()
        try:
            warm = Soak(server.grpc_url, images, seed + 1)
            asyncio.run(warm.run(32, concurrency))
            counted = settle(server, sum(warm.attempts.values()))
            rss0 = server.unleaked_rss_mb()
            soak = Soak(server.grpc_url, images, seed, cancels)
            t0 = time.monotonic()
            asyncio.run(soak.run(requests, concurrency))
            result = {"crashes": len(supervisor.restarts), "cancels": soak.endings["cancelled"],
                      "problems": problems}
            if supervisor.restarts:
                where = ", ".join(map(str, supervisor.kept_logs))
                log(f"{requests} requests in {time.monotonic() - t0:.0f} s: client endings {dict(soak.endings)}; "
                    f"the server crashed and was restarted {len(supervisor.restarts)} times (logs kept: {where})")
                if cancels == "inband":
                    problems.append(f"the server was restarted {len(supervisor.restarts)} times (logs kept: {where})")
                return result  # its counters started again at 0: nothing to compare
            want = sum(counted[o] for o in OUTCOMES) + soak.attempts["sent"]
            after = settle(server, want)
            seen = {o: after[o] - counted[o] for o in OUTCOMES}
            growth = server.unleaked_rss_mb() - rss0
            log(f"{requests} requests in {time.monotonic() - t0:.0f} s: client endings {dict(soak.endings)}; "
                f"server outcomes {seen}; RSS +{growth:.1f} MiB; restarts 0")
            if sum(seen.values()) != soak.attempts["sent"]:
                problems.append(f"the server finished {sum(seen.values())} requests of {soak.attempts['sent']} sent")
            if seen["error"]:
                problems.append(f"{seen['error']:.0f} requests ended in a server error")
            if seen["invalid"] != soak.endings["invalid"]:
                problems.append(f"invalid: server {seen['invalid']:.0f}, clients {soak.endings['invalid']}")
            if seen["refused"] != soak.endings["refused"]:
                problems.append(f"refused: server {seen['refused']:.0f}, clients {soak.endings['refused']}")
            m = server.metrics()
            for gauge in ("edgevlm_active_sequences", "edgevlm_queued_requests"):
                value = m.get(gauge + '{model="mobilevlm"}', 0.0)
                if value != 0:
                    problems.append(f"{gauge} is {value:.0f} after the soak")
            if growth > rss_growth_mb:
                problems.append(f"server RSS grew {growth:.0f} MiB (limit {rss_growth_mb:.0f})")
            return result
        finally:
            supervisor.stop()


def outcomes(server) -> dict[str, float]:
    m = server.metrics()
    return {o: m.get(f'edgevlm_requests_total{{model="mobilevlm",outcome="{o}"}}', 0.0) for o in OUTCOMES}


def settle(server, finished: float, patience_s: float = 300.0) -> dict[str, float]:
    """Wait until the server has finished `finished` requests and has none active."""
    deadline = time.monotonic() + patience_s
    while True:
        got = outcomes(server)
        act = server.metrics().get('edgevlm_active_sequences{model="mobilevlm"}', 0.0)
        if sum(got.values()) >= finished and act == 0:
            return got
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: the server finished {sum(got.values()):.0f} of {finished:.0f} requests "
                             f"and has {act:.0f} active after {patience_s:.0f} s: requests were lost")
        time.sleep(0.1)  # Triton's metrics can only be polled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="runs in a row; all must pass")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--rss-growth-mb", type=float, default=128.0)
    ap.add_argument("--cancels", choices=("inband", "grpc"), default="inband",
                    help="how the cancelling clients cancel: our cancel message, or a gRPC-level cancel")
    ap.add_argument("--report", type=Path, help="add this mode's crashes and cancels to a JSON file")
    args = ap.parse_args(argv)
    crashes = cancels = 0
    failed = False
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="edgevlm-soak-") as tmp:
            log(f"run {run} of {args.runs} ({args.cancels} cancels)")
            result = soak_once(Path(args.onnx), args.requests, args.concurrency, args.seed + run,
                               args.rss_growth_mb, Path(tmp), args.cancels)
            crashes, cancels = crashes + result["crashes"], cancels + result["cancels"]
            if result["problems"] or result["crashes"]:
                kept = Path(os.environ.get("SOAK_LOG_DIR", "artifacts/soak"))
                kept.mkdir(parents=True, exist_ok=True)
                for f in Path(tmp).glob("tritonserver*.log"):
                    (kept / f"run{run}-{args.cancels}-{f.name}").write_bytes(f.read_bytes())
                for p in result["problems"]:
                    log(f"FAILED run {run}: {p}")
                log(f"server logs copied to {kept}/")
            if result["problems"]:
                failed = True
                break
    rate = 1e4 * crashes / cancels if cancels else 0.0
    log(f"{args.cancels} cancels: {crashes} crash(es) in {run} runs of {args.requests} requests "
        f"({cancels} streams cancelled): {rate:.1f} per 10k cancels")
    if args.report:
        report = json.loads(args.report.read_text()) if args.report.is_file() else {}
        report[args.cancels] = {"runs": run, "requests_per_run": args.requests, "concurrency": args.concurrency,
                                "cancels": cancels, "crashes": crashes, "crashes_per_10k_cancels": round(rate, 2),
                                "clean": not failed, "date": time.strftime("%Y-%m-%d")}
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    if failed:
        return 1
    log(f"{args.runs} runs of {args.requests} requests at concurrency {args.concurrency}: all clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
