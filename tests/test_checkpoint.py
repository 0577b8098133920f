"""Checkpoints in the upstream layout: round trips for every preset's layout, and bad ones."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from edgevlm.model.checkpoint import CheckpointError, layout, read_checkpoint
from edgevlm.presets import PRESETS, VisionConfig
from edgevlm.model.random_weights import upstream_config, write_random_checkpoint

TINY_VISION = VisionConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=96,
                           num_layers=3, num_heads=1)


def shrink(name: str):
    """The preset's layout (projector, head/KV ratio, norm eps, context) at toy size."""
    cfg = PRESETS[name]
    t = cfg.text
    heads = 4 if t.num_heads == t.num_kv_heads else 8
    text = replace(t, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=heads,
                   num_kv_heads=heads * t.num_kv_heads // t.num_heads, vocab_size=512)
    scale = TINY_VISION.image_size / cfg.vision.image_size
    pinpoints = tuple((round(h * scale), round(w * scale)) for h, w in cfg.grid_pinpoints)
    return replace(cfg, name=f"{name}-toy", vision=TINY_VISION, text=text, grid_pinpoints=pinpoints)


# How each released checkpoint is stored: one bf16 bin, except V2-7B's two shards + index and
# LLaVA-1.6's safetensors shards.
STORAGE = {"mobilevlm-v2-7b": dict(fmt="bin", shard_bytes=200_000),
           "llava-v1.6-vicuna-7b": dict(fmt="safetensors", shard_bytes=200_000),
           "llava-v1.6-mistral-7b": dict(fmt="safetensors", shard_bytes=200_000)}
ARCHITECTURES = {"mobilevlm": "MobileLlamaForCausalLM", "llava": "LlavaLlamaForCausalLM"}


# LLaVA-NeXT-Video is written in llava-hf's layout only (test_llava_video.py reads it back)
@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("tiny") and not PRESETS[n].video_pool])
def test_round_trip_of_every_preset_layout(tmp_path, name):
    cfg = shrink(name)
    d = write_random_checkpoint(tmp_path / name, cfg, **STORAGE.get(name, {}))
    written = json.loads((d / "config.json").read_text())
    assert written["mm_projector_type"] == PRESETS[name].projector_type
    arch = "LlavaMistralForCausalLM" if "mistral" in name else ARCHITECTURES[cfg.family]
    assert written["architectures"] == [arch]
    if name in STORAGE:
        assert any(d.glob("*.index.json"))
    # LLaVA-1.5 is released without its CLIP tower; the writer puts it beside the checkpoint
    clip = tmp_path / "clip" if cfg.version == "1.5" else None
    ck = read_checkpoint(d, clip)
    assert ck.config.same_shape(cfg)
    assert set(ck.tensors) == set(layout(cfg))
    assert all(t.dtype == torch.bfloat16 for t in ck.tensors.values())
    w = ck.weights()
    assert set(w.projector) == {k.removeprefix("model.mm_projector.") for k in layout(cfg)
                                if k.startswith("model.mm_projector.")}
    assert "vision_model.embeddings.class_embedding" in w.vision


def test_full_size_presets_match_the_reference_numbers():
    # Checkpoint sizes follow from the layouts: V2-1.7B ~1.7B parameters, V2-3B ~3.0B.
    count = lambda n: sum(torch.Size(s).numel() for s in layout(PRESETS[n]).values())
    assert 1.6e9 < count("mobilevlm-v2-1.7b") < 1.8e9
    assert 2.9e9 < count("mobilevlm-v2-3b") < 3.1e9
    assert PRESETS["mobilevlm-v2-3b"].text.head_dim == 80
    assert PRESETS["mobilevlm-v2-7b"].text.rms_norm_eps == 1e-5
    assert PRESETS["mobilevlm-v2-1.7b"].image_tokens == 144


def test_preset_checkpoints_are_named_after_their_preset(tiny_ckpt, tiny_v1_ckpt):
    assert read_checkpoint(tiny_ckpt).config.name == "tiny"
    v1 = read_checkpoint(tiny_v1_ckpt)  # sharded safetensors
    assert v1.config.name == "tiny-v1" and len(v1.weight_files) > 1


def test_3b_lit_gpt_head_count_is_ignored(tmp_path):
    cfg = shrink("mobilevlm-v2-3b")
    d = write_random_checkpoint(tmp_path / "ck", cfg)
    raw = json.loads((d / "config.json").read_text())
    raw.update(n_head=2, n_embd=64, n_query_groups=2, n_layer=2)  # lit-gpt leftovers
    (d / "config.json").write_text(json.dumps(raw))
    assert read_checkpoint(d).config.text.num_heads == cfg.text.num_heads


def test_rotary_inv_freq_from_old_saves_is_ignored(tmp_path, tiny_ckpt):
    d = shutil.copytree(tiny_ckpt, tmp_path / "ck")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    torch.save(sd, d / "pytorch_model.bin")
    ck = read_checkpoint(d)  # an unknown key would fail the layout check
    assert set(ck.tensors) == set(read_checkpoint(tiny_ckpt).tensors)


