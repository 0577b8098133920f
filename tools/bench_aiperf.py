"""`make bench ONLY=aiperf`: NVIDIA's aiperf, unmodified, against the OpenAI gateway, beside our
own client's figures for the same load.

One tritonserver (8 rows) and one gateway; for each concurrency, aiperf sends streaming chat
requests of a fixed prompt length and asks for a fixed answer length (`ignore_eos`, vLLM's
name, which the gateway passes to the sampler), counting tokens as the server reports them;
then our asyncio client sends the same number of requests at the same concurrency with a
prompt of the same token count. Time to first token, inter-token latency and output tokens/s
from both should agree: aiperf measures the gateway's HTTP streaming on top of what our client
sees over gRPC.

aiperf lives in its own venv under artifacts/ (it pins its own versions of what the project
uses), installed on first use.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from edgevlm_client import AsyncClient

from edgevlm.runtime.text_model import open_tokenizer
from edgevlm.manifest import OnnxArtifacts
from edgevlm.serve.repository import render_repository
from edgevlm.serve.tritonserver import TritonServer, free_port

AIPERF = "aiperf==0.13.0"
ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "artifacts" / ".aiperf-venv"


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def aiperf_bin() -> Path:
    exe = VENV / "bin" / "aiperf"
    if not exe.is_file():
        log(f"installing {AIPERF} into {VENV} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", AIPERF], check=True)
    return exe


def _prompt(onnx_dir: Path, tokens: int) -> str:
    """A question of `tokens` tokens for our client (aiperf makes its own of the same length)."""
    tok = open_tokenizer(OnnxArtifacts.open(onnx_dir))
    words, text = "the robot looks at the shelf and counts every box it sees".split(), []
    while len(tok.encode(" ".join(text), add_bos=False)) < tokens:
        text.append(words[len(text) % len(words)])
    return " ".join(text)


async def _ours(url: str, prompt: str, concurrency: int, requests: int, tokens: int) -> dict:
    ttft, gaps, total = [], [], 0

    async def one(client: AsyncClient) -> None:
        nonlocal total
        t0 = time.perf_counter()
        times = []
        stream = client.stream(prompt, max_tokens=tokens, ignore_eos=True, temperature=0.0)
        async for _ in stream:
            times.append(time.perf_counter())
        ttft.append((times[0] - t0) * 1e3)
        gaps.extend((b - a) * 1e3 for a, b in zip(times, times[1:]))
        total += stream.stats["decode_tokens"]

    async with AsyncClient(url, timeout_s=3600) as client:
        t0 = time.perf_counter()
        pending = list(range(requests))

        async def worker() -> None:
            while pending:
                pending.pop()
                await one(client)
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return {"ttft_ms_p50": round(statistics.median(ttft), 1), "itl_ms_p50": round(statistics.median(gaps), 2),
            "output_tok_s": round(total / wall, 2)}


def _sdk_itl(base: str, model: str, prompt: str, tokens: int, requests: int) -> float:
    """Median inter-token latency the openai SDK sees streaming through the gateway."""
    import openai
    sdk, gaps = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=3600), []
    for _ in range(requests):
        times = [time.perf_counter() for chunk in sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, stream=True,
            extra_body={"ignore_eos": True}) if chunk.choices and chunk.choices[0].delta.content]
        gaps += [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    return round(statistics.median(gaps), 2)


def _beside_busy_process(url: str, prompt: str, tokens: int, requests: int) -> dict:
    """Our client's figures at concurrency 1 while one other process spins at nice 19: what a
    load generator's busy-waiting loop does to a server whose every operator is split across
    all the machine's cores (one preempted thread stalls the operator; the priority does not
    prevent it)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(19))
    try:
        return asyncio.run(_ours(url, prompt, 1, requests, tokens))
    finally:
        busy.kill()
        busy.wait()


