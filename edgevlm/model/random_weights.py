"""Random-weight MobileVLM and LLaVA checkpoints in the exact upstream layouts, for any preset.

With no model hub on our machines, these exercise the real loading path: the same config.json
fields, key names, bf16 `pytorch_model.bin` (or safetensors, sharded or not) and a real
SentencePiece BPE `tokenizer.model` with LLaMA's settings (byte fallback, <unk>/<s>/</s> at
0/1/2, identity normalisation, split digits) trained on English text from Python's own
docstrings, padded to the preset's vocabulary size.
"""

from __future__ import annotations

import ast
import collections
import io
import json
import math
import os
import re
import struct
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgevlm.model import llava_hf
from edgevlm.model.canonical import VISION_PREFIX
from edgevlm.model.checkpoint import layout
from edgevlm.model.rope_scaling import rope_scaling_json
from edgevlm.presets import ANYRES, CLIP_MEAN, CLIP_STD, ModelConfig
from edgevlm.runtime.prompt import SYSTEM_V1
from edgevlm.staging import staged_dir


FORMATS = ("original", "llava-hf")


def write_random_checkpoint(out_dir: str | Path, cfg: ModelConfig, *, seed: int = 0,
                            fmt: str = "bin", shard_bytes: int | None = None,
                            layout_format: str = "original", clip_out: str | Path | None = None) -> Path:
    """Write a random checkpoint for `cfg` into out_dir (atomically). Returns out_dir.

    fmt is "bin" (torch pickles, as the released checkpoints) or "safetensors"; shard_bytes
    splits the weights into shards with an index file, as large checkpoints are saved.
    layout_format "llava-hf" writes a LLaVA preset as llava-hf does (padded vocabulary, hub key
    names, nested config). A LLaVA-1.5 original checkpoint is released without its CLIP tower:
    the tower goes to clip_out (default: a `clip` folder beside out_dir) as a CLIPVisionModel
    directory, the stand-in for openai/clip-vit-large-patch14-336.
    """
    if layout_format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {layout_format!r} ({' or '.join(FORMATS)})")
    out_dir = Path(out_dir)
    hf = layout_format == "llava-hf"
    if hf and cfg.family != "llava":
        raise ValueError(f"{cfg.name} is not a LLaVA preset; llava-hf holds LLaVA models only")
    full = replace(cfg, text=replace(cfg.text, vocab_size=llava_hf.padded_vocab(cfg.text.vocab_size))) if hf else cfg
    tensors = random_state_dict(full, seed)
    if cfg.family == "llava" and cfg.version == "1.5" and not hf:
        tower = {k[len(VISION_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(VISION_PREFIX)}
        write_clip_dir(Path(clip_out) if clip_out else out_dir.parent / "clip", cfg, tower)
    with staged_dir(out_dir) as tmp:
        _save_weights(llava_hf.hub_keys(tensors) if hf else tensors, tmp, fmt, shard_bytes)
        del tensors
        config = llava_hf.hf_config(cfg) if hf else upstream_config(cfg)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.text.bos_token_id, "eos_token_id": cfg.text.eos_token_id,
             "pad_token_id": cfg.text.pad_token_id}, indent=2) + "\n")
        write_tokenizer(tmp, cfg.text.vocab_size, added=llava_hf.added_tokens(cfg) if hf else (),
                        chatml=cfg.template == "chatml_direct")
        if hf:
            (tmp / "preprocessor_config.json").write_text(json.dumps(_processor_config(cfg), indent=2) + "\n")
            (tmp / "chat_template.json").write_text(json.dumps({"chat_template": llava_hf.chat_template(cfg)},
                                                               indent=2) + "\n")
    return out_dir


