"""The llava-hf transformers format (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration):
its config.json and key names, mapped to and from the canonical (original LLaVA) layout.

On disk (the hub, and transformers 4.x's save_pretrained): `language_model.model.*`,
`language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.
linear_{1,2}.*` and, for 1.6, a top-level `image_newline`. transformers 4.52+ hold the LM as
`model.language_model.*` in memory, and transformers 5 saves the tower without its
`vision_model.` level; all of these spellings are read. The vocabulary is padded: the
`<image>` and `<pad>` tokens are appended and the table rounded up to a multiple of 64.
"""

from __future__ import annotations

import json

import torch

from edgevlm.model.canonical import (NEWLINE_KEY, PROJECTOR_PREFIX, VISION_PREFIX, CheckpointError,
                                     vision_from_tensors)
from edgevlm.presets import ANYRES, CROP, MLP2X_GELU, ModelConfig, TextConfig, match_preset
from edgevlm.model.rope_scaling import linear_factor, rope_scaling_json
from edgevlm.runtime.prompt import SYSTEM_LLAVA_V1

HF_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                    "LlavaNextVideoForConditionalGeneration")
VISION = VISION_PREFIX + "vision_model."

# (prefix on disk, canonical prefix); the first match wins, so longer spellings come first.
_READ = (
    ("language_model.model.", "model."), ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", VISION), ("vision_tower.vision_model.", VISION),
    ("model.vision_tower.", VISION), ("vision_tower.", VISION),
    ("model.multi_modal_projector.linear_1.", PROJECTOR_PREFIX + "0."),
    ("model.multi_modal_projector.linear_2.", PROJECTOR_PREFIX + "2."),
    ("multi_modal_projector.linear_1.", PROJECTOR_PREFIX + "0."),
    ("multi_modal_projector.linear_2.", PROJECTOR_PREFIX + "2."),
    ("model.image_newline", NEWLINE_KEY), ("image_newline", NEWLINE_KEY),
)
# canonical -> the hub's on-disk spelling (what the random writer produces)
_WRITE = (
    (VISION, "vision_tower.vision_model."), (PROJECTOR_PREFIX + "0.", "multi_modal_projector.linear_1."),
    (PROJECTOR_PREFIX + "2.", "multi_modal_projector.linear_2."), (NEWLINE_KEY, "image_newline"),
    ("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
)


def is_hf_config(raw: dict) -> bool:
    return "text_config" in raw or any(a in HF_ARCHITECTURES for a in raw.get("architectures") or [])


def _rename(key: str, table) -> str | None:
    for src, dst in table:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def canonical_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Disk names -> canonical names; also returns canonical -> disk, for error messages."""
    out, names = {}, {}
    for k, t in tensors.items():
        c = _rename(k, _READ) or k  # an unknown key stays as it is; the layout check names it
        out[c], names[c] = t, k
    return out, names


def hub_name(key: str) -> str:
    """A canonical name as the hub spells it on disk."""
    return _rename(key, _WRITE) or key


def hub_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {hub_name(k): t for k, t in tensors.items()}


def padded_vocab(vocab: int) -> int:
    """llava-hf's table: `<image>` and `<pad>` appended, rounded up to a multiple of 64."""
    return (vocab + 2 + 63) // 64 * 64


def config_from_hf(raw: dict, tensors: dict[str, torch.Tensor], name: str) -> ModelConfig:
    """A llava-hf config.json; the dims come from the weights where config.json leaves them to
    class defaults (the 7b-hf text_config lists almost nothing)."""
    if raw.get("vision_feature_select_strategy", "default") != "default":
        raise CheckpointError("config.json: only vision_feature_select_strategy 'default' (drop CLS) is supported")
    if raw.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"config.json: projector_hidden_act {raw['projector_hidden_act']!r} is not "
                              "supported (expected 'gelu')")
    if not raw.get("multimodal_projector_bias", True):
        raise CheckpointError("config.json: a projector without bias is not supported")
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"config.json: vision_feature_layer {layer!r}: only one layer is supported")
    tc = raw.get("text_config") or {}
    kind = tc.get("model_type", "llama")
    if kind not in ("llama", "mistral"):
        raise CheckpointError(f"config.json: text_config model_type {kind!r} is not supported (llama or mistral)")

    def shape(key):
        if key not in tensors:
            raise CheckpointError(f"missing key {key}")
        return tuple(tensors[key].shape)

    vocab, hidden = shape("model.embed_tokens.weight")
    layers = 0
    while f"model.layers.{layers}.self_attn.q_proj.weight" in tensors:
        layers += 1
    heads = tc.get("num_attention_heads") or 32  # LlamaConfig's and MistralConfig's default
    kv_rows = shape("model.layers.0.self_attn.k_proj.weight")[0]
    rope = tc.get("rope_theta") or (tc.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    # LLaVA trains and truncates at 4096 whatever the LLM's own positions reach.
    max_pos = min(tc.get("max_position_embeddings") or 4096, 4096)
    text = TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=shape("model.layers.0.mlp.gate_proj.weight")[0],
        num_layers=layers, num_heads=heads, num_kv_heads=kv_rows // (hidden // heads), max_position=max_pos,
        rms_norm_eps=tc.get("rms_norm_eps") or 1e-6, rope_theta=float(rope),
        bos_token_id=tc.get("bos_token_id", 1), eos_token_id=tc.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id", tc.get("pad_token_id", 0)) or 0,
        rope_linear_factor=linear_factor(tc, "config.json: text_config"))
    vision = vision_from_tensors(tensors, layer)
    archs = raw.get("architectures") or []
    video = HF_ARCHITECTURES[2] in archs or raw.get("model_type") == "llava_next_video"
    next_ = video or HF_ARCHITECTURES[1] in archs or raw.get("model_type") == "llava_next"
    if next_:
        pinpoints = tuple(tuple(p) for p in raw.get("image_grid_pinpoints") or ())
        if not pinpoints:
            raise CheckpointError("config.json: llava_next without image_grid_pinpoints")
        pool = 0
        if video:
            if raw.get("spatial_pool_mode", "average") != "average":
                raise CheckpointError(f"config.json: spatial_pool_mode {raw['spatial_pool_mode']!r} is not "
                                      "supported (expected 'average')")
            pool = int(raw.get("spatial_pool_stride") or 2)
        cfg = ModelConfig(name, MLP2X_GELU, vision, text, ANYRES, pinpoints, video_pool=pool)
    else:  # llava-hf 1.5's processor is CLIPImageProcessor: centre crop, no pad to square
        cfg = ModelConfig(name, MLP2X_GELU, vision, text, CROP, ())
    return match_preset(cfg)


