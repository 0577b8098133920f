"""The ONNX graphs `make engines` would hand each release, checked against its parser's
operator list and opset range (onnx_ops.py). Which graphs a release gets is decided by the
builder's own functions (build/build_engines.py: the export per precision, the decoder per KV
layout and typing), evaluated with that release's Features."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx

from edgevlm.manifest import ManifestError, OnnxArtifacts
from tools.trt_api.onnx_ops import support

ROOT = Path(__file__).resolve().parents[2]


def _builder_script():
    spec = importlib.util.spec_from_file_location("build_engines", ROOT / "build" / "build_engines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def graphs_for(fp32_dir: Path, features) -> dict[str, list[Path]]:
    """precision/layout -> the graphs that build would parse, for the exports present."""
    be = _builder_script()
    out = {}
    for precision in ("fp16", "int8", "int4"):
        if precision == "int4" and not features.int4:
            continue
        src = be.export_for(Path(fp32_dir), precision, features.strongly_typed)
        try:
            art = OnnxArtifacts.open(src)
        except ManifestError:
            continue  # not exported (yet): nothing to hand over
        layouts = ["concat"] + (["static"] if features.inplace_kv and "decoder_static" in art.manifest["files"] else [])
        for kv in layouts:
            out[f"{precision}/{kv}"] = [*be.image_graphs(art, features.strongly_typed).values(),
                                        be.decoder_onnx(art, kv, features.strongly_typed)]
    return out


def problems(fp32_dir: Path, version: str, features) -> tuple[int, list[str]]:
    """(graphs checked, one line per problem) for TensorRT `version`."""
    parser = support(version)
    found, seen = [], {}
    for what, paths in graphs_for(fp32_dir, features).items():
        for path in paths:
            if path not in seen:
                m = onnx.load(str(path), load_external_data=False)
                opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
                ops = {n.op_type for n in m.graph.node if n.domain in ("", "ai.onnx")}
                int4 = any(t.data_type == onnx.TensorProto.INT4 for t in m.graph.initializer)
                seen[path] = parser.problems(opset, ops, int4)
            found += [f"{path.parent.name}/{path.name} ({what}): {p}" for p in seen[path]]
    return len(seen), sorted(set(found))
