"""MobileVLM and LLaVA checkpoints in their upstream layouts: the key layout and the reader.

A checkpoint directory holds config.json, the weights (`pytorch_model.bin` or
`model.safetensors`, optionally sharded with an `*.index.json`) and the LLaMA SentencePiece
tokenizer. In the original (LLaVA-code) format one state dict carries the LLM, the projector
(`model.mm_projector.*`), a copy of the CLIP tower (`model.vision_tower.vision_tower.
vision_model.*`; LLaVA-1.5 releases leave it out and run openai's) and, for LLaVA-1.6,
`model.image_newline`. That format is the canonical key set here: the llava-hf transformers
format (llava_hf.py) is renamed into it on reading.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgevlm.presets import (ANYRES, LDP, LDPV2, MLP2X_GELU, PAD, ModelConfig, TextConfig,
                             VisionConfig, match_preset)
from edgevlm.model import llava_hf
from edgevlm.model.canonical import (NEWLINE_KEY, PROJECTOR_PREFIX, VISION_PREFIX, CheckpointError,
                                     vision_from_tensors)
from edgevlm.model.projector import se_width
from edgevlm.model.rope_scaling import linear_factor

PROJECTORS = (LDP, LDPV2, MLP2X_GELU)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SINGLES = ("model.safetensors", "pytorch_model.bin")


# --- the layout: every key of the upstream state dict and its shape ------------------------

def vision_layout(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Keys of transformers' CLIPVisionModel (prefix `vision_model.`), all layers."""
    c, f = v.hidden_size, v.intermediate_size
    keys = {
        "vision_model.embeddings.class_embedding": (c,),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, v.patch_size, v.patch_size),
        "vision_model.embeddings.position_embedding.weight": (v.num_patches + 1, c),
        "vision_model.pre_layrnorm.weight": (c,), "vision_model.pre_layrnorm.bias": (c,),
        "vision_model.post_layernorm.weight": (c,), "vision_model.post_layernorm.bias": (c,),
    }
    for i in range(v.num_layers):
        p = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[p + f"self_attn.{proj}.weight"], keys[p + f"self_attn.{proj}.bias"] = (c, c), (c,)
        for ln in ("layer_norm1", "layer_norm2"):
            keys[p + f"{ln}.weight"], keys[p + f"{ln}.bias"] = (c,), (c,)
        keys[p + "mlp.fc1.weight"], keys[p + "mlp.fc1.bias"] = (f, c), (f,)
        keys[p + "mlp.fc2.weight"], keys[p + "mlp.fc2.bias"] = (c, f), (c,)
    return keys