def write_clip_dir(out: Path, cfg: ModelConfig, tower: dict[str, torch.Tensor]) -> Path:
    """A CLIPVisionModel directory (config.json + model.safetensors), atomically."""
    from safetensors.torch import save_file
    v = cfg.vision
    with staged_dir(out) as tmp:
        save_file({k: t.contiguous() for k, t in tower.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({
            "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
            "hidden_size": v.hidden_size, "image_size": v.image_size, "intermediate_size": v.intermediate_size,
            "num_attention_heads": v.num_heads, "num_hidden_layers": v.num_layers, "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps, "hidden_act": "quick_gelu", "projection_dim": 768}, indent=2) + "\n")
    return out


def _processor_config(cfg: ModelConfig) -> dict:
    s = cfg.vision.image_size
    out = {"image_processor_type": "LlavaNextImageProcessor" if cfg.image_aspect == ANYRES else "CLIPImageProcessor",
           "do_resize": True, "size": {"shortest_edge": s}, "resample": 3, "do_center_crop": True,
           "crop_size": {"height": s, "width": s}, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
           "do_convert_rgb": True}
    if cfg.image_aspect == ANYRES:
        out.update(image_grid_pinpoints=[list(p) for p in cfg.grid_pinpoints], do_pad=True)
    return out


def random_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """bf16 tensors for every key of the layout, scaled so activations neither vanish nor blow
    up through the layers, and so greedy decoding has clear winners (logit spread ~3)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout(cfg).items():
        if len(shape) == 1 and key.endswith(".weight"):  # norm scales: near one, not exactly
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # biases and the CLS embedding
            t = 0.02 * torch.randn(shape, generator=g)
        elif key.endswith("embed_tokens.weight") or key.endswith("position_embedding.weight") \
                or key.endswith("image_newline"):
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            scale = 3.0 if key == "lm_head.weight" else 1.0
            t = torch.randn(shape, generator=g) * (scale / fan_in ** 0.5)
        out[key] = t.to(torch.bfloat16)
    return out


@dataclass(frozen=True)
class Planned:
    """A tensor made only when its shard is written, so a checkpoint larger than this machine's
    memory (Llama-3.2-11B-Vision: 21 GB of bf16) is never held whole; made in key order, the
    values are those of making them all at once."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _nbytes(t: torch.Tensor | Planned) -> int:
    return t.nbytes if isinstance(t, Planned) else t.numel() * t.element_size()


def _save_weights(tensors: dict[str, torch.Tensor | Planned], out: Path, fmt: str,
                  shard_bytes: int | None) -> None:
    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"unknown weight format {fmt!r} (bin or safetensors)")
    shards: list[dict[str, torch.Tensor | Planned]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = _nbytes(t)
        if shard_bytes and shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")

    def save(part, name):
        part = {k: t.make() if isinstance(t, Planned) else t for k, t in part.items()}
        if fmt == "bin":
            torch.save(part, out / name)
        else:
            from safetensors.torch import save_file
            save_file(part, str(out / name), metadata={"format": "pt"})

    if len(shards) == 1 and not shard_bytes:
        save(shards[0], f"{stem}.{ext}")
        return
    weight_map = {}
    for i, part in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        save(part, name)
        weight_map.update({k: name for k in part})
    total = sum(_nbytes(t) for t in tensors.values())
    (out / f"{stem}.{ext}.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def upstream_config(cfg: ModelConfig) -> dict:
    """config.json with the fields the released checkpoints carry (LLaVA code's format)."""
    if cfg.family == "llava":
        return llava_config(cfg)
    t, v = cfg.text, cfg.vision
    return {
        "_name_or_path": f"edgevlm-random/{cfg.name}",
        "architectures": ["MobileLlamaForCausalLM"],
        "model_type": "mobilevlm",
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "hidden_act": "silu", "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "initializer_range": 0.02,
        "max_position_embeddings": t.max_position, "max_sequence_length": t.max_position,
        "num_attention_heads": t.num_heads, "num_hidden_layers": t.num_layers,
        "num_key_value_heads": t.num_kv_heads, "pretraining_tp": 1,
        "rms_norm_eps": t.rms_norm_eps, "rope_scaling": None, "rope_theta": t.rope_theta,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": t.vocab_size,
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None, "mm_hidden_size": v.hidden_size,
        "mm_projector_type": cfg.projector_type, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": v.select_layer,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tune_mm_mlp_adapter": False, "use_mm_proj": True, "vision_tower_type": "clip",
    }


def llava_config(cfg: ModelConfig) -> dict:
    """config.json of liuhaotian/llava-v1.5-* and llava-v1.6-* (a flat LlamaConfig/MistralConfig
    plus the mm_* fields)."""
    t, v = cfg.text, cfg.vision
    mistral = cfg.template == "mistral_instruct"
    anyres = cfg.image_aspect == ANYRES
    out = {
        "_name_or_path": f"edgevlm-random/{cfg.name}",
        "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if mistral else "llava",
        "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
        "hidden_act": "silu", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "initializer_range": 0.02, "max_position_embeddings": 32768 if mistral else t.max_position,
        "num_attention_heads": t.num_heads, "num_hidden_layers": t.num_layers,
        "num_key_value_heads": t.num_kv_heads, "pretraining_tp": 1, "rms_norm_eps": t.rms_norm_eps,
        "rope_scaling": rope_scaling_json(t.rope_linear_factor), "rope_theta": t.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float16", "use_cache": True, "vocab_size": t.vocab_size,
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": cfg.image_aspect,
        "mm_hidden_size": v.hidden_size, "mm_projector_type": cfg.projector_type,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": v.select_layer,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": anyres, "use_mm_proj": True,
    }
    if mistral:
        out["sliding_window"] = None
    if cfg.video_pool:  # LLaVA-NeXT's spatial_pool resampler: parameter-free in "average" mode
        out.update(mm_resampler_type="spatial_pool", mm_spatial_pool_mode="average",
                   mm_spatial_pool_stride=cfg.video_pool, mm_spatial_pool_out_channels=v.hidden_size)
    if anyres:  # the original code's pinpoints are (width, height)
        out.update(image_grid_pinpoints=[[w, h] for h, w in cfg.grid_pinpoints],
                   mm_patch_merge_type="spatial_unpad", tokenizer_model_max_length=t.max_position,
                   tokenizer_padding_side="left" if mistral else "right")
    return out


# --- tokenizer -------------------------------------------------------------------------------

# A chatml model's turn markers (LLaVA-1.6-34B's Yi tokenizer has them at ids 6 and 7), held
# whole by SentencePiece as user-defined pieces; three unused ones before them fix the ids.
CHATML_PIECES = ("<|unused_3|>", "<|unused_4|>", "<|unused_5|>", "<|im_start|>", "<|im_end|>")


def write_tokenizer(out: Path, vocab_size: int, added: tuple[str, ...] = (), chatml: bool = False) -> None:
    """tokenizer.model plus its json files; `added` tokens get ids from vocab_size on (as
    llava-hf adds <image> and <pad> to the LLaMA tokenizer); chatml: with CHATML_PIECES."""
    model = train_tokenizer(vocab_size, CHATML_PIECES if chatml else ())
    (out / "tokenizer.model").write_bytes(model)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {**special, "add_bos_token": True, "add_eos_token": False, "legacy": True,
              "model_max_length": 2048, "pad_token": None, "padding_side": "right",
              "tokenizer_class": "LlamaTokenizer"}
    if added:
        config["added_tokens_decoder"] = {str(vocab_size + i): {"content": tok, "special": True}
                                          for i, tok in enumerate(added)}
        (out / "added_tokens.json").write_text(json.dumps(
            {tok: vocab_size + i for i, tok in enumerate(added)}, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


_TOKENIZER_CACHE: dict[tuple, bytes] = {}


def train_tokenizer(vocab_size: int, user_pieces: tuple[str, ...] = ()) -> bytes:
    """A serialized SentencePiece BPE model with LLaMA's settings and exactly vocab_size pieces
    (user_pieces right after <unk> <s> </s>, each always one token)."""
    if (vocab_size, user_pieces) in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[vocab_size, user_pieces]
    import sentencepiece as spm

    texts = corpus()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, num_threads=2, minloglevel=2, seed_sentencepiece_size=200000,
        user_defined_symbols=list(user_pieces))
    model = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    # The corpus may not support vocab_size merges; fill up with its most frequent words not
    # yet in the vocabulary, scored below every learned merge so they are merged last.
    have = {sp.id_to_piece(i) for i in range(sp.vocab_size())}
    low = min(sp.get_score(i) for i in range(sp.vocab_size())) - 1.0
    words = collections.Counter(w for line in texts for w in re.findall(r"[A-Za-z]{2,}", line))
    fill = (w for w in (("\u2581" + w) for w, _ in words.most_common()) if w not in have)
    extra = []
    for i in range(vocab_size - sp.vocab_size()):
        extra.append(_piece_bytes(next(fill, None) or f"\u2581<extra_{i}>", low - i * 1e-3))
    model += b"".join(extra)
    if spm.SentencePieceProcessor(model_proto=model).vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has the wrong size after padding to {vocab_size}")
    _TOKENIZER_CACHE[vocab_size, user_pieces] = model
    return model


def _piece_bytes(piece: str, score: float) -> bytes:
    """One `pieces` entry of sentencepiece's ModelProto, in protobuf wire format.

    Repeated fields may be appended to a serialized message, so padding the vocabulary
    needs no generated protobuf module (whose version pins fight tritonclient's).
    """
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    text = piece.encode()
    body = b"\x0a" + varint(len(text)) + text  # 1: piece
    body += b"\x15" + struct.pack("<f", score)  # 2: score
    body += b"\x18\x01"  # 3: type NORMAL
    return b"\x0a" + varint(len(body)) + body  # ModelProto field 1: pieces


def corpus() -> list[str]:
    """English lines: the docstrings of the Python standard library, plus the chat template."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines = [SYSTEM_V1, "USER: What is in the image? ASSISTANT: A cat.</s>"]
    files = []
    for d, subdirs, names in os.walk(root):
        # Prune installed packages and the test suite: only the library's own prose.
        subdirs[:] = sorted(s for s in subdirs if s not in ("site-packages", "test", "tests",
                                                            "idlelib", "__pycache__"))
        files += [Path(d) / n for n in sorted(names) if n.endswith(".py")]
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    lines.extend(s.strip() for s in doc.splitlines() if s.strip())
        if len(lines) > 30_000:
            break
    return lines