def hf_config(cfg: ModelConfig) -> dict:
    """config.json as llava-hf writes it (transformers 4.x, the hub's shape)."""
    t, v = cfg.text, cfg.vision
    vocab = padded_vocab(t.vocab_size)
    anyres = cfg.image_aspect == ANYRES
    mistral = cfg.template == "mistral_instruct"
    text = {"model_type": "mistral" if mistral else "llama", "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
            "max_position_embeddings": t.max_position, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "rope_scaling": rope_scaling_json(t.rope_linear_factor),
            "vocab_size": vocab, "torch_dtype": "float16",
            "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"]}
    video = cfg.video_pool > 0  # LLaVA-NeXT-Video: <video> first, then <image>, as its release numbers them
    image_id = t.vocab_size + int(video)
    out = {
        "architectures": [HF_ARCHITECTURES[2] if video else HF_ARCHITECTURES[1] if anyres else HF_ARCHITECTURES[0]],
        "model_type": "llava_next_video" if video else "llava_next" if anyres else "llava",
        "ignore_index": -100, "image_token_index": image_id, "pad_token_id": image_id + 1,
        "projector_hidden_act": "gelu", "vision_feature_layer": v.select_layer,
        "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
        "image_seq_length": cfg.image_tokens, "multimodal_projector_bias": True,
        "text_config": text,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
                          "image_size": v.image_size, "intermediate_size": v.intermediate_size,
                          "num_attention_heads": v.num_heads, "num_hidden_layers": v.num_layers,
                          "patch_size": v.patch_size, "projection_dim": 768, "layer_norm_eps": v.layer_norm_eps,
                          "hidden_act": "quick_gelu", "vocab_size": 32000},
        "torch_dtype": "float16", "vocab_size": vocab,
    }
    if anyres:
        out["image_grid_pinpoints"] = [list(p) for p in cfg.grid_pinpoints]
        out["use_image_newline_parameter"] = True
    if video:
        out.update(video_token_index=t.vocab_size, spatial_pool_mode="average", spatial_pool_stride=cfg.video_pool,
                   video_seq_length=2 * cfg.frame_tokens)
    return out


