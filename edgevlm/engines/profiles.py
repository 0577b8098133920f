"""TensorRT optimization profiles, derived from an export's manifest (its IO shapes with
symbolic dims `batch`, `seq`, `past`) and the context the engines should hold.

    decoder  prefill: batch 1, seq 1..max_prefill, past 0      (one pass over the prompt)
             decode:  batch 1, seq 1,            past 1..max_context-1
    static decoder (decoder.static.onnx, TensorRT >= 10.15): the cache length pinned in the
             graph itself (max_context; KVCacheUpdate wants a static cache); prefill: batch 1,
             seq 1..max_prefill; decode: batch 1..max_sequences, seq 1 (the scheduler's batched
             step; one shape per batch size, each captured as a CUDA graph)
    vision   batch 1..max_batch at the tower's fixed image size
    Llama-3.2-Vision (cross-attention): the vision encoder takes `images` 1..max_batch, each
             with every tile slot (max_tiles x S x S, the unused ones masked); cross_kv turns
             their states into each cross layer's K/V (`images`, `cross` = one image's
             positions, fixed); the decoders take each row's image K/V at that `cross`
             length (a text-only row passes zeros with has_image 0, so one length serves all).

Two decoder profiles let TensorRT pick kernels for each phase; the runner selects the
profile per call. Built here without TensorRT, so the shapes are tested off-device.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.manifest import OnnxArtifacts


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


def _resolve(shape: list, dims: dict[str, tuple[int, int, int]]) -> tuple[tuple[int, ...], ...]:
    out = ([], [], [])
    for d in shape:
        if isinstance(d, int):
            lo = opt = hi = d
        elif d in dims:
            lo, opt, hi = dims[d]
        else:
            raise ProfileError(f"no range for dimension {d!r}")
        for i, v in enumerate((lo, opt, hi)):
            out[i].append(v)
    return tuple(tuple(x) for x in out)


def _profile(name: str, inputs: list[dict], dims: dict[str, tuple[int, int, int]]) -> Profile:
    for lo, opt, hi in dims.values():
        if not 0 <= lo <= opt <= hi:
            raise ProfileError(f"{name}: need 0 <= min <= opt <= max, got {lo}, {opt}, {hi}")
    return Profile(name, {t["name"]: _resolve(t["shape"], dims) for t in inputs})


# Engines hold the model's whole context up to this by default: Llama 3.1's 131072 positions
# would pin gigabytes of cache per sequence on a device that serves a few hundred-token turns.
DEFAULT_CONTEXT = 4096


def _limits(art: OnnxArtifacts, max_context: int | None, max_prefill: int | None) -> tuple[int, int, int]:
    """(positions the engine holds, longest prefill, a typical prompt: an image and a short question)."""
    limit = art.manifest["limits"]["max_context"]
    max_context = max_context or min(limit, DEFAULT_CONTEXT)
    if not 2 <= max_context <= limit:
        raise ProfileError(f"MAX_CONTEXT={max_context}: this model holds 2..{limit} tokens")
    max_prefill = min(max_prefill or max_context - 1, max_context - 1)
    # LLaVA-1.6: a picture's token count varies; the typical prompt takes the largest.
    # A cross-attention model's picture is one <|image|> position in the prompt.
    cfg = art.config
    picture = 1 if cfg.cross_length else cfg.max_image_tokens
    return max_context, max_prefill, min(picture + 56, max_prefill)


def _cross(art: OnnxArtifacts) -> dict[str, tuple[int, int, int]]:
    """The `cross` dimension of a cross-attention model's graphs: one image's positions."""
    n = art.config.cross_length
    return {"cross": (n, n, n)} if n else {}


def decoder_profiles(art: OnnxArtifacts, max_context: int | None = None,
                     max_prefill: int | None = None) -> list[Profile]:
    max_context, max_prefill, typical_prompt = _limits(art, max_context, max_prefill)
    inputs = art.manifest["io"]["decoder"]["inputs"]
    return [
        _profile("prefill", inputs, {"batch": (1, 1, 1), "seq": (1, typical_prompt, max_prefill), "past": (0, 0, 0),
                                     **_cross(art)}),
        _profile("decode", inputs, {"batch": (1, 1, 1), "seq": (1, 1, 1),
                                    "past": (1, min(typical_prompt + 64, max_context - 1), max_context - 1),
                                    **_cross(art)}),
    ]


def static_decoder_profiles(art: OnnxArtifacts, max_context: int | None = None,
                            max_prefill: int | None = None,
                            max_sequences: int = 1) -> tuple[dict[str, int], list[Profile]]:
    """(dims to pin in decoder.static.onnx, its two profiles over the inputs left dynamic).

    The cache length is pinned (KVCacheUpdate wants a static cache). The batch is the number
    of sequences decoded together: prefill runs one sequence (batch 1), decode runs
    1..max_sequences rows at their own positions (the scheduler's batched step)."""
    if "decoder_static" not in art.manifest["io"]:
        raise ProfileError("this export has no decoder.static.onnx (re-run `make onnx`)")
    if max_sequences < 1:
        raise ProfileError(f"max_sequences must be >= 1, got {max_sequences}")
    max_context, max_prefill, typical_prompt = _limits(art, max_context, max_prefill)
    pinned = {"cache": max_context}
    inputs = [t for t in art.manifest["io"]["decoder_static"]["inputs"]
              if any(isinstance(d, str) and d not in pinned for d in t["shape"])]
    fixed = {**{k: (v, v, v) for k, v in pinned.items()}, **_cross(art)}
    return pinned, [_profile("prefill", inputs, {**fixed, "batch": (1, 1, 1), "seq": (1, typical_prompt, max_prefill)}),
                    _profile("decode", inputs, {**fixed, "batch": (1, max_sequences, max_sequences), "seq": (1, 1, 1)})]


def vision_profiles(art: OnnxArtifacts, max_batch: int = 4) -> list[Profile]:
    """Rows are pictures, or for LLaVA-1.6 tiles: one picture is a base tile plus its grid's
    (up to 5 with the released grids), so the profile holds at least one whole picture."""
    if max_batch < 1:
        raise ProfileError(f"max_batch must be >= 1, got {max_batch}")
    cfg = art.config
    inputs = art.manifest["io"]["vision_encoder"]["inputs"]
    if cfg.cross_length:  # a row is a whole picture, every tile slot in it
        return [_profile("images", inputs, {"images": (1, 1, max_batch)})]
    s = cfg.vision.image_size
    per_picture = 1 + max(((h // s) * (w // s) for h, w in cfg.grid_pinpoints), default=0)
    return [_profile("images", inputs, {"batch": (1, per_picture, max(max_batch, per_picture))})]


def cross_kv_profiles(art: OnnxArtifacts, max_batch: int = 4) -> list[Profile]:
    """Llama-3.2-Vision's K/V graph: the pictures of one vision call, each its every position."""
    if not art.config.cross_length:
        raise ProfileError("this export has no cross-attention K/V graph (not a cross-attention model)")
    if max_batch < 1:
        raise ProfileError(f"max_batch must be >= 1, got {max_batch}")
    return [_profile("images", art.manifest["io"]["cross_kv"]["inputs"], {"images": (1, 1, max_batch), **_cross(art)})]