def aiperf(onnx_dir: Path, checkpoint: Path, quick: bool) -> dict:
    exe = aiperf_bin()
    input_tokens, output_tokens = (32, 16) if quick else (64, 48)
    levels = (1, 4) if quick else (1, 4, 8)
    report = {"aiperf": AIPERF.split("==")[1], "input_tokens": input_tokens, "output_tokens": output_tokens,
              "cores": os.cpu_count(), "levels": {}}
    prompt = _prompt(onnx_dir, input_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        repo = render_repository(onnx_dir, Path(tmp) / "repository", max_sequences=8, prefix_cache_mib=0,
                                 image_cache_mib=0)
        with TritonServer(repo) as server:
            port = free_port()
            gateway = subprocess.Popen([sys.executable, "-m", "edgevlm_client.cli", "--url", server.grpc_url, "gateway",
                                        "--port", str(port), "--log-level", "warning"])
            try:
                base = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 60
                while True:
                    try:
                        urllib.request.urlopen(base + "/health", timeout=2).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the gateway did not come up") from None
                        time.sleep(0.2)
                model = json.loads(urllib.request.urlopen(base + "/v1/models").read())["data"][0]["id"]
                for c in levels:
                    requests = max(2 * c, 4 if quick else 8)
                    log(f"aiperf: concurrency {c}, {requests} requests of {input_tokens} -> {output_tokens} tokens")
                    out = Path(tmp) / f"aiperf-{c}"
                    used, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                    subprocess.run([str(exe), "profile", "--model", model, "--url", base, "--endpoint-type", "chat",
                                    "--streaming", "--concurrency", str(c), "--request-count", str(requests),
                                    "--synthetic-input-tokens-mean", str(input_tokens),
                                    "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(output_tokens),
                                    "--output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true",
                                    "--use-server-token-count", "--tokenizer", str(checkpoint.resolve()),
                                    "--artifact-dir", str(out), "--ui-type", "none", "--random-seed", "0",
                                    # one worker process and one record processor: its default
                                    # spawns a process per core, which on a small machine takes the
                                    # CPU from the model it measures
                                    "--workers-max", "1", "--record-processors", "1"],
                                   check=True, capture_output=True, text=True)
                    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu = (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)
                    d = json.loads((out / "profile_export_aiperf.json").read_text())
                    theirs = {"ttft_ms_p50": round(d["time_to_first_token"]["p50"], 1),
                              "itl_ms_p50": round(d["inter_token_latency"]["p50"], 2),
                              "output_tok_s": round(d["output_token_throughput"]["avg"], 2),
                              "osl_avg": round(d["output_sequence_length"]["avg"], 1),
                              # the cores aiperf's own processes kept busy while it measured
                              "cpu_cores_used": round(cpu / wall, 2),
                              "errors": d.get("error_summary") or []}
                    log(f"our client: concurrency {c}, the same load over gRPC")
                    ours = asyncio.run(_ours(server.grpc_url, prompt, c, requests, output_tokens))
                    report["levels"][str(c)] = {"requests": requests, "aiperf": theirs, "ours": ours}
                log("the OpenAI SDK through the gateway, one stream at a time")
                report["sdk_itl_ms_p50"] = _sdk_itl(base, model, prompt, output_tokens, 2 if quick else 4)
                log("our client again, one stream, beside one busy process at the lowest priority")
                report["ours_beside_a_busy_process"] = _beside_busy_process(server.grpc_url, prompt, output_tokens,
                                                                            2 if quick else 4)
            finally:
                gateway.terminate()
                gateway.wait(timeout=30)
    return report


def markdown(name: str, r: dict) -> list[str]:
    out = [f"### {name}", "",
           f"NVIDIA aiperf {r['aiperf']} through the OpenAI gateway (streaming chat, {r['input_tokens']}-token prompts, "
           f"{r['output_tokens']} tokens each with `ignore_eos`, tokens as the server counts them) beside our asyncio "
           "client over gRPC with the same load; medians (p50) of TTFT and inter-token latency, output tokens/s "
           "over the run.", "",
           "| concurrency | requests | TTFT ms: aiperf / ours | ITL ms: aiperf / ours | output tok/s: aiperf / ours |",
           "|---|---|---|---|---|"]
    for c, v in r["levels"].items():
        a, o = v["aiperf"], v["ours"]
        out.append(f"| {c} | {v['requests']} | {a['ttft_ms_p50']:.0f} / {o['ttft_ms_p50']:.0f} | "
                   f"{a['itl_ms_p50']:.1f} / {o['itl_ms_p50']:.1f} | {a['output_tok_s']:.2f} / {o['output_tok_s']:.2f} |")
    cores = [v["aiperf"].get("cpu_cores_used") for v in r["levels"].values()]
    if all(c is not None for c in cores):
        out += ["", f"aiperf's own processes kept {min(cores):.2f} to {max(cores):.2f} cores busy while measuring "
                f"(one worker, one record processor; its timing manager busy-waits), on a machine of "
                f"{r.get('cores', '?')} cores whose every one the model's operators are split across. The openai SDK "
                "streaming through the same gateway, one request at a time, saw a median inter-token latency of "
                f"{r['sdk_itl_ms_p50']:.1f} ms."]
    busy = r.get("ours_beside_a_busy_process")
    if busy:
        one = r["levels"]["1"]
        out += ["", f"Our client alone at concurrency 1 again, beside one process that only spins, at the lowest "
                f"priority (nice 19): TTFT {busy['ttft_ms_p50']:.0f} ms, inter-token latency "
                f"{busy['itl_ms_p50']:.1f} ms, {busy['output_tok_s']:.2f} tok/s (aiperf's reading at concurrency 1: "
                f"{one['aiperf']['ttft_ms_p50']:.0f} ms, {one['aiperf']['itl_ms_p50']:.1f} ms). A preempted "
                "operator thread stalls the whole operator, whatever the other process's priority: aiperf measures "
                "a server sharing its cores with aiperf. On a machine with cores to spare (an Orin beside its "
                "client, or aiperf on another host) the two would read the same server."]
    return out + [""]
