"""Render the Triton model repository for a target (cpu: ONNX Runtime; jetson: TensorRT).

    python build/render_repository.py --onnx artifacts/NAME/onnx --out artifacts/NAME/repository
"""

from __future__ import annotations

import argparse
import sys

from edgevlm.manifest import ManifestError
from edgevlm.serve.repository import BATCHING, IMAGE_CACHE_MIB, PREFIX_CACHE_MIB, TARGETS, render_repository
from edgevlm.runtime.runners import KV_CACHES


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="directory written by export_onnx.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default="cpu", choices=TARGETS)
    ap.add_argument("--engines", default=None, help="TensorRT engine directory (jetson target)")
    ap.add_argument("--max-sequences", type=int, default=8, help="streams decoded together (one batched step)")
    ap.add_argument("--max-queue", type=int, default=None,
                    help="requests waiting for a slot before UNAVAILABLE (default: 2 x max-sequences)")
    ap.add_argument("--batching", default="continuous", choices=BATCHING,
                    help="continuous: max-sequences decoded together; off: one sequence at a time")
    ap.add_argument("--prefill-chunk", type=int, default=64,
                    help="prompt positions per prefill call while other streams decode")
    ap.add_argument("--kv-budget-mib", type=int, default=0,
                    help="KV pool (0: max-sequences full contexts, at most a quarter of RAM)")
    ap.add_argument("--prefix-cache-mib", type=int, default=PREFIX_CACHE_MIB,
                    help="KV of earlier sequences kept for prompts that begin the same way (0: off)")
    ap.add_argument("--image-cache-mib", type=int, default=IMAGE_CACHE_MIB,
                    help="image embeddings kept by the image bytes' hash (0: off)")
    ap.add_argument("--max-tokens", type=int, default=256, help="default max_tokens per request")
    ap.add_argument("--kv-cache", default="auto", choices=KV_CACHES,
                    help="cpu target: decoder KV cache layout, default static where the export has it "
                         "(jetson engines record their own)")
    ap.add_argument("--template", default=None,
                    help="prompt template served by default instead of the export's (vicuna_v1, llava_v1, llava_v0, "
                         "mistral_instruct, llava_llama_2, chatml_direct, mpt, or checkpoint: its chat template)")
    args = ap.parse_args(argv)
    try:
        out = render_repository(args.onnx, args.out, args.target, engine_dir=args.engines,
                                max_sequences=args.max_sequences, default_max_tokens=args.max_tokens,
                                kv_cache=args.kv_cache, batching=args.batching, max_queue=args.max_queue,
                                prefill_chunk=args.prefill_chunk, kv_budget_mib=args.kv_budget_mib,
                                prefix_cache_mib=args.prefix_cache_mib, image_cache_mib=args.image_cache_mib,
                                template=args.template)
    except (ManifestError, ValueError) as e:
        print(f"repo: error: {e}", file=sys.stderr)
        return 1
    print(f"repo: {args.target} model repository in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
