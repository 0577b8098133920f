"""Decoder weights stored in 16 bits, widened to FP32 where they are used: how a model whose FP32
weights do not fit in memory (LLaVA 7B: 27 GB of FP32 on a 24 GiB machine; an 8 or 16 GB Orin
building its engines hits the same wall) is exported, verified and quantized.

The decoder layers' seven projections (and a cross-attention layer's four) keep the checkpoint's own 16-bit type (fp16 for LLaVA's
releases, bf16 for ours: exact either way), stored transposed ([in, out], the MatMul's B) and
followed by a Cast to FP32 in the graph; everything computes in FP32 as in the FP32 graphs. So:
  - export holds 2 bytes per weight, not 4, and no FP32 copy of the model ever exists;
  - ONNX Runtime must not fold those Casts when it loads the graph (that would rebuild the FP32
    weights): runtime/onnxruntime.py reads the manifest's `weights` and keeps them;
  - the quantizers take the 16-bit initializer behind the Cast as the weight.
The embedding table, norms, lm_head and the vision encoder stay FP32: a few percent of a 7B
(Llama-3.2-Vision's exporter writes its table and vision graph before it halves the rest,
so the 11B's 42 GB of FP32 never meet in memory).

The Cast is exported as an `edgevlm` placeholder op, which neither the exporter's optimizer nor
the graph cleanup can fold, and becomes a plain Cast once the graph is clean.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from torch import nn

from edgevlm.export.static_cache import PLACEHOLDER_DOMAIN
from edgevlm.presets import ModelConfig

WIDEN_OP = "Widen"
PLACEHOLDER_OP = (PLACEHOLDER_DOMAIN, WIDEN_OP)
MODES = ("auto", "fp32", "half")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CROSS_PROJECTIONS = ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj")
# auto: half when the FP32 decoder weights would take more than this share of the machine's
# memory (on 24 GiB: the 1.7B stays FP32, a 7B goes half)
AUTO_SHARE = 0.4


@torch.library.custom_op("edgevlm::widen", mutates_args=())
def widen(w: torch.Tensor) -> torch.Tensor:
    return w.float()


@widen.register_fake
def _(w):
    return torch.empty_like(w, dtype=torch.float32)


class HalfLinear(nn.Module):
    """A bias-free Linear whose weight is kept 16-bit and transposed, widened per call."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.wt = nn.Parameter(weight.detach().t().to(dtype).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ widen(self.wt)


def decoder_params(cfg: ModelConfig) -> int:
    t = cfg.text
    kv = t.num_kv_heads * t.head_dim
    return t.num_layers * t.hidden_size * (2 * t.hidden_size + 2 * kv + 3 * t.intermediate_size)


def choose(cfg: ModelConfig, requested: str = "auto") -> str:
    """fp32 or half for this model on this machine."""
    if requested not in MODES:
        raise ValueError(f"unknown weight storage {requested!r}; use one of {', '.join(MODES)}")
    if requested != "auto":
        return requested
    from edgevlm.jetson.device import total_memory_gib
    ram = (total_memory_gib() or 1024) * (1 << 30)
    return "half" if 4 * decoder_params(cfg) > AUTO_SHARE * ram else "fp32"


def half_dtype(tensors) -> torch.dtype:
    """The checkpoint's own 16-bit type (of its decoder's tensors), so storing in it loses
    nothing (fp16 otherwise)."""
    dtype = next(iter(tensors)).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def halve(layers, dtype: torch.dtype) -> None:
    """In place: each decoder layer's projections (PROJECTIONS, and a cross-attention layer's
    own q/k/v/o) become HalfLinear, one tensor at a time, so the peak is the 16-bit model
    plus one FP32 tensor."""
    for layer in layers:
        for path in PROJECTIONS + CROSS_PROJECTIONS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name, None)
            if parent is not None:
                setattr(parent, name, HalfLinear(getattr(parent, name).weight, dtype))


def widen_rest(module: nn.Module) -> None:
    """In place: every parameter not in a HalfLinear becomes FP32."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if not isinstance(m, HalfLinear) and p.dtype != torch.float32:
                setattr(m, name, nn.Parameter(p.detach().float(), requires_grad=False))


def storage_of(manifest: dict) -> str:
    return manifest.get("weights", {}).get("storage", "fp32")


def reference(cfg: ModelConfig, weights, storage: str = "fp32"):
    """The PyTorch reference for an export: FP32, or with the export's 16-bit projections."""
    from edgevlm.model.mobilevlm import MobileVLM
    if storage != "half":
        return MobileVLM.from_weights(cfg, weights)
    model = MobileVLM.from_weights(cfg, weights, dtype=None)
    halve(model.decoder.model.layers, half_dtype(weights.llm.values()))
    widen_rest(model)
    return model


def _register_placeholder() -> None:
    if onnx.defs.has(WIDEN_OP, PLACEHOLDER_DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    onnx.defs.register_schema(onnx.defs.OpSchema(
        WIDEN_OP, PLACEHOLDER_DOMAIN, 1, inputs=[param("w", "T")], outputs=[param("wide", "tensor(float)")],
        type_constraints=[("T", ["tensor(float16)", "tensor(bfloat16)"], "16-bit weight")]))


def _widen(w):
    return onnxscript.values.Opset(PLACEHOLDER_DOMAIN, 1).Widen(w)


def translation_table() -> dict:
    _register_placeholder()
    return {torch.ops.edgevlm.widen.default: _widen}


def to_casts(model: onnx.ModelProto) -> int:
    """In place: the Widen placeholders become Cast(to=FLOAT). Returns how many."""
    n = 0
    for node in model.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type == WIDEN_OP:
            node.domain, node.op_type = "", "Cast"
            node.attribute.append(onnx.helper.make_attribute("to", onnx.TensorProto.FLOAT))
            n += 1
    if not any(node.domain == PLACEHOLDER_DOMAIN for node in model.graph.node):
        kept = [e for e in model.opset_import if e.domain != PLACEHOLDER_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return n
