"""`make bench`, constrained decoding: what the grammar's token mask costs per token, served,
and what the other per-token options cost: logprobs, and tool calls against free text.

The same requests free and with each option, on one tritonserver, alone and four at a time:
a JSON schema with one free string field, which keeps the random-weight model writing (mostly
to max_tokens); logprobs with 5 alternatives; a call of one function with that schema as its
parameters (tool_choice naming it). The ratio of the streams' decode rates (the server's
stats: tokens after the first / decode time) is the option's cost. Also: the one-off compile
time of each schema the tests use (and of the vocabulary, once per model), in process. The
prefix cache is on, as served: a tools request's longer prompt (the function described in the
system line) is prefilled once and then reused, as it is for a robot that sends the same tools.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgevlm_client import AsyncClient

from edgevlm.manifest import OnnxArtifacts
from edgevlm.runtime.grammar import Grammars
from edgevlm.runtime.text_model import open_tokenizer
from edgevlm.serve.repository import render_repository
from edgevlm.serve.tritonserver import TritonServer

CAPTION = {"type": "object", "properties": {"caption": {"type": "string"}}, "required": ["caption"],
           "additionalProperties": False}
PROMPT = "Describe the scene as JSON."
# the robotics-style schemas of tests/test_constrained.py, compiled from scratch
SCHEMAS = {
    "detection": {"type": "object", "additionalProperties": False, "required": ["person", "count", "light"],
                  "properties": {"person": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 12},
                                 "light": {"enum": ["red", "amber", "green"]}}},
    "boxes": {"type": "object", "additionalProperties": False, "required": ["boxes"],
              "properties": {"boxes": {"type": "array", "maxItems": 3, "items": {
                  "type": "object", "additionalProperties": False, "required": ["label", "box"],
                  "properties": {"label": {"enum": ["cup", "person", "door"]},
                                 "box": {"type": "array", "minItems": 4, "maxItems": 4,
                                         "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}}}},
    "caption": CAPTION,
}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


CAPTION_TOOL = {"type": "function", "function": {"name": "caption", "description": "Caption the scene",
                                                 "parameters": CAPTION}}
# the options each variant adds to the same request
VARIANTS = {"free": {}, "constrained": {"json_schema": CAPTION}, "logprobs": {"logprobs": 5},
            "tools": {"tools": [CAPTION_TOOL], "tool_choice": "caption"}}


PROMPT_TOKENS: dict[str, int] = {}  # each variant's prompt length, as the server counted it


async def _round(url: str, n: int, tokens: int, variant: str) -> tuple[float, list[float]]:
    """n requests at once: (aggregate decode tok/s, each one's server-side decode tok/s)."""
    options = VARIANTS[variant]
    async with AsyncClient(url, timeout_s=1800) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[client.generate(PROMPT, max_tokens=tokens, **options) for _ in range(n)])
        wall = time.perf_counter() - t0
    PROMPT_TOKENS[variant] = results[0].stats["prefill_tokens"]
    rates = [r.stats["decode_tokens_per_s"] for r in results if r.tokens >= 8]  # enough steps to time
    return sum(r.tokens for r in results) / wall, rates


