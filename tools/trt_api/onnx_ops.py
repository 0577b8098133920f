"""Which ONNX operators and opsets each TensorRT release's ONNX parser takes, in one table.

Sources (onnx/onnx-tensorrt): `docs/operators.md` as published for TensorRT 8.5 (opsets up to
17; its full support matrix) and for 10.15 (opsets 9 to 24), the 10.0 edition's header (opsets 9
to 20), the DLA operator page's statement for 8.6 (up to opset 17), and `CHANGELOG.md` for the
operators each release added. No table for 10.3 or 11.x was found: 10.3 is held to 10.0's range
and 8.5's operators plus what the changelog adds up to 10.3; 11.x to 10.15's table.
"""

from __future__ import annotations

from dataclasses import dataclass

# Operators marked Y in the TensorRT 8.5 support matrix.
SUPPORTED_8_5 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GRU HardSwish HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Operators the onnx-tensorrt changelog says each later release added.
ADDED = (
    ((8, 6), ("GroupNormalization", "LayerNormalization", "IsInf")),
    ((9, 2), ("Hardmax",)),
    ((10, 1), ("DeformConv",)),
    ((10, 4), ("BlackmanWindow", "HammingWindow", "HannWindow")),
    ((10, 5), ("STFT",)),
    ((10, 14), ("Attention",)),
    ((10, 15), ("RotaryEmbedding", "RMSNormalization", "TensorScatter")),
)

# (release) -> (lowest opset, highest opset) its parser documents
OPSETS = {(8, 5): (1, 17), (8, 6): (1, 17), (10, 0): (9, 20), (10, 15): (9, 24)}
# INT4 is an opset-21 type; the 10.0 changelog adds INT4 quantization, so 10.x parses INT4
# DequantizeLinear graphs at opset 21 although the 10.0 table's range stops at 20.
INT4_OPSET = 21


@dataclass(frozen=True)
class ParserSupport:
    release: tuple[int, int]
    opsets: tuple[int, int]
    operators: frozenset[str]
    source: str

    def problems(self, opset: int, operators: set[str], int4: bool) -> list[str]:
        out = [f"{op} is not in the ONNX parser's support list" for op in sorted(operators - self.operators)]
        lo, hi = self.opsets
        if not lo <= opset <= hi and not (int4 and opset == INT4_OPSET and self.release >= (10, 0)):
            out.append(f"opset {opset} is outside the documented {lo}..{hi}")
        return out


def support(version: str) -> ParserSupport:
    """What the parser of TensorRT `version` ("10.3.0") takes, from the nearest documented release."""
    release = tuple(int(x) for x in version.split(".")[:2])
    documented = max(r for r in OPSETS if r <= release)
    operators = set(SUPPORTED_8_5)
    for added_in, ops in ADDED:
        if added_in <= release:
            operators.update(ops)
    source = "10.15 table" if documented >= (10, 15) else f"{'.'.join(map(str, documented))} range, 8.5 table + changelog"
    return ParserSupport(release, OPSETS[documented], frozenset(operators), source)
