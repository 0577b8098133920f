"""Parity of the exported ONNX graphs with the PyTorch reference, on real photos.

    python build/verify.py --checkpoint DIR --onnx artifacts/NAME/onnx

Exits 1 when an error exceeds the tolerance or a greedy token differs.
"""

from __future__ import annotations

import argparse
import sys

from edgevlm.model.checkpoint import CheckpointError
from edgevlm.manifest import ManifestError, OnnxArtifacts
from edgevlm.export.mllama_parity import run_mllama_parity
from edgevlm.export.parity import run_parity
from edgevlm.samples import SAMPLES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--onnx", required=True, help="directory written by export_onnx.py")
    ap.add_argument("--clip", default=None, help="local CLIP directory (as for the export)")
    ap.add_argument("--images", default=",".join(SAMPLES),
                    help=f"comma-separated sample photos (of {', '.join(SAMPLES)})")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens to compare")
    ap.add_argument("--tol", type=float, default=1e-3,
                    help="max error relative to the compared values' magnitude")
    args = ap.parse_args(argv)
    print(f"verify: PyTorch reference vs ONNX Runtime, {args.onnx}", flush=True)
    try:
        images = [i for i in args.images.split(",") if i]
        log = lambda m: print(m, flush=True)  # noqa: E731
        if OnnxArtifacts.open(args.onnx).config.cross_length:  # Llama-3.2-Vision
            report = run_mllama_parity(args.checkpoint, args.onnx, images, args.tokens, log)
        else:
            report = run_parity(args.checkpoint, args.onnx, clip_dir=args.clip, images=images,
                                new_tokens=args.tokens, log=log)
    except (CheckpointError, ManifestError, KeyError, ValueError) as e:
        print(f"verify: error: {e}", file=sys.stderr)
        return 1
    print(report.summary(args.tol))
    return 0 if report.ok(args.tol) else 1


if __name__ == "__main__":
    sys.exit(main())
