"""FP16 copies of exported graphs, written tensor by tensor.

ONNX Runtime's float16 converter decides which tensors become FP16 (everything but the ops it
is told to keep FP32, with Casts at their edges) but works on a model held in memory, several
times over: converting the 1.7B decoder (5.2 GB of FP32 weights) peaked above the 24 GB of
our machines. Given a graph whose weights stay in their external data file, it only flips the
initializers' types; this module then streams each weight from the FP32 file to the new one,
converting the ones it flipped. Peak memory is one tensor (the lm_head, 262 MB at 1.7B).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from edgevlm.export import cleanup

FP16_MAX = 65504.0
ALIGN = 4096  # offsets in the data file (what onnx's own writer uses for large tensors)


def _read(src_dir: Path, t: onnx.TensorProto) -> bytes:
    info = ExternalDataInfo(t)
    with open(src_dir / info.location, "rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length) if info.length else f.read()


def to_fp16(src: Path, dst: Path, *, keep_io_types, op_block_list: list[str], min_opset: int = 0) -> None:
    """Write `dst` (+ `dst.name + ".data"`): the FP16 copy of `src` that ONNX Runtime's
    converter describes, with the weights converted one at a time."""
    from onnxruntime.transformers import float16 as f16
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    if cleanup.opset_of(model) < min_opset:
        model = onnx.version_converter.convert_version(model, min_opset)
    was_float = {t.name for t in model.graph.initializer
                 if t.data_type == onnx.TensorProto.FLOAT and uses_external_data(t)}
    with cleanup._cwd(src.parent):  # the checker looks for the external data file beside the graph
        model = onnx.shape_inference.infer_shapes(model)  # of the graph alone: no weights read
    # The converter reads a converted initializer's values only to learn its shape, which the
    # tensor's dims already say; reading would load the weights we are keeping on disk.
    read_shape = f16.make_value_info_from_tensor
    f16.make_value_info_from_tensor = lambda t: onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        model = f16.convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=op_block_list,
                                             disable_shape_infer=True)
    finally:
        f16.make_value_info_from_tensor = read_shape
    cleanup.toposort_nodes(model)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    data_name = dst.name + ".data"
    offset = 0
    with open(dst.parent / data_name, "wb") if external else _nowhere() as out:
        for t in external:
            raw = _read(src.parent, t)
            if t.name in was_float and t.data_type == onnx.TensorProto.FLOAT16:
                raw = np.clip(np.frombuffer(raw, np.float32), -FP16_MAX, FP16_MAX).astype(np.float16).tobytes()
            pad = (-offset) % ALIGN
            out.write(b"\0" * pad)
            offset += pad
            out.write(raw)
            del t.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
    onnx.save(model, str(dst))


class _nowhere:
    """No external data to write (every weight is inline in the graph)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
