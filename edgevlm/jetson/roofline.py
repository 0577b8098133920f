"""The decode ceiling and ideal compute times of a model on an Orin module, from the
module's peak DRAM bandwidth and dense tensor throughput (no device needed).

Decode at batch 1 reads every weight once per token plus the KV cache, so
tok/s <= bandwidth / bytes per token. How much KV a step moves depends on the cache layout:
    ideal   the positions so far, once (a length-aware in-place kernel)
    concat  decoder.onnx: the past is read and written again into the present, which
            attention then reads: about 3x the positions so far
    static  decoder.static.onnx: written in place, but attention reads all MAX_CONTEXT slots
So static costs more than concat while the context is under a third of MAX_CONTEXT: pick
MAX_CONTEXT for the conversations you serve, more so at INT4 where weights are few bytes. Image encode and prefill are compute-bound:
ideal time = FLOPs / dense peak. Measured figures are printed beside these by
`make jetson-bench`; good systems reach 50-80 % of the decode ceiling.

    python -m edgevlm.jetson.roofline --module agx-orin-64gb --preset mobilevlm-v2-1.7b
    python -m edgevlm.jetson.roofline --module orin-nano-8gb --batch     # ceiling vs batch size

With continuous batching a step of B rows reads the weights once: aggregate tok/s grows
almost B-fold until the step's FLOPs catch up with its bytes (--batch prints where).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from edgevlm.presets import PRESETS, ModelConfig

# Peak DRAM GB/s, dense FP16 and INT8 tensor TFLOPS at the mode's GPU clock (NVIDIA's module
# specs; dense = SM x f x 2048 FP16 / 4096 INT8 per clock, which reproduces NVIDIA's figures).
MODULES = {
    "agx-orin-64gb": {"MAXN": (204.8, 42.6, 85.3)},
    "agx-orin-32gb": {"MAXN": (204.8, 26.7, 53.3)},
    "orin-nx-16gb": {"MAXN": (102.4, 15.0, 30.1), "MAXN_SUPER": (102.4, 19.2, 38.4)},
    "orin-nx-8gb": {"MAXN": (102.4, 12.5, 25.1), "MAXN_SUPER": (102.4, 19.2, 38.4)},
    "orin-nano-8gb": {"15W": (68.3, 10.2, 20.5), "25W": (102.4, 15.0, 30.1), "MAXN_SUPER": (102.4, 16.7, 33.4)},
    "orin-nano-4gb": {"10W": (34.1, 5.0, 10.0), "MAXN_SUPER": (51.2, 8.4, 16.7)},
}
WEIGHT_BYTES = {"fp16": 2.0, "int8": 1.0, "int4": 0.5 + 2.0 / 128}  # int4: + one FP16 scale per block of 128
KV_LAYOUTS = ("ideal", "concat", "static")


@dataclass
class Roofline:
    module: str
    mode: str
    preset: str
    precision: str
    context: int
    kv_cache: str
    decoder_gb: float
    kv_mb: float
    decode_tok_s: float
    image_encode_ms: float
    prefill_ms: float
    prefill_tokens: int

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def decoder_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters in the transformer layers and lm_head, parameters of the embedding table).
    The embedding table is read one row per token, so it does not count per token."""
    t = cfg.text
    kv = t.num_kv_heads * t.head_dim
    per_layer = t.hidden_size * (t.hidden_size + 2 * kv) + t.hidden_size * t.hidden_size \
        + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size
    return t.num_layers * per_layer + t.vocab_size * t.hidden_size + t.hidden_size, t.vocab_size * t.hidden_size


def vision_flops(cfg: ModelConfig) -> float:
    """CLIP ViT forward up to the layer the projector reads: 2 FLOPs per multiply-add."""
    v = cfg.vision
    n = v.num_patches + 1
    per_layer = 2 * n * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size) + 4 * n * n * v.hidden_size
    return v.layers_used * per_layer + 2 * v.num_patches * 3 * v.patch_size ** 2 * v.hidden_size


def kv_bytes_per_step(cfg: ModelConfig, context: int, kv_cache: str = "ideal", max_context: int | None = None) -> float:
    """FP16 K and V bytes one decode step moves at `context` positions (see the layouts above)."""
    t = cfg.text
    per_position = t.kv_bytes_per_position(2)
    if kv_cache == "ideal":
        return per_position * context
    if kv_cache == "concat":
        return per_position * 3 * context
    if kv_cache == "static":
        return per_position * (max_context or t.max_position)
    raise ValueError(f"kv_cache must be one of {', '.join(KV_LAYOUTS)}")


