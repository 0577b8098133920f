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


@pytest.mark.parametrize("total,frames", [(12, 4), (100, 8), (8, 8), (31, 32), (5, 3), (1000, 32)])
def test_frames_are_taken_where_transformers_video_processors_take_them(total, frames):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    from edgevlm.runtime.video import sample_indices
    want = (default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=10), num_frames=frames).tolist()
            if frames <= total else list(range(total)))  # theirs refuses more frames than the clip has
    assert sample_indices(total, frames) == want


@torch.no_grad()
def test_the_original_layout_reads_exports_and_prompts_as_llava_next(ckpt, models, tmp_path):
    """lmms-lab's layout (LLaVA-NeXT's repository): the LLaVA-1.6 keys with the tower inside,
    a `spatial_pool` resampler in config.json, no <video> token (a clip takes the <image>
    index). It reads to the llava-hf copy's tensors (but the rows llava-hf adds to the
    vocabulary); the prompt is the 7B demo's vicuna_v1 layout; the exported video encoder
    equals the reference's pooled frames."""
    from edgevlm.export.graphs import export_onnx
    from edgevlm.runtime.intake import open_video_encoder
    from edgevlm.runtime.prompt import TEMPLATES
    from edgevlm.runtime.requests import Preprocessor
    original = write_random_checkpoint(tmp_path / "LLaVA-NeXT-Video-7B", CFG, layout_format="original", seed=5)
    raw = json.loads((original / "config.json").read_text())
    assert (raw["architectures"], raw["mm_resampler_type"], raw["mm_spatial_pool_stride"]) == (
        ["LlavaLlamaForCausalLM"], "spatial_pool", 2)
    ck = read_checkpoint(original)
    assert (ck.config.video_pool, ck.config.text.rope_linear_factor, ck.config.template, ck.chat_template) == (
        2, 2.0, "vicuna_v1", None)
    hf_tensors, vocab = models[0].tensors, ck.config.text.vocab_size
    assert {k: v.shape for k, v in ck.tensors.items()} == {  # but the rows llava-hf adds
        k: (vocab, *v.shape[1:]) if k in ("model.embed_tokens.weight", "lm_head.weight") else v.shape
        for k, v in hf_tensors.items()}
    onnx_dir = export_onnx(original, tmp_path / "onnx", log=lambda m: None)
    ids = Preprocessor(onnx_dir)(None, "What happens here?", video=write_clip(), frames=4).input_ids.tolist()
    layout = TEMPLATES["vicuna_v1"]
    text = f"{layout.system}{layout.sep}{layout.roles[0]}: <image>\nWhat happens here?{layout.sep}{layout.roles[1]}:"
    assert ids == tokenize_prompt(Tokenizer(ck.tokenizer_path), text)
    frames = _frames()
    got, _ = open_video_encoder(onnx_dir)(frames.numpy())
    want = MobileVLM.from_weights(ck.config, ck.weights()).video_features(frames).reshape(got.shape).numpy()
    assert abs(got - want).max() < 1e-4


# --- served: a clip through tritonserver --------------------------------------------------

def write_clip(names=FRAMES, fmt: str = "mp4", codec: str = "libx264", repeat: int = 3) -> bytes:
    """A clip made with PyAV from photos, each held `repeat` frames at 10 fps."""
    import io

    import av
    from PIL import Image
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for name in names:
            frame = av.VideoFrame.from_image(Image.open(io.BytesIO(sample_image(name))).convert("RGB").resize((160, 120)))
            for _ in range(repeat):
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


@pytest.fixture(scope="module")
def onnx_dir(ckpt, tmp_path_factory):
    from edgevlm.export.graphs import export_onnx
    return export_onnx(ckpt, tmp_path_factory.mktemp("video-onnx") / "onnx", log=lambda m: None)