def projector_layout(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Keys inside `model.mm_projector.`."""
    i, d = cfg.vision.hidden_size, cfg.text.hidden_size
    if cfg.projector_type == MLP2X_GELU:
        return {"0.weight": (d, i), "0.bias": (d,), "2.weight": (d, d), "2.bias": (d,)}
    if cfg.projector_type.startswith(LDPV2):
        return {"mlp.mlp.0.weight": (d, i), "mlp.mlp.0.bias": (d,),
                "mlp.mlp.2.weight": (d, d), "mlp.mlp.2.bias": (d,),
                "peg.peg.0.weight": (d, 1, 3, 3), "peg.peg.0.bias": (d,)}
    if cfg.projector_type.startswith(LDP):
        sq = se_width(d)
        keys = {"model.mlp.1.weight": (d, i), "model.mlp.1.bias": (d,),
                "model.mlp.3.weight": (d, d), "model.mlp.3.bias": (d,)}
        for b in (1, 2):
            p = f"model.mb_block.{b}.block."
            keys.update({
                p + "0.0.weight": (d, 1, 3, 3), p + "0.1.weight": (d,), p + "0.1.bias": (d,),
                p + "1.fc1.weight": (sq, d, 1, 1), p + "1.fc1.bias": (sq,),
                p + "1.fc2.weight": (d, sq, 1, 1), p + "1.fc2.bias": (d,),
                p + "2.0.weight": (d, d, 1, 1), p + "2.1.weight": (d,), p + "2.1.bias": (d,),
            })
        return keys
    raise CheckpointError(f"config.json: mm_projector_type {cfg.projector_type!r} is not "
                          f"supported (expected one of {', '.join(PROJECTORS)})")


def llm_layout(t: TextConfig) -> dict[str, tuple[int, ...]]:
    """Keys of LlamaForCausalLM."""
    d, f, kv = t.hidden_size, t.intermediate_size, t.num_kv_heads * t.head_dim
    keys = {"model.embed_tokens.weight": (t.vocab_size, d), "model.norm.weight": (d,),
            "lm_head.weight": (t.vocab_size, d)}
    for i in range(t.num_layers):
        p = f"model.layers.{i}."
        keys.update({
            p + "self_attn.q_proj.weight": (t.num_heads * t.head_dim, d),
            p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, t.num_heads * t.head_dim),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    return keys


def layout(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The whole checkpoint state dict: key -> shape, in upstream key names (a LLaVA-1.5
    release holds all but the tower's)."""
    keys = llm_layout(cfg.text)
    keys.update({PROJECTOR_PREFIX + k: s for k, s in projector_layout(cfg).items()})
    keys.update({VISION_PREFIX + k: s for k, s in vision_layout(cfg.vision).items()})
    if cfg.image_aspect == ANYRES:
        keys[NEWLINE_KEY] = (cfg.text.hidden_size,)
    return keys


# --- reading --------------------------------------------------------------------------------

@dataclass
class Weights:
    """State dicts of the three parts, keyed as the reference modules expect."""

    vision: dict[str, torch.Tensor]  # CLIPVisionModel keys ("vision_model....")
    projector: dict[str, torch.Tensor]
    llm: dict[str, torch.Tensor]  # LlamaForCausalLM keys
    vision_source: str  # where the CLIP weights came from
    image_newline: torch.Tensor | None = None  # LLaVA-1.6 only


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    weight_files: list[Path]
    tensors: dict[str, torch.Tensor]  # lazily mapped from disk, canonical key names
    clip_dir: Path | None = None  # where the tower comes from when the checkpoint has none
    format: str = "original"  # or "llava-hf"
    chat_template: str | None = None  # a llava-hf checkpoint's own (Jinja)

    def weights(self, clip_dir: str | Path | None = None) -> Weights:
        """Split the state dict into its parts, honouring upstream's choice of CLIP weights.

        MobileVLM V2 and LLaVA-1.6 run the tower stored in the checkpoint (1.6 fine-tuned it).
        MobileVLM V1 and LLaVA-1.5 upstream load pristine openai/clip-vit-large-patch14-336
        from the hub instead; pass its local directory as `clip_dir` to reproduce that. Without
        it a stored copy is used (the tower was frozen in training, so the two differ only by
        rounding) and a note says so; a 1.5 release stores none, so read_checkpoint needed it.
        """
        t = self.tensors
        clip_dir = clip_dir if clip_dir is not None else self.clip_dir
        vision = {k[len(VISION_PREFIX):]: t[k] for k in t if k.startswith(VISION_PREFIX)}
        source = f"{self.path.name} (stored copy)"
        if self.clip_dir is not None and Path(clip_dir) == self.clip_dir:
            source = str(clip_dir)  # read_checkpoint already took the tower from there
        elif self.config.version in ("v1", "1.5") and self.format == "original":
            if clip_dir is not None:
                vision, source = read_clip_dir(Path(clip_dir), self.config.vision), str(clip_dir)
            else:
                print(f"note: {self.path.name} is {self.config.family} {self.config.version}, which "
                      "upstream runs with the hub's openai CLIP weights; using the stored copy (pass a "
                      "local CLIP directory to use those instead)", file=sys.stderr)
        projector = {k[len(PROJECTOR_PREFIX):]: t[k] for k in t if k.startswith(PROJECTOR_PREFIX)}
        llm = {k: t[k] for k in llm_layout(self.config.text)}
        return Weights(vision, projector, llm, source, t.get(NEWLINE_KEY))

    def sha256(self) -> str:
        """Digest of config.json and the weight files (and the CLIP directory's, when the
        tower came from one), for manifests."""
        h = hashlib.sha256()
        clip = weight_files(self.clip_dir) if self.clip_dir is not None else []
        for f in [self.path / "config.json", *self.weight_files, *clip]:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.model"


def read_checkpoint(path: str | Path, clip_dir: str | Path | None = None) -> Checkpoint:
    """Open and validate a checkpoint directory, either format. Raises CheckpointError naming
    the problem. clip_dir: the CLIP tower for a checkpoint released without one (LLaVA-1.5)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (is this a MobileVLM or LLaVA checkpoint directory?)")
    raw = json.loads((path / "config.json").read_text())
    if not (path / "tokenizer.model").is_file():
        raise CheckpointError(f"{path}: no tokenizer.model (the LLaMA SentencePiece tokenizer)")
    files = weight_files(path)
    tensors = {}
    for f in files:
        tensors.update(_load_file(f))
    # transformers < 4.32 saved RoPE's inv_freq buffer; it is recomputed, never loaded.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    fmt = "llava-hf" if llava_hf.is_hf_config(raw) else "original"
    spell = None  # canonical key -> the name on disk, for messages
    if fmt == "llava-hf":
        tensors, names = llava_hf.canonical_keys(tensors)
        spell = lambda k: names.get(k) or llava_hf.hub_name(k)  # noqa: E731
    else:
        tensors = _with_vision_model_level(tensors)
    tower_stored = any(k.startswith(VISION_PREFIX) for k in tensors)
    if not tower_stored:
        if clip_dir is None:
            raise CheckpointError(f"{path}: the checkpoint holds no CLIP vision tower (LLaVA-1.5 releases "
                                  "leave it out); pass CLIP=<local openai/clip-vit-large-patch14-336 directory>")
        tensors.update({VISION_PREFIX + k: t for k, t in _clip_tensors(Path(clip_dir)).items()})
    # a shape no preset has is named after its directory (make's artifacts/<name>/checkpoint: <name>)
    name = path.absolute().parent.name if path.name == "checkpoint" else path.name
    if fmt == "llava-hf":
        config = llava_hf.config_from_hf(raw, tensors, name=name)
    else:
        config = config_from_checkpoint(raw, tensors, name=name)
    check_tensors(tensors, layout(config), where=str(path), spell=spell)
    chat_template = read_chat_template(path) if fmt == "llava-hf" else None
    config = replace(config, template=template_for(config, path, chat_template))
    return Checkpoint(path, config, files, tensors, Path(clip_dir) if not tower_stored else None, fmt,
                      chat_template)


def _with_vision_model_level(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 saves CLIPVisionModel without its `vision_model.` level; put it back."""
    out = {}
    for k, t in tensors.items():
        if k.startswith(VISION_PREFIX) and not k.startswith(VISION_PREFIX + "vision_model."):
            k = VISION_PREFIX + "vision_model." + k[len(VISION_PREFIX):]
        out[k] = t
    return out


def weight_files(path: Path) -> list[Path]:
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path}: {index} names missing shard(s): {', '.join(missing)}")
            return files
    for single in WEIGHT_SINGLES:
        if (path / single).is_file():
            return [path / single]
    raise CheckpointError(f"{path}: no weights (expected one of "
                          f"{', '.join(WEIGHT_SINGLES + WEIGHT_INDEXES)})")


