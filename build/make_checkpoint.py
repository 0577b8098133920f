"""Write a random-weight MobileVLM, LLaVA or Llama-3.2-Vision checkpoint in an upstream layout
(no model hub needed).

    python build/make_checkpoint.py --preset tiny --out artifacts/tiny/checkpoint
    python build/make_checkpoint.py --preset tiny-llava-v1.6 --layout llava-hf --out artifacts/tiny-llava-v1.6-hf/checkpoint
    python build/make_checkpoint.py --preset tiny-mllama --layout transformers5 --out artifacts/tiny-mllama-t5/checkpoint

Llama-3.2-Vision layouts: original (as Meta released it) or transformers5 (the key names
transformers 5 saves).

A LLaVA-1.5 checkpoint in the original layout is released without its CLIP tower: the tower
is written to a `clip` folder beside it (--clip-out), the stand-in for openai's.
"""

from __future__ import annotations

import argparse
import sys
import time

from edgevlm.model.mllama_checkpoint import write_random_mllama
from edgevlm.model.random_weights import FORMATS, write_random_checkpoint
from edgevlm.presets import MLLAMA_PRESETS, PRESETS, get_preset

MLLAMA_LAYOUTS = {"original": "released", "transformers5": "transformers5"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=[*PRESETS, *MLLAMA_PRESETS])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", default="bin", choices=["bin", "safetensors"])
    ap.add_argument("--shard-gb", type=float, default=None, help="split weights into shards")
    ap.add_argument("--layout", default="original", choices=sorted({*FORMATS, *MLLAMA_LAYOUTS}),
                    help="original (as upstream released it), llava-hf (LLaVA in transformers' layout) "
                         "or transformers5 (Llama-3.2-Vision as transformers 5 saves it)")
    ap.add_argument("--clip-out", default=None, help="LLaVA-1.5 original: where the CLIP tower goes")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    if args.preset in MLLAMA_PRESETS:
        if args.layout not in MLLAMA_LAYOUTS:
            print(f"checkpoint: Llama-3.2-Vision layouts are {' or '.join(MLLAMA_LAYOUTS)}", file=sys.stderr)
            return 2
        print(f"checkpoint: writing random {args.preset} (mllama, {args.layout} layout) to {args.out}", flush=True)
        write_random_mllama(args.out, MLLAMA_PRESETS[args.preset], seed=args.seed,
                            spelling=MLLAMA_LAYOUTS[args.layout],
                            shard_bytes=int(args.shard_gb * 1e9) if args.shard_gb else None)
        print(f"checkpoint: done in {time.monotonic() - t0:.1f} s")
        return 0
    if args.layout not in FORMATS:
        print(f"checkpoint: --layout {args.layout} is for Llama-3.2-Vision presets", file=sys.stderr)
        return 2
    cfg = get_preset(args.preset)
    print(f"checkpoint: writing random {cfg.name} ({cfg.family} {cfg.version}, {args.layout} layout) "
          f"to {args.out}", flush=True)
    shard = int(args.shard_gb * 1e9) if args.shard_gb else None
    try:
        write_random_checkpoint(args.out, cfg, seed=args.seed, fmt=args.format, shard_bytes=shard,
                                layout_format=args.layout, clip_out=args.clip_out)
    except ValueError as e:
        print(f"checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint: done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
