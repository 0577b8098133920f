"""RoPE scaling as a LLaVA config.json spells it, read and written.

transformers 4 writes `rope_scaling: {"type" (or "rope_type"): "linear", "factor": 2.0}`,
transformers 5 `rope_parameters: {"rope_type": "linear", "factor": 2.0, "rope_theta": ...}`;
no scaling is `null`, absent, or rope_type "default". LLaVA-NeXT-Video-7B stretches Vicuna's
positions linearly; any other kind (dynamic, yarn, ...) is refused by name, because a model
read without its scaling answers, wrongly, without an error.
"""

from __future__ import annotations

from edgevlm.model.canonical import CheckpointError


def linear_factor(text_config: dict, where: str = "config.json") -> float:
    """The linear RoPE factor of a (text) config: 1.0 without scaling."""
    spec = text_config.get("rope_scaling") or text_config.get("rope_parameters") or {}
    kind = spec.get("rope_type") or spec.get("type") or "default"
    if kind == "default":
        return 1.0
    if kind != "linear":
        raise CheckpointError(f"{where}: rope scaling {kind!r} is not supported (linear or none)")
    factor = float(spec.get("factor", 1.0))
    if factor < 1.0:
        raise CheckpointError(f"{where}: linear rope scaling factor {factor} is under 1")
    return factor


def rope_scaling_json(factor: float) -> dict | None:
    """`rope_scaling` as transformers 4 writes it (None without scaling)."""
    return None if factor == 1.0 else {"type": "linear", "factor": factor}
