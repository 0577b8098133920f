"""make trt-api: our TensorRT code against the real Python bindings of every release we claim
(tools/trt_api; the bindings are downloaded once from PyPI and cached outside the venv)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgevlm.engines.features import Features
from tools.trt_api.bindings import RELEASES, describe
from tools.trt_api.uses import Checker, shadow_module

ROOT = Path(__file__).resolve().parents[1]


def test_our_tensorrt_code_uses_only_names_each_release_has(tiny_family):
    r = subprocess.run([sys.executable, "-m", "tools.trt_api", "--exports", str(tiny_family / "onnx")], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    lines = [line for line in r.stdout.splitlines() if line.startswith("trt-api: TensorRT")]
    assert r.returncode == 0, r.stdout + r.stderr
    assert [line.split()[2] for line in lines] == [rel.version for rel in RELEASES]
    assert all(line.endswith(": OK") and " 0 graphs" not in line for line in lines), r.stdout


def _release(name):
    rel = next(r for r in RELEASES if r.name == name)
    api = describe(rel, log=lambda m: None)
    return api, Features.of(shadow_module(api))


MISUSE = '''
import tensorrt as trt
from edgevlm.engines.features import Features, requires

def build(onnx: bytes):
    features = Features.of(trt)
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    network = builder.create_network(0)
    config = builder.create_builder_config()
    if features.major < 10:
        legacy = builder.build_engine(network, config)   # 8.x only, and only reached there
    plan = builder.build_engine(network, config)         # 8.x only, reached everywhere
    if not features.strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)            # weak typing, reached on 8.x only
    config.set_flag(trt.BuilderFlag.INT8)                # weak typing, reached everywhere
    parser = trt.OnnxParser(network, trt.Logger())
    parser.parse(onnx, path="x.onnx", strict=True)       # no such keyword anywhere
    return plan

@requires("inplace_kv")
def aliased(engine: trt.ICudaEngine) -> str:
    return engine.get_aliased_input_tensor("present_key_0")

def count(engine: trt.ICudaEngine) -> int:
    return engine.num_io_tensors()                        # a property everywhere: not callable
'''


@pytest.mark.parametrize("release,want", [
    ("8.6", {17, 25}),
    ("10.3", {12, 17, 25}),
    ("10.16", {12, 17, 25}),
    ("11.4", {12, 15, 17, 25}),
])
def test_a_misuse_is_caught_on_exactly_the_releases_whose_path_reaches_it(tmp_path, release, want):
    src = tmp_path / "misuse.py"
    src.write_text(MISUSE)
    api, features = _release(release)
    checker = Checker(api, features, release)
    checker.check_file(src, "misuse.py")
    assert {m.line for m in checker.report.misses} == want, [str(m) for m in checker.report.misses]


@pytest.mark.parametrize("release", [r.name for r in RELEASES])
def test_every_graph_make_engines_would_hand_a_release_is_in_its_parsers_list(tiny_family, release):
    from tools.trt_api import graphs
    api, features = _release(release)
    rel = next(r for r in RELEASES if r.name == release)
    handed = graphs.graphs_for(tiny_family / "onnx", features)
    assert ("fp16/static" in handed) == features.inplace_kv and ("int4/concat" in handed) == features.int4
    n, problems = graphs.problems(tiny_family / "onnx", rel.version, features)
    assert n >= 4 and problems == []


def test_the_parser_table_refuses_what_a_release_lacks():
    from tools.trt_api.onnx_ops import support
    assert support("8.5.2").problems(17, {"LayerNormalization", "MatMul"}, int4=False) == [
        "LayerNormalization is not in the ONNX parser's support list"]  # the vision encoder on JetPack 5
    assert support("8.6.1").problems(17, {"LayerNormalization"}, int4=False) == []
    assert support("10.3.0").problems(21, {"MatMul"}, int4=False) == ["opset 21 is outside the documented 9..20"]
    assert support("10.3.0").problems(21, {"DequantizeLinear"}, int4=True) == []  # INT4 needs 21
    assert len(support("10.3.0").problems(24, {"TensorScatter"}, int4=False)) == 2
    assert support("10.16.1").problems(24, {"TensorScatter", "DequantizeLinear"}, int4=False) == []
