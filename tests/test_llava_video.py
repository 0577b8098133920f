"""LLaVA-NeXT-Video's reference against transformers' own LlavaNextVideoForConditionalGeneration,
on a tiny random checkpoint in llava-hf's layout: a clip, a still image (anyres, as LLaVA-1.6)
and text only give the same last-position logits and the same greedy tokens; the clip is seen
(its frames in another order answer otherwise)."""

from __future__ import annotations

import json

import pytest
import torch

from edgevlm.model.checkpoint import read_checkpoint
from edgevlm.model.mobilevlm import MobileVLM
from edgevlm.model.random_weights import write_random_checkpoint
from edgevlm.presets import IMAGE_TOKEN_INDEX, PRESETS
from edgevlm.runtime.chat_template import ChatTemplate
from edgevlm.runtime.image import preprocess_tiles
from edgevlm.runtime.prompt import tokenize_prompt
from edgevlm.runtime.tokenizer import Tokenizer
from edgevlm.samples import sample_image

transformers = pytest.importorskip("transformers")
CFG = PRESETS["tiny-llava-next-video"]
FRAMES = ("chelsea", "coffee", "astronaut", "camera")  # four "frames" of a clip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("video") / "tiny-llava-next-video", CFG,
                                   layout_format="llava-hf", fmt="safetensors", seed=5)


@pytest.fixture(scope="module")
def models(ckpt):
    ck = read_checkpoint(ckpt)
    ours = MobileVLM.from_weights(ck.config, ck.weights())
    theirs = transformers.LlavaNextVideoForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    return ck, ours, theirs


def _frames() -> torch.Tensor:
    return torch.cat([torch.from_numpy(preprocess_tiles(sample_image(n), CFG.vision.image_size, "crop")[0])
                      for n in FRAMES])


def _prompt_ids(ck, kind: str | None) -> list[int]:
    """The checkpoint's chat template, a video or image part before the question; both
    placeholders become our one placeholder id."""
    parts = [{"type": kind}] if kind else []
    messages = [{"role": "user", "content": parts + [{"type": "text", "text": "What happens here?"}]}]
    text = ChatTemplate(ck.chat_template, {}).render(messages).replace("<video>", "<image>")
    return tokenize_prompt(Tokenizer(ck.tokenizer_path), text)


def _hf_ids(ids: list[int], token: int, n: int) -> torch.Tensor:
    out = []
    for t in ids:
        out += [token] * n if t == IMAGE_TOKEN_INDEX else [t]
    return torch.tensor([out])


def test_the_checkpoint_reads_back_as_the_preset(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    ck = read_checkpoint(ckpt)
    c = ck.config  # its vocabulary padded past the added tokens, as llava-hf's is
    assert (c.vision, c.grid_pinpoints, c.video_pool, c.frame_tokens, c.text.vocab_size) == (
        CFG.vision, CFG.grid_pinpoints, 2, 16, 1088)
    assert raw["architectures"] == ["LlavaNextVideoForConditionalGeneration"]
    assert (raw["video_token_index"], raw["image_token_index"]) == (1024, 1025)  # <video> first, as released
    assert ck.config.template == "checkpoint" and "<video>" in ck.chat_template


@torch.no_grad()
def test_a_clip_an_image_and_text_give_transformers_logits_and_tokens(ckpt, models):
    ck, ours, theirs = models
    raw = json.loads((ckpt / "config.json").read_text())
    vocab = Tokenizer(ck.tokenizer_path).vocab_size
    frames = _frames()
    photo = sample_image("astronaut")
    px, size = preprocess_tiles(photo, CFG.vision.image_size, CFG.image_aspect, CFG.grid_pinpoints)
    image = ours.image_features(torch.from_numpy(px), size)
    cases = {
        "clip": ("video", [ours.video_features(frames)], raw["video_token_index"], {"pixel_values_videos": frames[None]}),
        "image": ("image", [image], raw["image_token_index"],
                  {"pixel_values": torch.from_numpy(px)[None], "image_sizes": torch.tensor([size])}),
        "text only": (None, None, 0, {}),
    }
    for name, (kind, embeds, token, kw) in cases.items():
        ids = _prompt_ids(ck, kind)
        hf_ids = _hf_ids(ids, token, 0 if embeds is None else embeds[0].shape[0])
        want = theirs(input_ids=hf_ids, **kw).logits[0, -1]
        x = ours.embed(ids, embeds)
        got, _ = ours.decoder(x, torch.arange(x.shape[1])[None], ours.decoder.empty_cache())
        torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4, msg=name)
        greedy = ours.generate(ids, embeds=embeds, max_new_tokens=8, stop_ids=[])  # over every row, as theirs
        hf_greedy = theirs.generate(input_ids=hf_ids, **kw, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, hf_ids.shape[1]:].tolist()
        assert greedy == hf_greedy, name
    # the clip is seen: its frames in reverse order answer otherwise
    ids = _prompt_ids(ck, "video")
    forward = ours.generate(ids, embeds=[ours.video_features(frames)], max_new_tokens=8, stop_ids=[], vocab=vocab)
    backward = ours.generate(ids, embeds=[ours.video_features(frames.flip(0))], max_new_tokens=8, stop_ids=[],
                             vocab=vocab)
    assert forward != backward


def test_the_original_layout_is_not_written_for_it(tmp_path):
    with pytest.raises(ValueError, match="llava-hf layout only"):
        write_random_checkpoint(tmp_path / "x", CFG, layout_format="original")
