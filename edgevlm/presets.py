"""Model dimensions: the released MobileVLM checkpoints plus toy-sized twins for tests.

A `ModelConfig` is everything the reference model, the exporter and the serving code need to
know about a checkpoint's shapes. Real checkpoints are read into one by `checkpoint.py`; the
presets here describe the released models so random-weight checkpoints can be written in the
exact upstream layout and so a checkpoint can be named in manifests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# Projector type strings as they appear in config.json ("mm_projector_type").
LDP = "ldpnet"  # MobileVLM V1
LDPV2 = "ldpnetv2"  # MobileVLM V2

# CLIP normalisation constants (preprocessor_config.json of clip-vit-large-patch14-336).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_TOKEN_INDEX = -200  # placeholder id spliced out for the image embeddings


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (defaults: openai/clip-vit-large-patch14-336)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # hidden_states index the projector reads ("mm_vision_select_layer")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def layers_used(self) -> int:
        # hidden_states has num_layers + 1 entries (embeddings first), so index -2 is the
        # output of layer num_layers - 1: the last layer never needs to run.
        return self.num_layers + 1 + self.select_layer


@dataclass(frozen=True)
class TextConfig:
    """LLaMA decoder (defaults: MobileLLaMA-1.4B)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    max_position: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    name: str
    projector_type: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)

    @property
    def version(self) -> str:
        return "v2" if self.projector_type.startswith(LDPV2) else "v1"

    @property
    def image_tokens(self) -> int:
        # Both projectors halve the patch grid on each side (stride-2 conv or 2x2 pool).
        return (self.vision.grid // 2) ** 2

    def to_dict(self) -> dict:
        return {"name": self.name, "projector_type": self.projector_type,
                "vision": asdict(self.vision), "text": asdict(self.text)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(name=d["name"], projector_type=d["projector_type"],
                   vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]))

    def same_shape(self, other: ModelConfig) -> bool:
        return (self.projector_type, self.vision, self.text) == (
            other.projector_type, other.vision, other.text)


_LLAMA_1_4B = TextConfig()
# MobileLLaMA-2.7B. The 3B config.json files also carry lit-gpt keys with n_head 16; the
# transformers head count, the one that matches the weights, is 32 (head_dim 80).
_LLAMA_2_7B = TextConfig(hidden_size=2560, intermediate_size=6912, num_layers=32,
                         num_heads=32, num_kv_heads=32)
_VICUNA_7B = TextConfig(hidden_size=4096, intermediate_size=11008, num_layers=32,
                        num_heads=32, num_kv_heads=32, max_position=4096, rms_norm_eps=1e-5)

# Toy sizes with the same structure. Vision head_dim stays 64 like every OpenAI CLIP, so the
# head count can be read off the weights; a 112 px image gives an 8x8 grid and 16 image tokens.
_TINY_VISION = VisionConfig(image_size=112, patch_size=14, hidden_size=128,
                            intermediate_size=256, num_layers=3, num_heads=2)
_TINY_TEXT = TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=344, num_layers=2,
                        num_heads=4, num_kv_heads=4, max_position=512)

PRESETS: dict[str, ModelConfig] = {
    "mobilevlm-v2-1.7b": ModelConfig("mobilevlm-v2-1.7b", LDPV2, text=_LLAMA_1_4B),
    "mobilevlm-v2-3b": ModelConfig("mobilevlm-v2-3b", LDPV2, text=_LLAMA_2_7B),
    "mobilevlm-v2-7b": ModelConfig("mobilevlm-v2-7b", LDPV2, text=_VICUNA_7B),
    "mobilevlm-1.7b": ModelConfig("mobilevlm-1.7b", LDP, text=_LLAMA_1_4B),
    "mobilevlm-3b": ModelConfig("mobilevlm-3b", LDP, text=_LLAMA_2_7B),
    "tiny": ModelConfig("tiny", LDPV2, vision=_TINY_VISION, text=_TINY_TEXT),
    "tiny-v1": ModelConfig("tiny-v1", LDP, vision=_TINY_VISION, text=_TINY_TEXT),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def match_preset(config: ModelConfig) -> ModelConfig:
    """Return `config` renamed after the preset with the same shapes, if there is one."""
    for preset in PRESETS.values():
        if preset.same_shape(config):
            return replace(config, name=preset.name)
    return config
