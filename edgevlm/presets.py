"""Model dimensions: the released MobileVLM and LLaVA checkpoints plus toy-sized twins for tests.

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
MLP2X_GELU = "mlp2x_gelu"  # LLaVA-1.5 / 1.6: Linear, GELU, Linear over every patch

# How an image becomes the tower's input ("image_aspect_ratio"; "crop" is llava-hf 1.5's
# processor, which has no pad step).
PAD, CROP, ANYRES = "pad", "crop", "anyres"
ASPECTS = (PAD, CROP, ANYRES)
# LLaVA-1.6's tiling grids, each (height, width) in pixels: the reading llava-hf uses (the
# original code reads them as (width, height); the set is symmetric, so the two differ only on
# ties, and we pin the llava-hf one: tests/test_llava.py).
PINPOINTS_1_6 = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

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

    def kv_bytes_per_position(self, itemsize: int) -> int:
        """KV cache bytes one position takes: a key and a value per layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class ModelConfig:
    name: str
    projector_type: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_aspect: str = PAD
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # anyres only, (height, width) pixels
    template: str = "vicuna_v1"  # runtime/prompt.py TEMPLATES

    @property
    def family(self) -> str:
        return "llava" if self.projector_type == MLP2X_GELU else "mobilevlm"

    @property
    def version(self) -> str:
        if self.family == "llava":
            return "1.6" if self.image_aspect == ANYRES else "1.5"
        return "v2" if self.projector_type.startswith(LDPV2) else "v1"

    @property
    def image_tokens(self) -> int:
        """Tokens one image (one tile, for anyres) becomes."""
        if self.family == "llava":  # the MLP keeps every patch
            return self.vision.grid ** 2
        # Both LDP projectors halve the patch grid on each side (stride-2 conv or 2x2 pool).
        return (self.vision.grid // 2) ** 2

    @property
    def max_image_tokens(self) -> int:
        """The most tokens one image can take: anyres adds its unpadded grid plus a newline
        column to the base tile; the largest grid, unpadded by nothing, is the bound."""
        if self.image_aspect != ANYRES:
            return self.image_tokens
        g, s = self.vision.grid, self.vision.image_size
        return self.image_tokens + max((h // s) * g * ((w // s) * g + 1) for h, w in self.grid_pinpoints)

    def to_dict(self) -> dict:
        return {"name": self.name, "projector_type": self.projector_type,
                "vision": asdict(self.vision), "text": asdict(self.text),
                "image_aspect": self.image_aspect,
                "grid_pinpoints": [list(p) for p in self.grid_pinpoints], "template": self.template}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(name=d["name"], projector_type=d["projector_type"],
                   vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]),
                   image_aspect=d.get("image_aspect", PAD),
                   grid_pinpoints=tuple(tuple(p) for p in d.get("grid_pinpoints", ())),
                   template=d.get("template", "vicuna_v1"))

    def same_shape(self, other: ModelConfig) -> bool:
        return (self.projector_type, self.vision, self.text, self.image_aspect, self.grid_pinpoints) == (
            other.projector_type, other.vision, other.text, other.image_aspect, other.grid_pinpoints)


_LLAMA_1_4B = TextConfig()
# MobileLLaMA-2.7B. The 3B config.json files also carry lit-gpt keys with n_head 16; the
# transformers head count, the one that matches the weights, is 32 (head_dim 80).
_LLAMA_2_7B = TextConfig(hidden_size=2560, intermediate_size=6912, num_layers=32,
                         num_heads=32, num_kv_heads=32)
_VICUNA_7B = TextConfig(hidden_size=4096, intermediate_size=11008, num_layers=32,
                        num_heads=32, num_kv_heads=32, max_position=4096, rms_norm_eps=1e-5)
_VICUNA_13B = replace(_VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_layers=40,
                      num_heads=40, num_kv_heads=40)
# Mistral-7B-Instruct-v0.2 as LLaVA-1.6 ships it: GQA with 8 KV heads, rope theta 1e6. Its own
# positions reach 32768; LLaVA trained and truncates at 4096, so that is the context we build.
_MISTRAL_7B = replace(_VICUNA_7B, intermediate_size=14336, num_kv_heads=8, rope_theta=1e6)

# Toy sizes with the same structure. Vision head_dim stays 64 like every OpenAI CLIP, so the
# head count can be read off the weights; a 112 px image gives an 8x8 grid and 16 image tokens.
_TINY_VISION = VisionConfig(image_size=112, patch_size=14, hidden_size=128,
                            intermediate_size=256, num_layers=3, num_heads=2)
_TINY_TEXT = TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=344, num_layers=2,
                        num_heads=4, num_kv_heads=4, max_position=512)
# LLaVA twins: 64 tokens per 112 px tile; anyres on the 1.6 grids scaled by 112/336, so a
# picture takes 64 + up to 16 x 17 = 336 tokens. The 1.6 twin has the mistral variant's GQA
# and rope theta, so those paths are tested too.
_TINY_LLAVA_TEXT = replace(_TINY_TEXT, max_position=1024, rms_norm_eps=1e-5)
_TINY_LLAVA_NEXT_TEXT = replace(_TINY_LLAVA_TEXT, num_kv_heads=2, rope_theta=1e6)
_TINY_PINPOINTS = tuple((h // 3, w // 3) for h, w in PINPOINTS_1_6)

PRESETS: dict[str, ModelConfig] = {
    "mobilevlm-v2-1.7b": ModelConfig("mobilevlm-v2-1.7b", LDPV2, text=_LLAMA_1_4B),
    "mobilevlm-v2-3b": ModelConfig("mobilevlm-v2-3b", LDPV2, text=_LLAMA_2_7B),
    "mobilevlm-v2-7b": ModelConfig("mobilevlm-v2-7b", LDPV2, text=_VICUNA_7B),
    "mobilevlm-1.7b": ModelConfig("mobilevlm-1.7b", LDP, text=_LLAMA_1_4B),
    "mobilevlm-3b": ModelConfig("mobilevlm-3b", LDP, text=_LLAMA_2_7B),
    "tiny": ModelConfig("tiny", LDPV2, vision=_TINY_VISION, text=_TINY_TEXT),
    "tiny-v1": ModelConfig("tiny-v1", LDP, vision=_TINY_VISION, text=_TINY_TEXT),
    "llava-v1.5-7b": ModelConfig("llava-v1.5-7b", MLP2X_GELU, text=_VICUNA_7B),
    "llava-v1.5-13b": ModelConfig("llava-v1.5-13b", MLP2X_GELU, text=_VICUNA_13B),
    "llava-v1.6-vicuna-7b": ModelConfig("llava-v1.6-vicuna-7b", MLP2X_GELU, text=_VICUNA_7B,
                                        image_aspect=ANYRES, grid_pinpoints=PINPOINTS_1_6,
                                        template="llava_v1"),
    "llava-v1.6-mistral-7b": ModelConfig("llava-v1.6-mistral-7b", MLP2X_GELU, text=_MISTRAL_7B,
                                         image_aspect=ANYRES, grid_pinpoints=PINPOINTS_1_6,
                                         template="mistral_instruct"),
    "tiny-llava-1.5": ModelConfig("tiny-llava-1.5", MLP2X_GELU, vision=_TINY_VISION,
                                  text=_TINY_LLAVA_TEXT),
    "tiny-llava-1.6": ModelConfig("tiny-llava-1.6", MLP2X_GELU, vision=_TINY_VISION,
                                  text=_TINY_LLAVA_NEXT_TEXT, image_aspect=ANYRES,
                                  grid_pinpoints=_TINY_PINPOINTS, template="llava_v1"),
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
