"""make quantize: an FP16, INT8 or INT4 export from an FP32 export, checked with ONNX Runtime.

    python build/quantize.py --onnx artifacts/tiny/onnx --precision int8 --out artifacts/tiny/onnx-int8

fp16 is what strongly typed TensorRT (10, 11) builds fp16 engines from (export/fp16.py);
int8 / int4 are Q/DQ exports (export/quantize.py) with the cpu target's MatMulNBits form of
the same decoder weights beside them (export/matmul_nbits.py); both are checked against FP32.
A Llama-3.2-Vision export gets its own (export/mllama_quantize.py): fp16 of all four graphs, or
its text decoder weight-only int8 / int4 with FP16 copies beside.
"""

from __future__ import annotations

import argparse
import sys

from edgevlm.manifest import OnnxArtifacts
from edgevlm.export.matmul_nbits import LM_HEAD
from edgevlm.export.quant_check import QuantizationError, QuantReport
from edgevlm.export.fp16 import fp16_export
from edgevlm.export.mllama_quantize import fp16_mllama, quantize_mllama
from edgevlm.export.quantize import PRECISIONS, quantize_export


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="FP32 export directory (make onnx)")
    ap.add_argument("--precision", required=True, choices=("fp16", *PRECISIONS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib-dir", help="calibration photos (default: scikit-image's samples)")
    args = ap.parse_args(argv)
    try:
        if OnnxArtifacts.open(args.onnx).config.cross_length:  # Llama-3.2-Vision
            if args.precision == "fp16":
                reports = {"decoder_static": fp16_mllama(args.onnx, args.out, calib_dir=args.calib_dir)}
            else:
                reports = quantize_mllama(args.onnx, args.out, args.precision, calib_dir=args.calib_dir)
            print(f"quantize: wrote {args.out}")
            for key, r in reports.items():
                print(f"quantize: {key} " + QuantReport(**r).summary(args.precision))
            return 0
        if args.precision == "fp16":
            report = fp16_export(args.onnx, args.out)
        else:
            report = quantize_export(args.onnx, args.out, args.precision, calib_dir=args.calib_dir)
    except (QuantizationError, ValueError, OSError) as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return 1
    print(f"quantize: wrote {args.out}")
    cpu_form = report.pop("cpu_form", None)
    print("quantize: Q/DQ graphs (TensorRT) " + QuantReport(**report).summary(args.precision))
    if cpu_form is not None:
        head_bits, _ = LM_HEAD[4 if args.precision == "int4" else 8]
        print(f"quantize: cpu target (MatMulNBits decoder, {head_bits}-bit lm_head; int8 vision) "
              + QuantReport(**cpu_form).summary(args.precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