def _load_file(f: Path) -> dict[str, torch.Tensor]:
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(f))  # memory-mapped
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{f}: cannot read weights: {e}") from e


def config_from_checkpoint(raw: dict, tensors: dict[str, torch.Tensor], name: str) -> ModelConfig:
    """config.json gives the LLM and projector; the CLIP tower's dims come from its weights."""
    def need(key):
        if key not in raw:
            raise CheckpointError(f"config.json: missing {key!r}")
        return raw[key]

    ptype = need("mm_projector_type")
    if not (ptype == MLP2X_GELU or ptype.startswith(LDPV2) or ptype.startswith(LDP)):
        raise CheckpointError(f"config.json: mm_projector_type {ptype!r} is not supported "
                              f"(expected one of {', '.join(PROJECTORS)})")
    if raw.get("mm_vision_select_feature", "patch") != "patch":
        raise CheckpointError("config.json: only mm_vision_select_feature 'patch' is supported")
    if raw.get("mm_use_im_start_end"):
        raise CheckpointError("config.json: mm_use_im_start_end true is not supported")
    heads = need("num_attention_heads")
    text = TextConfig(
        vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
        num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
        max_position=raw.get("max_sequence_length") or need("max_position_embeddings"),
        rms_norm_eps=need("rms_norm_eps"), rope_theta=raw.get("rope_theta", 10000.0),
        bos_token_id=raw.get("bos_token_id", 1), eos_token_id=raw.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id", 0), rope_linear_factor=linear_factor(raw))
    if ptype == MLP2X_GELU:
        # LLaVA trains and truncates at tokenizer_model_max_length (4096) whatever the LLM's
        # own positions reach (Mistral: 32768).
        text = replace(text, max_position=min(text.max_position, raw.get("tokenizer_model_max_length") or 4096))
    vision = vision_from_tensors(tensors, raw.get("mm_vision_select_layer", -2))
    if raw.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise CheckpointError(f"config.json: mm_hidden_size {raw['mm_hidden_size']} does not "
                              f"match the vision tower width {vision.hidden_size}")
    aspect = PAD  # what MobileVLM's code does whatever the field says
    if ptype == MLP2X_GELU:
        aspect = raw.get("image_aspect_ratio") or PAD
        if aspect not in (PAD, ANYRES):
            raise CheckpointError(f"config.json: image_aspect_ratio {aspect!r} is not supported "
                                  f"(expected {PAD!r} or {ANYRES!r})")
    pinpoints = ()
    if aspect == ANYRES:
        if "unpad" not in (raw.get("mm_patch_merge_type") or ""):
            raise CheckpointError("config.json: anyres needs mm_patch_merge_type 'spatial_unpad'")
        # The original code reads each pinpoint as (width, height); ours are (height, width).
        pinpoints = tuple((h, w) for w, h in need("image_grid_pinpoints"))
    return match_preset(ModelConfig(name, ptype, vision, text, aspect, pinpoints, video_pool=video_pool(raw)))


def video_pool(raw: dict) -> int:
    """LLaVA-NeXT-Video's original config: its `spatial_pool` resampler's stride (0: no video).
    Only "average" pooling is read; "max" pools otherwise and "conv" has weights of its own."""
    kind = raw.get("mm_resampler_type")
    if not kind:
        return 0
    mode = raw.get("mm_spatial_pool_mode", "average")
    if kind != "spatial_pool" or mode != "average":
        raise CheckpointError(f"config.json: mm_resampler_type {kind!r} with mode {mode!r} is not supported "
                              "(spatial_pool, average)")
    if "mm_spatial_pool_stride" not in raw:
        raise CheckpointError("config.json: missing 'mm_spatial_pool_stride'")
    return int(raw["mm_spatial_pool_stride"])


CHECKPOINT_TEMPLATE = "checkpoint"  # the checkpoint's own chat template (Jinja), rendered as transformers does


def run_llava_name(path: Path) -> str:
    """The model name LLaVA's run_llava and CLI pick a template by: the directory's name, or
    for a training checkpoint directory (checkpoint-N) its parent's name joined to its own.
    Our make flow's artifacts/<name>/checkpoint is read like the latter."""
    parts = path.absolute().parts
    last = parts[-1]
    return f"{parts[-2]}_{last}" if (last.startswith("checkpoint-") or last == "checkpoint") and len(parts) > 1 \
        else last


def run_llava_template(name: str) -> str:
    """run_llava's rule: the first of these substrings in the lower-cased model name decides."""
    name = name.lower()
    for key, template in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"),
                          ("v1.6-34b", "chatml_direct"), ("v1", "llava_v1"), ("mpt", "mpt")):
        if key in name:
            return template
    return "llava_v0"


