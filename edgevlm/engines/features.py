"""What each TensorRT release offers that our code uses, decided in one place.

Nothing else branches on TensorRT versions: the builder and the runners ask `Features`, and a
function that only runs where a feature exists says so with `@requires(...)`. `make trt-api`
(tools/trt_api) evaluates the same gates against the real Python API of every release we claim,
so a name is checked only on the releases whose path reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Features:
    major: int
    strongly_typed: bool          # NetworkDefinitionCreationFlag.STRONGLY_TYPED (10.0+)
    weak_typing: bool             # BuilderFlag.FP16 / INT8 precision flags (gone in 11: strongly typed only)
    explicit_batch_flag: bool     # 8.x must ask for explicit batch; 10.x always is
    optimization_level: bool      # config.builder_optimization_level (8.6+)
    int4: bool                    # INT4 weight-only block DQ (10.0+)
    inplace_kv: bool              # KVCacheUpdate layer + aliased engine IO (10.15+)
    profile_sharing_flag: bool    # 8.6: contexts share a profile only if the engine is built with
                                  # PreviewFeature.PROFILE_SHARING_0806 (10.0+: always; 8.5: never)
    shared_profiles: bool         # several execution contexts may use one optimization profile
    user_managed_memory: bool     # ExecutionContextAllocationStrategy.USER_MANAGED + set_device_memory (10+)

    @classmethod
    def of(cls, trt) -> Features:
        flags = trt.NetworkDefinitionCreationFlag
        major = int(trt.__version__.split(".")[0])
        return cls(major=major, strongly_typed=hasattr(flags, "STRONGLY_TYPED"),
                   weak_typing=hasattr(trt.BuilderFlag, "FP16"),
                   explicit_batch_flag=major < 10,
                   optimization_level=hasattr(trt.IBuilderConfig, "builder_optimization_level"),
                   int4=major >= 10,
                   inplace_kv=hasattr(trt.LayerType, "KV_CACHE_UPDATE")
                   and hasattr(trt.ICudaEngine, "get_aliased_input_tensor"),
                   profile_sharing_flag=major < 10 and hasattr(trt, "PreviewFeature")
                   and hasattr(trt.PreviewFeature, "PROFILE_SHARING_0806"),
                   shared_profiles=major >= 10 or (hasattr(trt, "PreviewFeature")
                                                   and hasattr(trt.PreviewFeature, "PROFILE_SHARING_0806")),
                   user_managed_memory=hasattr(trt, "ExecutionContextAllocationStrategy"))


FLAGS = tuple(f.name for f in fields(Features) if f.name != "major")


def requires(feature: str):
    """Marks a function that runs only where `feature` is true (the caller checks it first).
    At run time it changes nothing; `make trt-api` skips the function on other releases."""
    if feature not in FLAGS:
        raise ValueError(f"unknown TensorRT feature {feature!r}; one of {', '.join(FLAGS)}")

    def mark(fn):
        fn.tensorrt_requires = feature
        return fn
    return mark
