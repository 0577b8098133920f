"""Export a MobileVLM, LLaVA or Llama-3.2-Vision checkpoint to ONNX graphs + manifest.

    python build/export_onnx.py --checkpoint DIR --out artifacts/NAME/onnx [--clip CLIP_DIR]
"""

from __future__ import annotations

import argparse
import sys

from edgevlm.model.checkpoint import CheckpointError
from edgevlm.export.cleanup import GraphError
from edgevlm.export.graphs import export_onnx
from edgevlm.export.mllama_graphs import export_mllama
from edgevlm.model.mllama_checkpoint import checkpoint_is_mllama


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="MobileVLM, LLaVA or Llama-3.2-Vision checkpoint directory")
    ap.add_argument("--out", required=True, help="output directory (replaced when done)")
    ap.add_argument("--clip", default=None,
                    help="local openai/clip-vit-large-patch14-336 directory (MobileVLM V1 and LLaVA-1.5 "
                         "use it upstream; a LLaVA-1.5 checkpoint needs it)")
    ap.add_argument("--weights", default="auto", choices=["auto", "fp32", "half"],
                    help="half: the decoder's projections stored 16-bit, for models whose FP32 weights "
                         "do not fit in memory (auto: when they would not)")
    args = ap.parse_args(argv)
    try:
        if checkpoint_is_mllama(args.checkpoint):
            if args.clip:
                raise ValueError("--clip is for MobileVLM and LLaVA checkpoints")
            export_mllama(args.checkpoint, args.out, log=lambda m: print(m, flush=True), weights=args.weights)
            return 0
        export_onnx(args.checkpoint, args.out, clip_dir=args.clip, log=lambda m: print(m, flush=True),
                    weights=args.weights)
    except (CheckpointError, GraphError, ValueError) as e:
        print(f"onnx: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
