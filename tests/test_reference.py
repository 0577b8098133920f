"""The PyTorch reference against transformers' CLIP and LLaMA, and the projector specs."""

from __future__ import annotations

import pytest
import torch

from edgevlm.model.checkpoint import layout, read_checkpoint
from edgevlm.presets import PRESETS
from edgevlm.model.mobilevlm import MobileVLM, sample
from edgevlm.model.projector import LDPProjector, LDPv2Projector

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    ckpt = read_checkpoint(tiny_ckpt)
    weights = ckpt.weights()
    return ckpt.config, weights, MobileVLM.from_weights(ckpt.config, weights)


def test_vision_tower_matches_transformers_clip(tiny):
    cfg, weights, model = tiny
    v = cfg.vision
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu",
        layer_norm_eps=v.layer_norm_eps, attn_implementation="eager"))
    sd = {k: t.float() for k, t in weights.vision.items()}
    if "embeddings.class_embedding" in hf.state_dict():  # transformers 5 drops the prefix
        sd = {k.removeprefix("vision_model."): t for k, t in sd.items()}
    hf.load_state_dict(sd, strict=True)
    px = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        want = hf(px, output_hidden_states=True).hidden_states[v.select_layer][:, 1:]
        got = model.vision.tower(px)
    assert got.shape == (2, v.num_patches, v.hidden_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decoder_matches_transformers_llama_with_kv_cache(tiny):
    cfg, weights, model = tiny
    t = cfg.text
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, max_position_embeddings=t.max_position,
        rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=False, attn_implementation="eager"))
    hf.load_state_dict({k: v.float() for k, v in weights.llm.items()}, strict=True)
    hf.eval()
    ids = torch.randint(3, t.vocab_size, (1, 12))
    embeds = model.decoder.model.embed_tokens(ids)
    with torch.no_grad():
        want = hf(input_ids=ids).logits[0]  # every position in one pass
        # ours: prefill 9 tokens, then 3 single-token steps through the KV cache
        logits, past = model.decoder(embeds[:, :9], torch.arange(9)[None], model.decoder.empty_cache())
        torch.testing.assert_close(logits[0], want[8], atol=1e-4, rtol=1e-4)
        for i in range(9, 12):
            logits, past = model.decoder(embeds[:, i:i + 1], torch.tensor([[i]]), past)
            torch.testing.assert_close(logits[0], want[i], atol=1e-4, rtol=1e-4)
    assert past[0][0].shape == (1, t.num_kv_heads, 12, t.head_dim)


def test_static_cache_decoder_matches_the_growing_cache(tiny):
    """The fixed-capacity cache, written at position_ids[:, 0], gives the concat cache's logits,
    also for a chunk written mid-sequence; a write past the capacity is refused."""
    from edgevlm.model.llama import kv_cache_update
    cfg, _, model = tiny
    d = model.decoder
    x = torch.randn(1, 14, cfg.text.hidden_size)
    with torch.no_grad():
        want, grown = d(x, torch.arange(14)[None], d.empty_cache())
        _, cache = d(x[:, :6], torch.arange(6)[None], d.static_cache(16), static=True)
        _, cache = d(x[:, 6:13], torch.arange(6, 13)[None], cache, static=True)
        got, cache = d(x[:, 13:], torch.tensor([[13]]), cache, static=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[1][1][:, :, :14], grown[1][1])
    assert cache[0][0].shape[2] == 16 and not cache[0][0][:, :, 14:].any()
    with pytest.raises(IndexError, match="outside its 16 slots"):
        kv_cache_update(cache[0][0], torch.ones(1, cfg.text.num_kv_heads, 3, cfg.text.head_dim),
                        torch.tensor([14]))


@pytest.mark.parametrize("name", list(PRESETS))
def test_reference_modules_have_exactly_the_checkpoint_keys(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = MobileVLM(cfg)
    want = layout(cfg)
    got = {"model.mm_projector." + k: tuple(p.shape) for k, p in model.vision.projector.state_dict().items()}
    got |= {k: tuple(p.shape) for k, p in model.decoder.state_dict().items()}
    got |= {"model.vision_tower.vision_tower." + k: tuple(p.shape)
            for k, p in model.vision.tower.state_dict().items()}
    if hasattr(model, "image_newline"):  # LLaVA-1.6
        got["model.image_newline"] = tuple(model.image_newline.shape)
    # The tower is built only up to the selected layer; the rest are in the checkpoint only.
    unused = {k for k in want if k not in got}
    assert all(".post_layernorm." in k or f".layers.{cfg.vision.layers_used}." in k
               or any(f".layers.{i}." in k for i in range(cfg.vision.layers_used, cfg.vision.num_layers))
               for k in unused)
    assert {k: want[k] for k in got} == got


@pytest.mark.parametrize("cls,dim,count", [(LDPProjector, 2048, 18_936_832), (LDPProjector, 2560, 28_913_920),
                                           (LDPProjector, 4096, 71_428_096), (LDPv2Projector, 2048, 6_316_032),
                                           (LDPv2Projector, 2560, 9_205_760), (LDPv2Projector, 4096, 21_020_672)])
def test_projector_parameter_counts_match_upstream(cls, dim, count):
    with torch.device("meta"):
        p = cls(1024, dim, 24)
    assert sum(t.numel() for t in p.parameters()) == count


@pytest.mark.parametrize("cls", [LDPProjector, LDPv2Projector])
def test_projectors_quarter_the_grid(cls):
    p = cls(32, 48, 24)
    assert p(torch.randn(2, 576, 32)).shape == (2, 144, 48)


def test_ldpv2_equals_upstreams_adaptive_pool_form():
    """Upstream LDPv2 is MLP -> AdaptiveAvgPool2d(grid / 2) -> PEG residual; ours writes the
    pool as a fixed 2x2 window for the export. Same weights, same tokens."""
    p = LDPv2Projector(32, 48, 24)
    x = torch.randn(2, 576, 32)
    m = p.mlp.mlp(x).transpose(1, 2).reshape(2, 48, 24, 24)
    m = torch.nn.functional.adaptive_avg_pool2d(m, (12, 12))
    want = (p.peg.peg(m) + m).flatten(2).transpose(1, 2)
    torch.testing.assert_close(p(x), want)


def test_generation_stops_at_eos_and_splices_image(tiny):
    cfg, _, model = tiny
    px = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids = [1, 5, 6, -200, 7]
    x = model.embed(ids, model.vision(px))
    assert x.shape == (1, len(ids) - 1 + cfg.image_tokens, cfg.text.hidden_size)
    first = model.generate(ids, px, max_new_tokens=1)[0]
    # Using the first greedy token as the stop id must end generation right there.
    assert model.generate(ids, px, max_new_tokens=8, stop_ids=[first]) == [first]
    with pytest.raises(ValueError, match="more image placeholders"):
        model.embed([1, -200, -200], model.vision(px))


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    draw = lambda seed: [sample(logits, 1.0, 1.0, 2, torch.Generator().manual_seed(seed)) for _ in range(20)]
    assert draw(3) == draw(3)
    assert set(draw(4)) <= {1, 2}
    assert sample(logits, 0.0, 1.0, 0, None) == 1
    # top_p that the first token alone reaches keeps only it
    assert {sample(torch.tensor([9.0, 0.0, 0.0]), 1.0, 0.5, 0, torch.Generator().manual_seed(s))
            for s in range(10)} == {0}