def added_tokens(cfg: ModelConfig) -> tuple[str, ...]:
    """The tokens llava-hf appends to the LLaMA vocabulary, in id order."""
    return ("<video>", "<image>", "<pad>") if cfg.video_pool else ("<image>", "<pad>")


# Ours, not llava-hf's text: a Jinja chat template in the layout each llava-hf release renders
# (what `apply_chat_template` gives its users), for the random checkpoints. A message's images
# come before its text, "<image>\n" each; content is a string or a list of parts.
_PARTS = """{%- macro parts(content, kind) -%}
{%- if content is string -%}{%- if kind == 'text' -%}{{ content }}{%- endif -%}
{%- else -%}{%- for p in content if p['type'] == kind -%}
{%- if kind == 'image' -%}{{ '<image>\\n' }}{%- elif kind == 'video' -%}{{ '<video>\\n' }}
{%- else -%}{{ p['text'] }}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
"""
# vicuna layout: "<system> USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:"
_VICUNA = _PARTS + """{%- set ns = namespace(system=DEFAULT_SYSTEM) -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set ns.system = parts(messages[0]['content'], 'text') -%}{%- set messages = messages[1:] -%}
{%- endif -%}
{%- if ns.system -%}{{ ns.system + ' ' }}{%- endif -%}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}
{{ 'USER: ' + parts(m['content'], 'image') + parts(m['content'], 'video') + parts(m['content'], 'text') + ' ' }}
{%- elif m['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + parts(m['content'], 'text') + '</s>' }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}
"""
# Mistral's instruct layout: "[INST] <image>\nQ [/INST] A</s>[INST] Q2 [/INST]"
_MISTRAL = _PARTS + """{%- set ns = namespace(system='') -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set ns.system = parts(messages[0]['content'], 'text') + '\\n\\n' -%}{%- set messages = messages[1:] -%}
{%- endif -%}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}
{{ '[INST] ' + (ns.system if loop.first else '') + parts(m['content'], 'image') + parts(m['content'], 'text') + ' [/INST]' }}
{%- elif m['role'] == 'assistant' -%}{{ ' ' + parts(m['content'], 'text') + '</s>' }}
{%- endif -%}
{%- endfor -%}
"""


# chatml (LLaVA-1.6-34B): "<|im_start|>system\n...<|im_end|><|im_start|>user\n<image>\nQ<|im_end|>
# <|im_start|>assistant\n", no newline between blocks
_CHATML = _PARTS + """{%- set ns = namespace(system='Answer the questions.') -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set ns.system = parts(messages[0]['content'], 'text') -%}{%- set messages = messages[1:] -%}
{%- endif -%}
{{ '<|im_start|>system\\n' + ns.system + '<|im_end|>' }}
{%- for m in messages -%}
{{ '<|im_start|>' + m['role'] + '\\n' + parts(m['content'], 'image') + parts(m['content'], 'video')
   + parts(m['content'], 'text') + '<|im_end|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}
"""


def chat_template(cfg: ModelConfig) -> str:
    """The chat template a random llava-hf checkpoint of `cfg` carries (chat_template.json)."""
    if cfg.template == "mistral_instruct":
        return _MISTRAL
    if cfg.template == "chatml_direct":
        return _CHATML
    system = SYSTEM_LLAVA_V1 if cfg.image_aspect == ANYRES else ""  # 1.6 vicuna has one, 1.5 none
    return _VICUNA.replace("DEFAULT_SYSTEM", json.dumps(system))
