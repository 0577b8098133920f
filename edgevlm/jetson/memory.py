"""Will it fit? Memory to build and to serve a preset at a precision, against the Orin modules.

These are estimates from the model's shapes, not measurements: weights at the precision's
bytes per parameter, the KV cache the runners allocate, and fixed allowances for what is
not the model (JetPack without a desktop, tritonserver and its python stubs, the builder's
tactic workspace). An Orin's CPU and GPU share this one memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.jetson.roofline import WEIGHT_BYTES, decoder_params
from edgevlm.presets import MLLAMA_PRESETS, PRESETS

GIB = 1 << 30
# Total DRAM of each module (the roofline's module names).
MODULE_GIB = {"orin-nano-4gb": 4, "orin-nano-8gb": 8, "orin-nx-8gb": 8, "orin-nx-16gb": 16,
              "agx-orin-32gb": 32, "agx-orin-64gb": 64}
SYSTEM_GIB = 1.0       # JetPack's own use without a desktop (allowance)
SERVER_GIB = 1.5       # tritonserver + two python stubs with numpy, Pillow, the tokenizer (allowance)


def workspace_gib(total_gib: float) -> float:
    """The builder's tactic workspace: an eighth of the module's memory, 0.5 to 2 GiB."""
    return max(0.5, min(2.0, total_gib / 8))


@dataclass(frozen=True)
class Need:
    build_gib: float
    serve_gib: float


def _vision(cfg) -> tuple[int, float]:
    """(the vision side's parameters, bytes each at a quantized precision)."""
    v = cfg.vision
    if cfg.cross_length:  # Llama-3.2-Vision: local + global layers, the tile position tables, the projector
        layers = (v.num_layers + v.num_global_layers) * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
        positions = v.tile_tokens * v.hidden_size * (1 + v.max_num_tiles * (len(v.supported_aspect_ratios) + 1))
        return layers + positions + v.output_dim * cfg.text.hidden_size, 2.0  # kept 16-bit when quantized
    # both quantized LLaVA-family exports carry a W8A8 vision encoder
    return v.layers_used * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size), 1.0


def need(preset: str, precision: str, max_context: int = 2048, sequences: int = 4, total_gib: float = 64) -> Need:
    cfg = PRESETS[preset] if preset in PRESETS else MLLAMA_PRESETS[preset]
    streamed, embed = decoder_params(cfg)
    vision_params, quantized_vision_bytes = _vision(cfg)
    vision_bytes = quantized_vision_bytes if precision in ("int8", "int4") else 2.0
    weights = streamed * WEIGHT_BYTES[precision] + vision_params * vision_bytes
    t = cfg.text
    kv = t.kv_bytes_per_position(2) * max_context * sequences  # FP16 K and V
    # a cross-attention model's rows also hold their image's K/V (FP16), every cross layer's
    kv += sequences * cfg.cross_length * 2 * len(t.cross_attention_layers) * t.num_kv_heads * t.head_dim * 2
    table = embed * 4  # the runtime's FP32 embedding table
    # Building: the parsed network's weights, the engine being written, the workspace.
    build = SYSTEM_GIB * GIB + 2 * weights + workspace_gib(total_gib) * GIB
    serve = (SYSTEM_GIB + SERVER_GIB) * GIB + weights + kv + table
    return Need(build / GIB, serve / GIB)


def smallest_module(preset: str, precision: str, max_context: int = 2048, sequences: int = 4) -> str | None:
    """The smallest module that builds and serves this, by the estimate; None if none does."""
    for module, total in sorted(MODULE_GIB.items(), key=lambda kv: kv[1]):
        n = need(preset, precision, max_context, sequences, total)
        if n.build_gib <= total * 0.9 and n.serve_gib <= total * 0.9:  # 10 % headroom
            return module
    return None
