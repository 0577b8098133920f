"""Write a random-weight MobileVLM checkpoint in the upstream layout (no model hub needed).

    python build/make_checkpoint.py --preset tiny --out artifacts/tiny/checkpoint
"""

from __future__ import annotations

import argparse
import sys
import time

from edgevlm.presets import PRESETS, get_preset
from edgevlm.model.random_weights import write_random_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", default="bin", choices=["bin", "safetensors"])
    ap.add_argument("--shard-gb", type=float, default=None, help="split weights into shards")
    args = ap.parse_args(argv)
    cfg = get_preset(args.preset)
    t0 = time.monotonic()
    print(f"checkpoint: writing random {cfg.name} ({cfg.version}) to {args.out}", flush=True)
    shard = int(args.shard_gb * 1e9) if args.shard_gb else None
    write_random_checkpoint(args.out, cfg, seed=args.seed, fmt=args.format, shard_bytes=shard)
    print(f"checkpoint: done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