def test_a_quantized_export_keeps_its_video_encoder(onnx_dir, tmp_path):
    """`make quantize` writes the video encoder's int8 form (gated by its cosine to FP32) and
    the server runs it; an export of a video model without one is refused, not read as
    pictures."""
    import numpy as np

    from edgevlm.export.quantize import quantize_export
    from edgevlm.manifest import OnnxArtifacts
    from edgevlm.runtime.intake import open_video_encoder
    out = tmp_path / "onnx-int4"
    quantize_export(onnx_dir, out, "int4", log=lambda m: None)
    manifest = OnnxArtifacts.open(out).manifest
    assert manifest["files"]["video_encoder_cpu"] == "video_encoder.cpu.onnx"
    assert manifest["quantization"]["video_encoder"]["cpu_form"]["embedding_cosine"] >= 0.98
    frames = _frames().numpy()
    (want, _), (got, _) = open_video_encoder(onnx_dir)(frames), open_video_encoder(out)(frames)
    assert got.shape == want.shape == (len(FRAMES), CFG.frame_tokens, CFG.text.hidden_size)
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() >= 0.98 and not np.array_equal(got, want)  # the int8 form, close to FP32
    del manifest["files"]["video_encoder_cpu"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="pools a clip's frames, but the export has no video encoder"):
        open_video_encoder(out)


@pytest.fixture(scope="module")
def video_server(onnx_dir, start_server):
    server = start_server(onnx_dir, max_sequences=2, default_max_tokens=16)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(video_server):
    from edgevlm_client import Client
    return Client(video_server.grpc_url, timeout_s=60)


@pytest.mark.integration
@torch.no_grad()
def test_served_answers_about_a_clip_equal_the_reference(onnx_dir, models, served):
    from edgevlm.runtime.requests import Preprocessor
    from edgevlm.runtime.video import decode_clip
    ck, ours, _ = models
    tok = Tokenizer(ck.tokenizer_path)
    clip, photo = write_clip(), sample_image("astronaut")
    pictures, _ = decode_clip(clip, 4, 50_000_000)  # frames 0, 3, 6, 9: one of each photo
    frames = torch.cat([torch.from_numpy(preprocess_tiles(p, CFG.vision.image_size, "crop")[0]) for p in pictures])
    px, size = preprocess_tiles(photo, CFG.vision.image_size, CFG.image_aspect, CFG.grid_pinpoints)
    video, image = ours.video_features(frames), ours.image_features(torch.from_numpy(px), size)
    pre = Preprocessor(onnx_dir)
    for images, embeds in (([], [video]), ([photo], [image, video])):  # a clip; a picture, then the clip
        ids = pre([*images], "What happens here?", video=clip, frames=4).input_ids.tolist()
        parts = [{"type": "image"}] * len(images) + [{"type": "video"}]
        text = ChatTemplate(ck.chat_template, {}).render(
            [{"role": "user", "content": parts + [{"type": "text", "text": "What happens here?"}]}])
        assert ids == tokenize_prompt(tok, text)  # the checkpoint's template, <video> where it puts it
        want = ours.generate(ids, embeds=embeds, max_new_tokens=12, vocab=tok.vocab_size)
        r = served.generate("What happens here?", image=images or None, video=clip, video_frames=4, max_tokens=12)
        assert r.text == tok.decode(want), len(images)
        assert (r.stats["frames"], r.stats["frame_tokens"], r.stats["images"]) == (4, CFG.frame_tokens, len(images))
        assert r.stats["image_tokens"] == 4 * CFG.frame_tokens + (image.shape[0] if images else 0)
    # the same clip again comes from the image cache; at another frame count it does not
    again = served.generate("What happens here?", video=clip, video_frames=4, max_tokens=2)
    assert again.stats["image_cached"] and again.stats["image_encode_ms"] == 0
    fewer = served.generate("What happens here?", video=clip, video_frames=2, max_tokens=2)
    assert not fewer.stats["image_cached"] and fewer.stats["frames"] == 2


