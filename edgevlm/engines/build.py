"""ONNX -> TensorRT engines on the device (`make engines`).

Written against the TensorRT Python API of the JetPack releases we target: 8.6 (JetPack 6.0),
10.3 (JetPack 6.1/6.2) and 10.15+ (JetPack 7.2), and 11.x; what differs between them is decided in
`Features`, nothing else branches on versions. Imported only where `tensorrt` exists.

    TensorRT 10 and 11: strongly typed networks, the graph's own types decide. fp16 builds from
                the FP16 export (`make quantize PRECISION=fp16`: FP16 weights and activations,
                norms / softmax / lm_head FP32 in the graph), int8 / int4 from their Q/DQ
                exports. TensorRT 11 has nothing else: its BuilderFlag has no FP16 or INT8.
    TensorRT 8.x: weakly typed, from the FP32 graph (fp16) or the Q/DQ export (int8) with
                precision flags, RMSNorm / LayerNorm reductions pinned to FP32
                (OBEY_PRECISION_CONSTRAINTS), FP16 KV cache IO. INT4 needs 10.

KV cache layout of the decoder engine:
    concat      decoder.onnx, every TensorRT: past in, past + new out (two buffers in turn)
    static      decoder.static.onnx, TensorRT >= 10.15: its TensorScatter becomes KVCacheUpdate,
                whose output aliases the cache input (updated in place, fixed shapes). The
                build checks the engine really aliases each present_* to its past_*.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from edgevlm.engines.features import Features, requires
from edgevlm.engines.profiles import Profile


class BuildError(RuntimeError):
    pass


def _network(trt, builder, features: Features):
    flags = 0
    if features.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if features.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def _parse(trt, network, logger, onnx_path: Path, pinned: dict[str, int] | None = None):
    """Parse into `network`; returns the parser, which owns the weights the network points at
    and so must live until the engine is built."""
    parser = trt.OnnxParser(network, logger)
    if pinned:  # fix symbolic dims first; `path` lets the parser find the external weights
        import onnx

        from edgevlm.export.cleanup import pin_dims
        model = pin_dims(onnx.load(str(onnx_path), load_external_data=False), pinned)
        ok = parser.parse(model.SerializeToString(), str(onnx_path))
    else:
        ok = parser.parse_from_file(str(onnx_path))  # external weights are found beside the file
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"{onnx_path.name}: the ONNX parser refused the graph:\n  " + "\n  ".join(errors))
    return parser


@requires("weak_typing")
def _pin_norms_fp32(trt, network) -> int:
    """Under FP16, keep the reductions of RMSNorm/LayerNorm (and the pow/sqrt/reciprocal around
    them) in FP32: their sums of squares overflow or lose precision in FP16."""
    reductions = {trt.LayerType.REDUCE, getattr(trt.LayerType, "NORMALIZATION", trt.LayerType.REDUCE)}  # 8.6+
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer  # get_layer gives the base class; its op needs the subclass
            norm = layer.op in (trt.UnaryOperation.SQRT, trt.UnaryOperation.RECIP)
        elif layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            norm = layer.op == trt.ElementWiseOperation.POW
        else:
            norm = layer.type in reductions
        if norm:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


@requires("weak_typing")
def _half_kv_io(trt, network) -> None:
    """The KV cache crosses the engine boundary every step: keep it FP16 (half the memory and
    bandwidth of the FP32 the ONNX declares). The runner follows the engine's tensor types."""
    for tensors in ([network.get_input(i) for i in range(network.num_inputs)],
                    [network.get_output(i) for i in range(network.num_outputs)]):
        for t in tensors:
            if t.name.startswith(("past_", "present_")):
                t.dtype = trt.float16


@requires("inplace_kv")
def _check_inplace(trt, plan, logger) -> None:
    """Every present_* of a static-cache engine must alias its past_* (the runner binds both
    to one buffer; without aliasing that would be a race, not an update)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    wrong = [n for n in names if n.startswith("present_")
             and engine.get_aliased_input_tensor(n) != n.replace("present_", "past_", 1)]
    if wrong:
        raise BuildError(f"TensorRT {trt.__version__} did not update the KV cache in place "
                         f"({wrong[0]} is not aliased to its past_ input); build with KV=concat")


def build_engine(onnx_path: Path, plan_path: Path, profiles: list[Profile], precision: str, *,
                 timing_cache: Path, workspace_gib: float = 2.0, optimization_level: int = 3,
                 pinned: dict[str, int] | None = None, kv_cache: str | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Build one engine; returns what the manifest records about it. kv_cache="static" for
    decoder.static.onnx (its `pinned` dims fixed first), "concat" for decoder.onnx."""
    import tensorrt as trt

    features = Features.of(trt)
    if precision == "int4" and not features.int4:
        raise BuildError(f"INT4 weight-only needs TensorRT 10 (JetPack 6.1+); this is {trt.__version__}")
    if kv_cache == "static" and not features.inplace_kv:
        raise BuildError(f"the static KV cache needs TensorRT 10.15+ (KVCacheUpdate); this is "
                         f"{trt.__version__}: build with KV=concat")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = features.strongly_typed
    network = _network(trt, builder, features)
    parser = _parse(trt, network, logger, onnx_path, pinned)
    dynamic = {network.get_input(i).name for i in range(network.num_inputs)
               if -1 in tuple(network.get_input(i).shape)}  # profiles cover only these
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if features.profile_sharing_flag:  # 8.6: several sequences' contexts share the two profiles
        config.set_preview_feature(trt.PreviewFeature.PROFILE_SHARING_0806, True)
    if features.optimization_level:
        config.builder_optimization_level = optimization_level
    pinned = 0
    if not strongly_typed:  # 8.x; precision flags are an error on a strongly typed network
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        pinned = _pin_norms_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _half_kv_io(trt, network)
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            if name in dynamic:
                profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    log(f"engines: building {plan_path.name} ({precision}, {'strongly typed' if strongly_typed else 'FP16 flags'}"
        f"{f', {pinned} norm layers pinned FP32' if pinned else ''}, profiles {', '.join(p.name for p in profiles)}); "
        "this takes minutes on an Orin")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{onnx_path.name}: TensorRT could not build an engine (see its log above)")
    timing = config.get_timing_cache().serialize()
    # Free the builder's memory (network, weights, tactics) before the engine is deserialized
    # for its check: on an 8 or 16 GB Orin both at once do not fit.
    del network, config, builder, parser
    plan_path.write_bytes(plan)
    timing_cache.write_bytes(timing)
    if kv_cache == "static":
        del plan
        _check_inplace(trt, plan_path.read_bytes(), logger)
    seconds = time.perf_counter() - t0
    log(f"engines: {plan_path.name} {plan_path.stat().st_size / 2**20:.0f} MiB in {seconds:.0f} s")
    return {"file": plan_path.name, "precision": precision, "strongly_typed": strongly_typed,
            **({"kv_cache": kv_cache} if kv_cache else {}),
            "norm_layers_fp32": pinned, "build_seconds": round(seconds, 1),
            "profiles": [{"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in p.shapes.items()}}
                         for p in profiles]}