def constrained(onnx_dir: Path, quick: bool) -> dict:
    tokens, runs = (16, 1) if quick else (48, 6)  # six interleaved rounds: a round varies by ~10 %
    art = OnnxArtifacts.open(onnx_dir)
    report = {"tokens": tokens, "runs": runs, "schema": CAPTION, "served": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # the prefix cache as served (on): the same system line and tools in every request, as a
        # robot sends them, are prefilled once, so the columns compare what each token costs
        repo = render_repository(onnx_dir, Path(tmp) / "repository", max_sequences=4, image_cache_mib=0)
        with TritonServer(repo) as server:
            for variant in VARIANTS:  # warm-up: compiles each grammar once
                asyncio.run(_round(server.grpc_url, 1, 4, variant))
            for c in (1, 4):
                log(f"constrained decoding: concurrency {c}, {', '.join(VARIANTS)} in turn")
                rates = {k: [] for k in VARIANTS}
                per_stream = {k: [] for k in VARIANTS}
                for _ in range(runs):  # interleaved, so drift on a shared machine hits all alike
                    for kind in VARIANTS:
                        agg, each = asyncio.run(_round(server.grpc_url, c, tokens, kind))
                        rates[kind].append(agg)
                        per_stream[kind] += each
                med = {k: statistics.median(v) for k, v in rates.items()}
                stream = {k: statistics.median(v) for k, v in per_stream.items()}
                row = {"free_tok_s": round(med["free"], 2), "free_stream_decode_tok_s": round(stream["free"], 2)}
                for kind in list(VARIANTS)[1:]:
                    row[f"{kind}_tok_s"] = round(med[kind], 2)
                    row[f"{kind}_stream_decode_tok_s"] = round(stream[kind], 2)
                    # the constraint's cost keeps its old key, so earlier reports still render
                    row["overhead" if kind == "constrained" else f"{kind}_overhead"] = \
                        round(stream["free"] / stream[kind] - 1, 4)
                report["served"][str(c)] = row
            report["prompt_tokens"] = dict(PROMPT_TOKENS)
    tok = open_tokenizer(art)
    t0 = time.perf_counter()
    grammars = Grammars(tok)
    report["vocabulary_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    report["compile_ms"] = {}
    for name, schema in SCHEMAS.items():
        t0 = time.perf_counter()
        grammars.check(json.dumps({"type": "json_schema", "schema": schema}))
        report["compile_ms"][name] = round((time.perf_counter() - t0) * 1e3, 2)
    from edgevlm.runtime.tools import parse_tools
    tools = parse_tools(json.dumps([CAPTION_TOOL]), "caption", None)
    report["mask_us_per_token"] = _mask_us(grammars.constraint(json.dumps({"type": "json_schema", "schema": CAPTION})),
                                           tok)
    report["tools_mask_us_per_token"] = _mask_us(grammars.constraint(None, tools.grammar()), tok)
    return report


def _mask_us(c, tok) -> float:
    """The mask alone, in process, over a caption's string: median µs per token."""
    import numpy as np
    rng = np.random.default_rng(0)
    times = []
    for _ in range(200):
        logits = rng.standard_normal(tok.vocab_size).astype(np.float32)
        t0 = time.perf_counter()
        masked = c.mask(logits)
        times.append(time.perf_counter() - t0)
        k = int(np.argmax(masked))
        if k == tok.eos_id or c.complete:
            break
        c.consume(k)
    return round(statistics.median(times) * 1e6, 1)


def markdown(name: str, r: dict) -> list[str]:
    out = [f"### {name}", "",
           f"\"{PROMPT}\", up to {r['tokens']} tokens per request, greedy; constrained: a JSON schema with one "
           f"string field (`{json.dumps(r['schema'])}`). Per-stream decode tok/s is the server's (tokens after the "
           f"first / decode time); aggregate = all tokens / wall time of a round. {r['runs']} rounds each, "
           "free and constrained interleaved, medians.", "",
           "| streams | per-stream decode tok/s: free | constrained | mask overhead | aggregate tok/s: free / constrained |",
           "|---|---|---|---|---|"]
    for c, v in r["served"].items():
        out.append(f"| {c} | {v['free_stream_decode_tok_s']:.2f} | {v['constrained_stream_decode_tok_s']:.2f} | "
                   f"{100 * v['overhead']:+.1f} % | {v['free_tok_s']:.2f} / {v['constrained_tok_s']:.2f} |")
    if all("logprobs_overhead" in v for v in r["served"].values()):
        out += ["", "The other per-token options, the same requests (logprobs: 5 alternatives per token; tools: a "
                "call of one function whose parameters are that schema; its prompt is longer, the function's "
                "description joining the system line, and the prefix cache, on as served, prefills it once)."
                + (f" Prompts: free {r['prompt_tokens']['free']} tokens, tools {r['prompt_tokens']['tools']}: a "
                   "longer context, which each decode step reads; the tools grammar's mask itself takes "
                   f"{r['tools_mask_us_per_token']:.0f} µs per token in process (the schema's: "
                   f"{r['mask_us_per_token']:.0f} µs)." if "tools_mask_us_per_token" in r else ""), "",
                "| streams | per-stream decode tok/s: logprobs | cost | tools | cost vs free text |", "|---|---|---|---|---|"]
        for c, v in r["served"].items():
            out.append(f"| {c} | {v['logprobs_stream_decode_tok_s']:.2f} | {100 * v['logprobs_overhead']:+.1f} % | "
                       f"{v['tools_stream_decode_tok_s']:.2f} | {100 * v['tools_overhead']:+.1f} % |")
    out += ["", f"The mask alone: {r['mask_us_per_token']:.0f} µs per token (in process). One-off costs: the "
            f"vocabulary {r['vocabulary_ms']:.0f} ms per model; compiling a schema "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in r["compile_ms"].items()) + " (then cached). Goal: overhead "
            "< 5 %.", ""]
    return out