def _edit(tmp_path, src, *, drop=None, reshape=None, config=None, remove=None):
    d = shutil.copytree(src, tmp_path / "bad")
    if drop or reshape:
        sd = torch.load(d / "pytorch_model.bin", weights_only=True)
        if drop:
            del sd[drop]
        if reshape:
            sd[reshape] = sd[reshape][:-1]
        torch.save(sd, d / "pytorch_model.bin")
    if config:
        raw = json.loads((d / "config.json").read_text())
        raw.update(config)
        (d / "config.json").write_text(json.dumps(raw))
    if remove:
        (d / remove).unlink()
    return d


@pytest.mark.parametrize("edit,message", [
    (dict(drop="model.layers.1.mlp.up_proj.weight"), "missing key model.layers.1.mlp.up_proj.weight"),
    (dict(drop="model.mm_projector.peg.peg.0.bias"), "missing key model.mm_projector.peg.peg.0.bias"),
    (dict(reshape="lm_head.weight"), r"key lm_head.weight has shape \[1023, 128\], expected \[1024, 128\]"),
    (dict(config={"mm_projector_type": "qformer"}), "mm_projector_type 'qformer' is not supported"),
    (dict(config={"num_hidden_layers": 3}), "missing key model.layers.2."),
    (dict(config={"num_hidden_layers": 1}), "unexpected key model.layers.1."),
    (dict(config={"mm_hidden_size": 1024}), "mm_hidden_size 1024 does not match"),
    (dict(remove="tokenizer.model"), "no tokenizer.model"),
    (dict(remove="config.json"), "no config.json"),
    (dict(remove="pytorch_model.bin"), "no weights"),
])
def test_bad_checkpoints_fail_naming_the_problem(tmp_path, tiny_ckpt, edit, message):
    d = _edit(tmp_path, tiny_ckpt, **edit)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(d)


def test_missing_shard_and_corrupt_weights_are_named(tmp_path, tiny_v1_ckpt):
    d = shutil.copytree(tiny_v1_ckpt, tmp_path / "ck")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        read_checkpoint(d)
    (d / shard.name).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"{shard.name}: cannot read weights"):
        read_checkpoint(d)


def test_v1_uses_a_local_clip_directory_when_given(tmp_path, tiny_v1_ckpt):
    from safetensors.torch import save_file
    ck = read_checkpoint(tiny_v1_ckpt)
    stored = ck.weights().vision
    clip = tmp_path / "clip"
    clip.mkdir()
    pristine = {k: (t.float() + 1).contiguous() for k, t in stored.items()}
    pristine["vision_model.embeddings.position_ids"] = torch.arange(65)[None]  # old HF buffer
    pristine["text_model.final_layer_norm.weight"] = torch.ones(8)  # a full CLIPModel save
    save_file(pristine, str(clip / "model.safetensors"))
    w = ck.weights(clip_dir=clip)
    assert w.vision_source == str(clip)
    torch.testing.assert_close(w.vision["vision_model.pre_layrnorm.weight"],
                               stored["vision_model.pre_layrnorm.weight"].float() + 1)
    assert ck.weights().vision_source.endswith("(stored copy)")


def test_v2_always_uses_the_stored_clip_copy(tiny_ckpt, tmp_path):
    assert read_checkpoint(tiny_ckpt).weights(clip_dir=tmp_path).vision_source.endswith("(stored copy)")


def test_upstream_config_fields():
    raw = upstream_config(PRESETS["mobilevlm-v2-1.7b"])
    assert raw["mm_projector_type"] == "ldpnetv2" and raw["num_attention_heads"] == 16
    assert raw["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    assert raw["image_aspect_ratio"] == "pad" and raw["mm_vision_select_layer"] == -2


@pytest.mark.parametrize("spec,factor", [
    (None, 1.0), ({"type": "linear", "factor": 2.0}, 2.0), ({"rope_type": "linear", "factor": 2.5}, 2.5),
    ({"rope_type": "default", "rope_theta": 10000.0}, 1.0),  # transformers 5's rope_parameters without scaling
])
def test_linear_rope_scaling_is_read_in_both_spellings(spec, factor):
    from edgevlm.model.rope_scaling import linear_factor
    assert linear_factor({"rope_scaling": spec}) == factor
    assert linear_factor({"rope_parameters": spec}) == factor


@pytest.mark.parametrize("kind", ["dynamic", "yarn", "llama3"])
def test_other_rope_scaling_is_refused_by_name(kind):
    """Read without its scaling, a model answers wrongly with no error: refuse it instead."""
    from edgevlm.model.rope_scaling import linear_factor
    with pytest.raises(CheckpointError, match=f"rope scaling '{kind}' is not supported"):
        linear_factor({"rope_scaling": {"type": kind, "factor": 4.0}})
