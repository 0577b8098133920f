"""Per-token cost of Triton + gRPC streaming vs the same decode loop called in process.

    python build/bench_stream_overhead.py --onnx artifacts/tiny/onnx --tokens 200 --runs 3

Both sides run the same greedy text-only request; the figure is the median gap between
consecutive text deltas (in process: events from Generator.generate; over Triton: responses
arriving at the gRPC client). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgevlm.prompt import build_prompt, tokenize_prompt
from edgevlm.repository import render_repository
from edgevlm.sampling import SamplingParams
from edgevlm.serving import load_generator
from edgevlm.tritonserver import TritonServer
from edgevlm_client import Client

QUESTION = "Tell me a long story about a robot."


def gaps_ms(times: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in zip(times, times[1:])]


def in_process(onnx_dir: str, tokens: int, runs: int) -> list[float]:
    gen = load_generator(onnx_dir)
    ids = tokenize_prompt(gen.tok, build_prompt(QUESTION, image=False))
    list(gen.generate(ids, None, SamplingParams(max_tokens=4)))  # warm-up, as on the server side
    out = []
    for _ in range(runs):
        times = []
        for event in gen.generate(ids, None, SamplingParams(max_tokens=tokens)):
            if event.text:
                times.append(time.perf_counter())
        out += gaps_ms(times)
    return out


def over_triton(onnx_dir: str, tokens: int, runs: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        repo = render_repository(onnx_dir, Path(tmp) / "repository", max_sequences=1)
        with TritonServer(repo) as server:
            client = Client(server.grpc_url, timeout_s=600)
            client.generate(QUESTION, max_tokens=4)  # warm-up
            out = []
            for _ in range(runs):
                times = []
                for _delta in client.stream(QUESTION, max_tokens=tokens):
                    times.append(time.perf_counter())
                out += gaps_ms(times)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    local = in_process(args.onnx, args.tokens, args.runs)
    served = over_triton(args.onnx, args.tokens, args.runs)
    a, b = statistics.median(local), statistics.median(served)
    print(json.dumps({"onnx": args.onnx, "machine": f"{platform.machine()}, {platform.processor() or '?'}",
                      "in_process_ms_per_token": round(a, 3), "triton_grpc_ms_per_token": round(b, 3),
                      "overhead_ms_per_token": round(b - a, 3), "ratio": round(b / a, 3),
                      "samples": [len(local), len(served)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