@pytest.mark.integration
def test_bad_clips_are_refused_in_one_line_and_the_server_keeps_serving(served, client):
    from edgevlm_client import InvalidRequest
    clip = write_clip(("chelsea", "coffee"))
    for data, reason in ((b"RIFF....AVI not really", "video: (cannot decode|the file holds no video stream)"),
                         (clip[: len(clip) // 3], "video: (cannot decode|no frames)"),
                         (sample_image("chelsea"), "video: a still image .jpeg.; send it as an image")):
        with pytest.raises(InvalidRequest, match=reason):
            served.generate("What happens?", video=data, max_tokens=2)
    with pytest.raises(InvalidRequest, match=r"video_frames must be in \[1, 32\]"):
        served.generate("What happens?", video=clip, video_frames=33, max_tokens=2)
    with pytest.raises(InvalidRequest, match="the conversation has 0 <video> placeholder"):
        served.generate("<image>\nWhat happens?", image=sample_image("chelsea"), video=clip, max_tokens=2)
    webm = write_clip(("camera", "coffee"), fmt="webm", codec="libvpx-vp9")
    assert served.generate("What happens?", video=webm, max_tokens=2).stats["frames"] == 6  # every frame of a short clip
    assert client.generate("Hi", max_tokens=2).text is not None and served.generate("Hi", max_tokens=2).text


@pytest.mark.integration
@torch.no_grad()
def test_a_model_without_a_video_mode_reads_a_clips_frames_as_pictures(tiny_ckpt, tiny_onnx, client):
    """MobileVLM: each sampled frame prepared and encoded as a picture, the frames one after
    another at the <video> placeholder; equal to the reference fed those pictures, and the
    frames are seen (reversed, they answer otherwise)."""
    from edgevlm.runtime.requests import Preprocessor
    from edgevlm.runtime.video import decode_clip
    ck = read_checkpoint(tiny_ckpt)
    ours, tok = MobileVLM.from_weights(ck.config, ck.weights()), Tokenizer(ck.tokenizer_path)
    clip = write_clip()
    pictures, _ = decode_clip(clip, 4, 50_000_000)
    px = torch.cat([torch.from_numpy(preprocess_tiles(p, ck.config.vision.image_size, ck.config.image_aspect)[0])
                    for p in pictures])
    ids = Preprocessor(tiny_onnx)(None, "What happens here?", video=clip, frames=4).input_ids.tolist()
    assert ids.count(IMAGE_TOKEN_INDEX) == 1  # one placeholder: the clip's
    answers = [tok.decode(ours.generate(ids, embeds=[ours.video_features(x)], max_new_tokens=12,
                                        vocab=tok.vocab_size)) for x in (px, px.flip(0))]
    assert answers[0] != answers[1]
    r = client.generate("What happens here?", video=clip, video_frames=4, max_tokens=12)
    assert r.text == answers[0]
    assert (r.stats["frames"], r.stats["frame_tokens"], r.stats["image_tokens"]) == (
        4, ck.config.image_tokens, 4 * ck.config.image_tokens)


@pytest.mark.integration
def test_a_video_url_through_the_openai_sdk_equals_the_grpc_client(video_server, served, start_gateway, tmp_path):
    """A data: URL, and a file the gateway was allowed to read (--video-dir); nothing else."""
    import base64

    import openai
    clip = write_clip()
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "door.mp4").write_bytes(clip)
    (tmp_path / "secret.mp4").write_bytes(clip)
    base = start_gateway(video_server.grpc_url, "--video-dir", str(tmp_path / "clips"))
    sdk = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    want = served.generate("Did the door open?", video=clip, video_frames=4, max_tokens=12)
    for url in ("data:video/mp4;base64," + base64.b64encode(clip).decode(), str(tmp_path / "clips" / "door.mp4")):
        r = sdk.chat.completions.create(model=CFG.name, max_tokens=12, extra_body={"video_frames": 4}, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "Did the door open?"}]}])
        assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.prompt_tokens
    for url, status in ((str(tmp_path / "secret.mp4"), 400), ("data:video/mp4;base64,@@@", 400)):
        with pytest.raises(openai.BadRequestError, match="video_url"):
            sdk.chat.completions.create(model=CFG.name, max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "Hi"}]}])


@pytest.mark.integration
def test_watch_asks_about_the_last_seconds_as_a_clip(served, video_server, tmp_path):
    """`edgevlm-client watch --clip-seconds`: a camera's last second (here a file played at its
    rate) sent as a clip; and the client library makes a clip from a list of frames."""
    import asyncio

    from edgevlm_client import AsyncClient
    from edgevlm_client.watch import watch
    path = tmp_path / "door.mp4"
    path.write_bytes(write_clip(repeat=5))  # 20 frames at 10 fps: 2 s

    async def run():
        async with AsyncClient(video_server.grpc_url) as client:
            return [line async for line in watch(client, str(path), ["Did the door open?"], clip_seconds=1.0,
                                                 max_frames=1, max_tokens=4)]
    (line,) = asyncio.run(run())
    assert line["frame"] >= 7 and line["stats"]["frames"] >= 4 and line["stats"]["images"] == 0
    r = served.generate("What happens?", video=[sample_image(n) for n in FRAMES], max_tokens=4)
    assert r.stats["frames"] == len(FRAMES)