def roofline(module: str, preset: str, precision: str = "fp16", mode: str | None = None,
             context: int = 512, prompt_tokens: int = 56, kv_cache: str = "ideal",
             max_context: int | None = None) -> Roofline:
    if module not in MODULES:
        raise ValueError(f"unknown module {module!r}; known: {', '.join(MODULES)}")
    modes = MODULES[module]
    mode = mode or next(iter(modes))
    if mode not in modes:
        raise ValueError(f"{module}: no figures for mode {mode!r}; known: {', '.join(modes)}")
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision must be one of {', '.join(WEIGHT_BYTES)}")
    cfg = PRESETS[preset]
    bw, fp16_tflops, int8_tops = modes[mode]
    streamed, _embed = decoder_params(cfg)
    weights_b = streamed * WEIGHT_BYTES[precision]
    kv_b = kv_bytes_per_step(cfg, context, kv_cache, max_context)
    peak = fp16_tflops * 1e12 if precision == "fp16" else int8_tops * 1e12 / 2  # weight-only: FP16 math
    prefill_n = cfg.image_tokens + prompt_tokens
    return Roofline(module=module, mode=mode, preset=preset, precision=precision, context=context,
                    kv_cache=kv_cache, decoder_gb=weights_b / 1e9, kv_mb=kv_b / 1e6, decode_tok_s=bw * 1e9 / (weights_b + kv_b),
                    image_encode_ms=vision_flops(cfg) / (fp16_tflops * 1e12) * 1e3,
                    prefill_ms=2 * streamed * prefill_n / peak * 1e3, prefill_tokens=prefill_n)


BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass
class BatchPoint:
    batch: int
    step_ms: float  # the longer of the step's memory time and its compute time
    memory_ms: float
    compute_ms: float
    aggregate_tok_s: float
    bound: str  # "memory" or "compute"


def batch_ceiling(module: str, preset: str, precision: str = "fp16", mode: str | None = None,
                  context: int = 512, kv_cache: str = "ideal", max_context: int | None = None,
                  batches=BATCHES) -> tuple[list[BatchPoint], float]:
    """Decode ceiling against batch size: a step of B rows reads the weights once and each
    row's KV, and does 2 x params x B FLOPs. Returns the points and the batch where compute
    catches up with memory (inf if it never does): past it, more rows stop being free."""
    r = roofline(module, preset, precision, mode, context, kv_cache=kv_cache, max_context=max_context)
    bw, fp16_tflops, int8_tops = MODULES[module][r.mode]
    peak = fp16_tflops * 1e12 if precision == "fp16" else int8_tops * 1e12 / 2
    streamed, _ = decoder_params(PRESETS[preset])
    weights_b, kv_b = r.decoder_gb * 1e9, r.kv_mb * 1e6
    points = []
    for b in batches:
        mem = (weights_b + b * kv_b) / (bw * 1e9)
        comp = 2 * streamed * b / peak
        step = max(mem, comp)
        points.append(BatchPoint(b, step * 1e3, mem * 1e3, comp * 1e3, b / step, "memory" if mem >= comp else "compute"))
    per_row = 2 * streamed / peak - kv_b / (bw * 1e9)  # each row's compute beyond its own KV traffic
    knee = weights_b / (bw * 1e9) / per_row if per_row > 0 else float("inf")
    return points, knee


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Decode ceiling and ideal compute times on an Orin module.")
    ap.add_argument("--module", default="agx-orin-64gb", choices=sorted(MODULES))
    ap.add_argument("--mode", help="power mode with its own figures (default: the module's first)")
    ap.add_argument("--preset", default="mobilevlm-v2-1.7b", choices=sorted(PRESETS))
    ap.add_argument("--precision", default=None, choices=sorted(WEIGHT_BYTES), help="default: all")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--kv-cache", default="ideal", choices=KV_LAYOUTS, help="KV traffic per step (see above)")
    ap.add_argument("--max-context", type=int, help="the static cache's capacity (default: the model's)")
    ap.add_argument("--batch", action="store_true",
                    help="the decode ceiling against batch size (continuous batching) instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.batch:
        return _print_batches(args)
    try:
        rows = [roofline(args.module, args.preset, p, args.mode, args.context, kv_cache=args.kv_cache,
                         max_context=args.max_context)
                for p in ([args.precision] if args.precision else list(WEIGHT_BYTES))]
    except ValueError as e:
        print(f"roofline: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    for r in rows:
        print(f"{r.module} {r.mode} | {r.preset} {r.precision}: decoder {r.decoder_gb:.2f} GB + KV {r.kv_mb:.0f} MB "
              f"({r.kv_cache}) @{r.context} -> decode <= {r.decode_tok_s:.0f} tok/s | image encode >= {r.image_encode_ms:.1f} ms | "
              f"prefill {r.prefill_tokens} tokens >= {r.prefill_ms:.1f} ms")
    return 0


def _print_batches(args) -> int:
    out = []
    try:
        for p in ([args.precision] if args.precision else list(WEIGHT_BYTES)):
            points, knee = batch_ceiling(args.module, args.preset, p, args.mode, args.context, args.kv_cache,
                                         args.max_context)
            out.append((p, points, knee))
    except ValueError as e:
        print(f"roofline: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"precision": p, "memory_bound_up_to_batch": round(k, 1),
                           "points": [pt.__dict__ for pt in pts]} for p, pts, k in out], indent=2))
        return 0
    for p, points, knee in out:
        bound = (f"memory-bound up to batch {knee:.0f}" if knee != float("inf") else
                 "memory-bound at every batch (each row's KV costs more time than its FLOPs)")
        print(f"{args.module} | {args.preset} {p} @{args.context} ({args.kv_cache} KV): {bound}")
        for pt in points:
            print(f"  batch {pt.batch:>3}: step >= {pt.step_ms:6.2f} ms ({pt.bound}), aggregate <= "
                  f"{pt.aggregate_tok_s:7.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
