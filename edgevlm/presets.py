"""Model dimensions: the released MobileVLM, LLaVA and Llama-3.2-Vision checkpoints plus
toy-sized twins for tests.

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
    # Llama-3.2-Vision: the layers that are cross-attention (no self-attention, no KV cache of
    # their own), and Llama 3.1's rope scaling (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); none for the other families.
    cross_attention_layers: tuple[int, ...] = ()
    rope_scaling: tuple[float, float, float, int] | None = None
    # linear RoPE scaling (LLaVA-NeXT-Video-7B: 2.0, its context stretched from Vicuna's 4096)
    rope_linear_factor: float = 1.0

    def __post_init__(self):  # JSON gives lists back: keep the config hashable
        object.__setattr__(self, "cross_attention_layers", tuple(self.cross_attention_layers))
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        """The layers with a self-attention KV cache, in order (past_key_<i> is the i-th of them)."""
        return tuple(i for i in range(self.num_layers) if i not in self.cross_attention_layers)

    @property
    def kv_layers(self) -> int:
        return len(self.self_attention_layers)

    def kv_bytes_per_position(self, itemsize: int) -> int:
        """KV cache bytes one position takes: a key and a value per self-attention layer."""
        return 2 * self.kv_layers * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class ModelConfig:
    name: str
    projector_type: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_aspect: str = PAD
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # anyres only, (height, width) pixels
    # runtime/prompt.py TEMPLATES, or "checkpoint" (its own chat template). A preset names what
    # run_llava picks for its name; a checkpoint read from disk gets model/checkpoint.template_for's.
    template: str = "vicuna_v1"
    # LLaVA-NeXT-Video: a clip's frames are pooled on the patch grid with this stride (2: 24x24
    # -> 12x12, 144 tokens per frame) before the projector; 0: no video mode (a clip's frames
    # are read as pictures, runtime/requests.py).
    video_pool: int = 0

    cross_length = 0  # images are spliced into the sequence, not attended to across

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
    def frame_tokens(self) -> int:
        """Tokens one video frame becomes: LLaVA-NeXT-Video's pooled grid; without a video mode,
        a picture's (anyres: its base view's, no tiles)."""
        return (self.vision.grid // self.video_pool) ** 2 if self.video_pool else self.image_tokens

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
                "grid_pinpoints": [list(p) for p in self.grid_pinpoints], "template": self.template,
                "video_pool": self.video_pool}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(name=d["name"], projector_type=d["projector_type"],
                   vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]),
                   image_aspect=d.get("image_aspect", PAD),
                   grid_pinpoints=tuple(tuple(p) for p in d.get("grid_pinpoints", ())),
                   template=d.get("template", "vicuna_v1"), video_pool=d.get("video_pool", 0))

    def same_shape(self, other: ModelConfig) -> bool:
        return (self.projector_type, self.vision, self.text, self.image_aspect, self.grid_pinpoints,
                self.video_pool) == (other.projector_type, other.vision, other.text, other.image_aspect,
                                     other.grid_pinpoints, other.video_pool)


_LLAMA_1_4B = TextConfig()
# MobileLLaMA-2.7B. The 3B config.json files also carry lit-gpt keys with n_head 16; the
# transformers head count, the one that matches the weights, is 32 (head_dim 80).
_LLAMA_2_7B = TextConfig(hidden_size=2560, intermediate_size=6912, num_layers=32,
                         num_heads=32, num_kv_heads=32)
_VICUNA_7B = TextConfig(hidden_size=4096, intermediate_size=11008, num_layers=32,
                        num_heads=32, num_kv_heads=32, max_position=4096, rms_norm_eps=1e-5)
_VICUNA_7B_VIDEO = replace(_VICUNA_7B, rope_linear_factor=2.0)
_VICUNA_13B = replace(_VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_layers=40,
                      num_heads=40, num_kv_heads=40)
# Mistral-7B-Instruct-v0.2 as LLaVA-1.6 ships it: GQA with 8 KV heads, rope theta 1e6. Its own
# positions reach 32768; LLaVA trained and truncates at 4096, so that is the context we build.
_MISTRAL_7B = replace(_VICUNA_7B, intermediate_size=14336, num_kv_heads=8, rope_theta=1e6)
# Nous-Hermes-2-Yi-34B as LLaVA-1.6-34B ships it: 60 layers, GQA with 8 KV heads, rope theta
# 5e6, a 64000-piece vocabulary whose <|im_end|> (id 7) ends a chatml turn.
_YI_34B = TextConfig(vocab_size=64000, hidden_size=7168, intermediate_size=20480, num_layers=60, num_heads=56,
                     num_kv_heads=8, max_position=4096, rms_norm_eps=1e-5, rope_theta=5e6, bos_token_id=1,
                     eos_token_id=7, pad_token_id=0)

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
# Its chatml twin (random tokenizers put <|im_start|> and <|im_end|> at 6 and 7, as Yi's has them).
_TINY_YI_TEXT = replace(_TINY_LLAVA_NEXT_TEXT, rope_theta=5e6, eos_token_id=7)

PRESETS: dict[str, ModelConfig] = {
    "mobilevlm-v2-1.7b": ModelConfig("mobilevlm-v2-1.7b", LDPV2, text=_LLAMA_1_4B),
    "mobilevlm-v2-3b": ModelConfig("mobilevlm-v2-3b", LDPV2, text=_LLAMA_2_7B),
    "mobilevlm-v2-7b": ModelConfig("mobilevlm-v2-7b", LDPV2, text=_VICUNA_7B),
    "mobilevlm-1.7b": ModelConfig("mobilevlm-1.7b", LDP, text=_LLAMA_1_4B),
    "mobilevlm-3b": ModelConfig("mobilevlm-3b", LDP, text=_LLAMA_2_7B),
    "tiny": ModelConfig("tiny", LDPV2, vision=_TINY_VISION, text=_TINY_TEXT),
    "tiny-v1": ModelConfig("tiny-v1", LDP, vision=_TINY_VISION, text=_TINY_TEXT),
    "llava-v1.5-7b": ModelConfig("llava-v1.5-7b", MLP2X_GELU, text=_VICUNA_7B, template="llava_v1"),
    "llava-v1.5-13b": ModelConfig("llava-v1.5-13b", MLP2X_GELU, text=_VICUNA_13B, template="llava_v1"),
    "llava-v1.6-vicuna-7b": ModelConfig("llava-v1.6-vicuna-7b", MLP2X_GELU, text=_VICUNA_7B,
                                        image_aspect=ANYRES, grid_pinpoints=PINPOINTS_1_6,
                                        template="llava_v1"),
    "llava-v1.6-mistral-7b": ModelConfig("llava-v1.6-mistral-7b", MLP2X_GELU, text=_MISTRAL_7B,
                                         image_aspect=ANYRES, grid_pinpoints=PINPOINTS_1_6,
                                         template="mistral_instruct"),
    # LLaVA-NeXT-Video-7B: LLaVA-1.6 vicuna's shape (anyres for still images) plus clips, its
    # positions scaled linearly by 2 (transformers' converter sets it for the 7B, not the 34B)
    "llava-next-video-7b": ModelConfig("llava-next-video-7b", MLP2X_GELU, text=_VICUNA_7B_VIDEO, image_aspect=ANYRES,
                                       grid_pinpoints=PINPOINTS_1_6, template="llava_v1", video_pool=2),
    "llava-next-video-34b": ModelConfig("llava-next-video-34b", MLP2X_GELU, text=_YI_34B, image_aspect=ANYRES,
                                        grid_pinpoints=PINPOINTS_1_6, template="chatml_direct", video_pool=2),
    "llava-v1.6-34b": ModelConfig("llava-v1.6-34b", MLP2X_GELU, text=_YI_34B, image_aspect=ANYRES,
                                  grid_pinpoints=PINPOINTS_1_6, template="chatml_direct"),
    "tiny-llava-v1.5": ModelConfig("tiny-llava-v1.5", MLP2X_GELU, vision=_TINY_VISION,
                                   text=_TINY_LLAVA_TEXT, template="llava_v1"),
    "tiny-llava-v1.6": ModelConfig("tiny-llava-v1.6", MLP2X_GELU, vision=_TINY_VISION,
                                   text=_TINY_LLAVA_NEXT_TEXT, image_aspect=ANYRES,
                                   grid_pinpoints=_TINY_PINPOINTS, template="llava_v1"),
    "tiny-llava-next-video": ModelConfig("tiny-llava-next-video", MLP2X_GELU, vision=_TINY_VISION,
                                         text=replace(_TINY_LLAVA_TEXT, rope_linear_factor=2.0), image_aspect=ANYRES, grid_pinpoints=_TINY_PINPOINTS,
                                         template="llava_v1", video_pool=2),
    "tiny-llava-v1.6-34b": ModelConfig("tiny-llava-v1.6-34b", MLP2X_GELU, vision=_TINY_VISION,
                                       text=_TINY_YI_TEXT, image_aspect=ANYRES,
                                       grid_pinpoints=_TINY_PINPOINTS, template="chatml_direct"),
}


# --- Llama-3.2-Vision (mllama): images enter the text model through cross-attention layers ----

MLLAMA = "mllama"  # config.json's model_type
MLLAMA_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))  # (tiles high, tiles wide)


@dataclass(frozen=True)
class MllamaVisionConfig:
    """The mllama vision tower: tiles of `image_size` pixels through local then gated global
    layers (defaults: Llama-3.2-11B-Vision)."""

    image_size: int = 560  # one tile's side
    patch_size: int = 14
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_global_layers: int = 8
    num_heads: int = 16
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)  # their outputs join the final one
    supported_aspect_ratios: tuple[tuple[int, int], ...] = MLLAMA_ASPECT_RATIOS
    image_mean: tuple[float, float, float] = CLIP_MEAN  # the checkpoint's preprocessor_config
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        for name in ("intermediate_layers", "image_mean", "image_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "supported_aspect_ratios", tuple(tuple(r) for r in self.supported_aspect_ratios))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tile_tokens(self) -> int:
        """Positions one tile becomes: its patches and a class token."""
        return self.grid * self.grid + 1

    @property
    def output_dim(self) -> int:
        """The final layer's features and each intermediate layer's, side by side."""
        return self.hidden_size * (1 + len(self.intermediate_layers))


@dataclass(frozen=True)
class MllamaConfig:
    name: str
    vision: MllamaVisionConfig = field(default_factory=MllamaVisionConfig)
    text: TextConfig = field(default_factory=lambda: _LLAMA_3_1_8B_CROSS)
    image_token_id: int = 128256  # <|image|>, one position per image in the text
    embed_rows: int = 128264  # embed_tokens has a few rows past the vocabulary (lm_head has not)
    stop_token_ids: tuple[int, ...] = (128001, 128008, 128009)  # end_of_text, eom, eot

    family = MLLAMA
    projector_type = MLLAMA
    template = "checkpoint"  # prompts come from the checkpoint's own chat template
    video_pool = 0  # no clips: one image per request

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def version(self) -> str:
        return "3.2"

    @property
    def image_tokens(self) -> int:
        """Cross-attention positions one image takes (every tile slot, padding tiles masked)."""
        return self.vision.max_num_tiles * self.vision.tile_tokens

    max_image_tokens = image_tokens
    cross_length = image_tokens  # the decoder's cross-attention inputs: one image's every position

    def to_dict(self) -> dict:
        return {"family": MLLAMA, "name": self.name, "vision": asdict(self.vision), "text": asdict(self.text),
                "image_token_id": self.image_token_id, "embed_rows": self.embed_rows,
                "stop_token_ids": list(self.stop_token_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> MllamaConfig:
        return cls(name=d["name"], vision=MllamaVisionConfig(**d["vision"]), text=TextConfig(**d["text"]),
                   image_token_id=d["image_token_id"], embed_rows=d["embed_rows"],
                   stop_token_ids=tuple(d["stop_token_ids"]))

    def same_shape(self, other) -> bool:
        return isinstance(other, MllamaConfig) and (self.vision, self.text, self.image_token_id) == (
            other.vision, other.text, other.image_token_id)


_LLAMA_3_1_8B_CROSS = TextConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=40, num_heads=32, num_kv_heads=8,
    max_position=131072, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
    pad_token_id=128004, cross_attention_layers=(3, 8, 13, 18, 23, 28, 33, 38), rope_scaling=(8.0, 1.0, 4.0, 8192))
# Toy twin: 56 px tiles of 4x4 patches (17 positions each, 68 per image), two cross-attention
# layers among six, GQA, Llama 3.1's rope scaling; a vocabulary of 1024 whose top 24 ids are the
# special tokens (Llama 3 keeps its 256 at the top the same way), <|image|> right after it.
_TINY_MLLAMA_VISION = MllamaVisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                                         num_layers=4, num_global_layers=2, num_heads=2, intermediate_layers=(0, 2))
_TINY_MLLAMA_TEXT = replace(_LLAMA_3_1_8B_CROSS, vocab_size=1024, hidden_size=128, intermediate_size=344,
                            num_layers=6, num_heads=4, num_kv_heads=2, max_position=1024, bos_token_id=1000,
                            eos_token_id=1001, pad_token_id=1004, cross_attention_layers=(1, 4),
                            rope_scaling=(8.0, 1.0, 4.0, 512))

# Llama-3.2-Vision's presets stand apart from PRESETS (whose users read LLaVA-family fields:
# projector, grid pinpoints, CLIP tower); make_checkpoint and match_preset take both.
MLLAMA_PRESETS: dict[str, MllamaConfig] = {
    "llama-3.2-11b-vision": MllamaConfig("llama-3.2-11b-vision"),
    "tiny-mllama": MllamaConfig("tiny-mllama", _TINY_MLLAMA_VISION, _TINY_MLLAMA_TEXT, image_token_id=1024,
                                embed_rows=1032, stop_token_ids=(1001, 1008, 1009)),
}


def config_from_dict(d: dict) -> ModelConfig | MllamaConfig:
    """A manifest's model config, of whichever family it is."""
    return MllamaConfig.from_dict(d) if d.get("family") == MLLAMA else ModelConfig.from_dict(d)


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def match_preset(config):
    """Return `config` renamed after the preset with the same shapes, if there is one."""
    for preset in [*PRESETS.values(), *MLLAMA_PRESETS.values()]:
        if type(preset) is type(config) and preset.same_shape(config):
            return replace(config, name=preset.name)
    return config
