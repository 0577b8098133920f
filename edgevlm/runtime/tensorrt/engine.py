"""Open a folder's engine, checked against this device, and make execution contexts."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from edgevlm.engines.features import Features
from edgevlm.manifest import ManifestError, read_manifest
from edgevlm.runtime.tensorrt.cuda import DeviceBuffer, Stream

if TYPE_CHECKING:  # annotations only: tensorrt is imported where an engine is opened
    import tensorrt as trt

PREFILL, DECODE = 0, 1  # a decoder engine's optimization profiles (engines/profiles.py)


def open_engine(engine_dir: str | Path, name: str) -> tuple[ModuleType, trt.ICudaEngine, dict]:
    """Deserialize <engine_dir>/<name>.plan after checking the folder's manifest against this device."""
    import tensorrt as trt

    from edgevlm.jetson.device import detect
    engine_dir = Path(engine_dir)
    m = read_manifest(engine_dir)
    here = detect().require("tensorrt", "sm").tag
    if m.get("kind") != "tensorrt" or m.get("device_tag") != here:
        raise ManifestError(f"{engine_dir}: engines built for {m.get('device_tag')!r}, this device is {here!r}; "
                            "run `make engines` here")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine((engine_dir / f"{name}.plan").read_bytes())
    if engine is None:
        raise ManifestError(f"{engine_dir / f'{name}.plan'}: TensorRT could not load the engine")
    return trt, engine, m


def np_dtype(trt: ModuleType, engine: trt.ICudaEngine, tensor: str) -> np.dtype:
    return np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))


def shared_contexts(trt: ModuleType, engine: trt.ICudaEngine, features: Features, profiles: list[int],
                    stream: Stream) -> tuple[list[trt.IExecutionContext], DeviceBuffer]:
    """One execution context per entry of `profiles` (that profile selected), all on one
    activation buffer: they run one after another on `stream`, so one buffer serves them all
    instead of TensorRT reserving one per context."""
    if features.user_managed_memory:
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        activations = DeviceBuffer(engine.device_memory_size_v2)
        made = []
        for _ in profiles:
            ctx = engine.create_execution_context(strategy=strategy)
            ctx.set_device_memory(activations.ptr, activations.nbytes)
            made.append(ctx)
    else:
        activations = DeviceBuffer(engine.device_memory_size)
        made = []
        for _ in profiles:
            ctx = engine.create_execution_context_without_device_memory()
            ctx.device_memory = activations.ptr
            made.append(ctx)
    for ctx, profile in zip(made, profiles):
        _select(ctx, profile, stream)
    return made, activations


def _select(ctx: trt.IExecutionContext, profile: int, stream: Stream) -> None:
    # refused, e.g. where a profile may serve one context only: say so now, not as a failed
    # enqueue later
    if not ctx.set_optimization_profile_async(profile, stream.handle):
        raise RuntimeError(f"TensorRT would not give optimization profile {profile} to another execution "
                           "context; serve fewer sequences at once (max_sequences)")
