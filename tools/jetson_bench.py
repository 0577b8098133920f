"""make jetson-bench: the on-device figures, with the roofline beside them.

    python tools/jetson_bench.py --onnx artifacts/mobilevlm-v2-1.7b/onnx [--module agx-orin-64gb] [--runs 5]
                                 [--power-mode MAXN]

Records the power mode and versions, then through the TensorRT runners in this process: image
encode ms, prefill ms, decode tok/s (medians), joules per generated token from tegrastats'
input-power rail, peak RAM; then the scheduler's aggregate decode tok/s with 1, 2, 4 and 8
streams in flight, each beside the roofline's ceiling for that batch. Writes artifacts/bench/jetson-<module>-<mode>.json. Off the
device it refuses in one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is in the image? Describe it in detail."


BATCHES = (1, 2, 4, 8)


def batched_rates(decoder, model, ids, tokens: int, batches=BATCHES) -> dict:
    """Aggregate decode tok/s of the scheduler with B identical text streams in flight, for
    each B (one pool per B, so each runs the engine's decode bucket of that size)."""
    import threading

    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.scheduler import Request, Scheduler
    from edgevlm.runtime.text_model import TextModel, open_tokenizer
    out = {}
    for b in batches:
        pool = decoder.open_pool(b)
        if pool.max_rows < b:
            pool.close()
            break  # the engine's decode profile stops below b (make engines MAX_SEQUENCES=)
        sched = Scheduler(TextModel(model.tok, model.table, pool, model.max_context), max_queue=b)
        done, stats = threading.Semaphore(0), []

        def emit(event):
            if event.final:
                stats.append(event.stats)
                done.release()
        try:
            t0 = time.perf_counter()
            for _ in range(b):
                sched.submit(Request(ids, None, SamplingParams(max_tokens=tokens), emit, lambda e: done.release()))
            for _ in range(b):
                done.acquire()
            wall = time.perf_counter() - t0
        finally:
            sched.close()
            pool.close()  # free this batch size's device KV before the next
        out[str(b)] = {"aggregate_tok_s": round(sum(s.decode_tokens for s in stats) / wall, 2),
                       "decode_tok_s_per_stream": round(statistics.median(s.decode_tokens_per_s for s in stats), 2)}
        print(f"jetson-bench: batch {b}: {out[str(b)]}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    from edgevlm.jetson import device, power, roofline, telemetry
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--module", choices=sorted(roofline.MODULES), help="for the roofline (default: detected)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--power-mode", help="switch to this nvpmodel mode by name first, e.g. MAXN (needs root)")
    args = ap.parse_args(argv)
    try:
        dev = device.detect().require("l4t", "tensorrt", "sm")
        missing = [tool for tool in ("nvpmodel", "tegrastats") if shutil.which(tool) is None]
        if missing:  # inside the Triton container: these are the host's
            raise device.DeviceError(f"no {' or '.join(missing)} here: run it on the host, in the device venv "
                                     "(`make setup` there), not in the container")
        mode = power.set_mode(args.power_mode) if args.power_mode else power.query()
        import tensorrt  # noqa: F401
    except (device.DeviceError, power.PowerError, ImportError) as e:
        print(f"jetson-bench: refused: {e}. It runs on the Orin, after `make engines`", file=sys.stderr)
        return 2
    try:  # before measuring: `jetson_clocks --show` needs root, and its failure must not lose a run
        clocks_locked = power.jetson_clocks(lock=False).locked
    except power.PowerError as e:
        print(f"jetson-bench: clock state unknown ({e})", file=sys.stderr)
        clocks_locked = None

    from edgevlm.runtime.image import preprocess
    from edgevlm.manifest import OnnxArtifacts
    from edgevlm.runtime.prompt import build_prompt, tokenize_prompt
    from edgevlm.samples import sample_image
    from edgevlm.runtime.sampling import SamplingParams
    from edgevlm.runtime.runners import VisionEncoder, open_decoder
    from edgevlm.runtime.scheduler import Scheduler
    from edgevlm.runtime.text_model import TextModel
    from edgevlm.runtime.embedding import EmbeddingTable
    art = OnnxArtifacts.open(args.onnx)
    engines = Path(args.onnx).parent / "engines" / dev.tag
    vision = VisionEncoder(args.onnx, "tensorrt", engines)
    decoder = open_decoder(args.onnx, "tensorrt", engines)
    one = decoder.open_pool(1)
    model = TextModel(open_tokenizer(art), EmbeddingTable(art.path("embed_tokens")), one,
                      min(art.config.text.max_position, decoder.max_context))
    px = preprocess(sample_image("chelsea"), art.config.vision.image_size)[None]
    ids = tokenize_prompt(model.tok, build_prompt(QUESTION))
    vision(px)
    sched = Scheduler(model, max_queue=1)
    list(sched.generate(ids, vision(px)[0], SamplingParams(max_tokens=4)))  # warm-up
    encode, prefill, decode, tokens = [], [], [], 0
    with telemetry.Tegrastats(interval_ms=100) as rec:
        for _ in range(args.runs):
            embeds, ms = vision(px)
            stats = list(sched.generate(ids, embeds, SamplingParams(max_tokens=args.tokens)))[-1].stats
            encode.append(ms)
            prefill.append(stats.prefill_ms)
            decode.append(stats.decode_tokens_per_s)
            tokens += stats.decode_tokens
    tele = rec.summary()
    sched.close()
    built = json.loads((engines / "manifest.json").read_text())
    precision, kv = built["precision"], built.get("kv_cache", "concat")
    # the static pool's one-row decode step is a CUDA graph once it has run (concat: never)
    cuda_graph = kv == "static" and one.steps[1].graph is not None
    one.close()
    batches = batched_rates(decoder, model, ids, args.tokens)
    module = args.module or next((m for m in roofline.MODULES if dev.module and m.replace("-", " ") in
                                  dev.module.lower().replace("jetson ", "")), None)
    report = {
        "device": dev.to_dict(), "power_mode": mode.name, "clocks_locked": clocks_locked,
        "engines": str(engines), "precision": precision, "kv_cache": kv, "decode_cuda_graph": cuda_graph,
        "runs": args.runs,
        "image_encode_ms": round(statistics.median(encode), 2), "prefill_ms": round(statistics.median(prefill), 2),
        "prefill_tokens": stats.prefill_tokens, "decode_tok_s": round(statistics.median(decode), 2),
        "joules_per_token": round(tele["energy_j"] / tokens, 4) if tele.get("energy_j") and tokens else None,
        "peak_ram_used_mb": tele.get("peak_ram_used_mb"), "telemetry": tele,
        "batched_decode": batches,  # the scheduler's aggregate tok/s at batch 1, 2, 4, 8
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if module and mode.name in roofline.MODULES[module]:
        preset = art.config.name if art.config.name in roofline.PRESETS else "mobilevlm-v2-1.7b"
        context = stats.prefill_tokens + args.tokens // 2  # the middle of a measured generation
        r = roofline.roofline(module, preset, precision, mode.name, context=context, kv_cache=kv,
                              max_context=built.get("max_context"))
        report["roofline"] = r.to_dict()  # for the layout the engines use
        report["roofline_ideal_kv"] = roofline.roofline(module, preset, precision, mode.name, context=context).to_dict()
        report["decode_of_ceiling"] = round(report["decode_tok_s"] / r.decode_tok_s, 3)
        points, knee = roofline.batch_ceiling(module, preset, precision, mode.name, context=context, kv_cache=kv,
                                              max_context=built.get("max_context"), batches=BATCHES)
        for p in points:
            if str(p.batch) in batches:
                batches[str(p.batch)]["ceiling_tok_s"] = round(p.aggregate_tok_s, 1)
        report["memory_bound_up_to_batch"] = knee if knee != float("inf") else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"jetson-{module or 'orin'}-{mode.name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    roof = report.get("roofline", {})
    print(f"jetson-bench: {mode.name} {precision} {kv}-KV{' + CUDA graph' if cuda_graph else ''}: image encode {report['image_encode_ms']} ms "
          f"(ideal {roof.get('image_encode_ms', '?')}) | prefill {report['prefill_tokens']} tokens "
          f"{report['prefill_ms']} ms (ideal {roof.get('prefill_ms', '?')}) | decode {report['decode_tok_s']} tok/s "
          f"(ceiling {roof.get('decode_tok_s', '?')}) | {report['joules_per_token']} J/token | peak RAM "
          f"{report['peak_ram_used_mb']} MB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
