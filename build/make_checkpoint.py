"""Write a random-weight MobileVLM or LLaVA checkpoint in an upstream layout (no model hub needed).

    python build/make_checkpoint.py --preset tiny --out artifacts/tiny/checkpoint
    python build/make_checkpoint.py --preset tiny-llava-1.6 --layout llava-hf --out artifacts/tiny-llava-1.6-hf/checkpoint

A LLaVA-1.5 checkpoint in the original layout is released without its CLIP tower: the tower
is written to a `clip` folder beside it (--clip-out), the stand-in for openai's.
"""

from __future__ import annotations

import argparse
import sys
import time

from edgevlm.presets import PRESETS, get_preset
from edgevlm.model.random_weights import FORMATS, write_random_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", default="bin", choices=["bin", "safetensors"])
    ap.add_argument("--shard-gb", type=float, default=None, help="split weights into shards")
    ap.add_argument("--layout", default="original", choices=FORMATS,
                    help="original (the LLaVA/MobileVLM code's) or llava-hf (transformers')")
    ap.add_argument("--clip-out", default=None, help="LLaVA-1.5 original: where the CLIP tower goes")
    args = ap.parse_args(argv)
    cfg = get_preset(args.preset)
    t0 = time.monotonic()
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