def template_for(cfg: ModelConfig, path: Path, chat_template: str | None) -> str:
    """The template a checkpoint is served with: its own chat template where it has one
    (llava-hf), MobileVLM's `v1` (its code's only one, vicuna_v1), else run_llava's rule on
    the directory's name (original LLaVA)."""
    if chat_template:
        return CHECKPOINT_TEMPLATE
    if cfg.family == "mobilevlm":
        return "vicuna_v1"
    if cfg.video_pool:  # LLaVA-NeXT's video demo script: vicuna_v1 for the 7B, its chatml layout for the 34B
        return "chatml_direct" if "34b" in run_llava_name(path).lower() else "vicuna_v1"
    return run_llava_template(run_llava_name(path))


def read_chat_template(path: Path) -> str | None:
    """A llava-hf checkpoint's chat template, where transformers keeps it: chat_template.jinja
    (transformers 5), chat_template.json (the processor's, 4.4x), or tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if isinstance(template, str) and template:
                return template
    return None


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                  where: str, spell=None) -> None:
    """spell: canonical key -> the key as the files spell it, so messages name what is on disk."""
    name = (lambda k, _: spell(k)) if spell else (lambda k, _: k)
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: missing key {name(missing[0], missing[0])}{more}")
    for k, s in expected.items():
        if tuple(tensors[k].shape) != s:
            raise CheckpointError(f"{where}: key {name(k, k)} has shape {list(tensors[k].shape)}, "
                                  f"expected {list(s)} from config.json")
    extra = sorted(name(k, k) for k in tensors if k not in expected)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: unexpected key {extra[0]}{more}; does config.json "
                              "match the weights?")


def _clip_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The `vision_model.*` tensors of a local Hugging Face CLIP directory (CLIPModel or
    CLIPVisionModel, with or without transformers 5's missing `vision_model.` level)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such CLIP directory")
    tensors = {}
    for f in weight_files(path):
        tensors.update(_load_file(f))
    if not any(k.startswith("vision_model.") for k in tensors):  # a transformers 5 CLIPVisionModel
        tensors = {"vision_model." + k: t for k, t in tensors.items() if not k.startswith("text_model.")}
    vision = {k: t for k, t in tensors.items() if k.startswith("vision_model.")}
    return {k: t for k, t in vision.items() if not k.endswith("position_ids")}


def read_clip_dir(path: Path, v: VisionConfig) -> dict[str, torch.Tensor]:
    """CLIP weights from a local Hugging Face CLIP directory, checked against the tower's dims."""
    vision = _clip_tensors(path)
    check_tensors(vision, vision_layout(v), where=str(path))
    return vision
