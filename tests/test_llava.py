"""LLaVA-1.5 and 1.6 on the same pipeline: both checkpoint formats, parity against transformers'
own Llava / LlavaNext models, anyres geometry, templates, export parity, and greedy text served
by a real tritonserver equal to the reference."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from edgevlm.model.checkpoint import CheckpointError, read_checkpoint
from edgevlm.model.mobilevlm import MobileVLM
from edgevlm.model.random_weights import write_random_checkpoint
from edgevlm.presets import IMAGE_TOKEN_INDEX, PINPOINTS_1_6, PRESETS
from edgevlm.runtime import anyres
from edgevlm.runtime.image import preprocess_tiles
from edgevlm.runtime.prompt import build_prompt, tokenize_prompt
from edgevlm.runtime.tokenizer import Tokenizer
from edgevlm.samples import sample_image

FORMATS = ("original", "llava-hf")
MODELS = ("tiny-llava-v1.5", "tiny-llava-v1.6", "tiny-llava-v1.6-34b")  # the last: Yi-34B's chatml twin


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(model, format) -> checkpoint dir, named as the model (what run_llava picks the template
    by); a 1.5 original one has its tower in a `clip` folder beside it."""
    root = tmp_path_factory.mktemp("llava")
    return {(m, f): write_random_checkpoint(root / f / m, PRESETS[m], layout_format=f,
                                            fmt="safetensors" if f == "llava-hf" else "bin", seed=3)
            for m in MODELS for f in FORMATS}


def _read(path):
    return read_checkpoint(path, path.parent / "clip" if (path.parent / "clip").is_dir() else None)


def _photo(w: int, h: int) -> bytes:
    """A real photo cut to w x h (so anyres has a non-square picture to unpad)."""
    img = Image.open(io.BytesIO(sample_image("chelsea"))).convert("RGB").resize((w, h))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- checkpoints ------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_both_formats_read_back_as_the_preset(ckpts, model, fmt):
    d = ckpts[model, fmt]
    raw = json.loads((d / "config.json").read_text())
    ck = _read(d)
    cfg = PRESETS[model]
    assert ck.format == fmt and ck.config.version == cfg.version
    # llava-hf: its own chat template (chat_template.json); original: run_llava's pick by name
    assert (ck.config.vision, ck.config.grid_pinpoints, ck.config.template) == (
        cfg.vision, cfg.grid_pinpoints, "checkpoint" if fmt == "llava-hf" else cfg.template)
    assert (ck.chat_template is not None) == (fmt == "llava-hf")
    from safetensors import safe_open
    if fmt == "llava-hf":
        assert raw["architectures"] == [("LlavaNextForConditionalGeneration" if cfg.version == "1.6"
                                         else "LlavaForConditionalGeneration")]
        # the hub's names on disk, the vocabulary padded past <image> and <pad> to a multiple of 64
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert {"language_model.lm_head.weight", "multi_modal_projector.linear_2.bias",
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"} <= keys
        assert ("image_newline" in keys) == (cfg.version == "1.6")
        assert ck.config.text.vocab_size == 1088 and raw["image_token_index"] == 1024
        assert ck.config.image_aspect == ("anyres" if cfg.version == "1.6" else "crop")  # llava-hf 1.5 crops
    else:
        assert raw["mm_projector_type"] == "mlp2x_gelu" and ck.config.text == cfg.text
        keys = set(torch.load(d / "pytorch_model.bin", weights_only=True, mmap=True))
        # a 1.5 release leaves the tower out; 1.6 stores its fine-tuned one and image_newline
        assert any(k.startswith("model.vision_tower.") for k in keys) == (cfg.version == "1.6")
        assert ("model.image_newline" in keys) == (cfg.version == "1.6")
        assert ck.config.image_aspect == cfg.image_aspect
    w = ck.weights()
    assert set(w.projector) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert (w.image_newline is not None) == (cfg.version == "1.6")


@pytest.mark.unit
def test_the_chatml_twin_holds_its_turn_markers_whole_and_stops_at_im_end(ckpts):
    """LLaVA-1.6-34B's layout: <|im_start|> and <|im_end|> one token each (ids 6 and 7, as Yi's
    tokenizer has them), the answer ending at the config's eos 7, not at </s>."""
    ck = _read(ckpts["tiny-llava-v1.6-34b", "original"])
    assert ck.config.template == "chatml_direct" and ck.config.text.eos_token_id == 7
    tok = Tokenizer(ck.tokenizer_path, ck.config.text.eos_token_id)
    ids = tokenize_prompt(tok, build_prompt("Q", template="chatml_direct"))
    assert ids.count(6) == 3 and ids.count(7) == 2 and ids[-2:] != [7] and tok.stop_ids == {7}
    assert tok.sp.id_to_piece(6) == "<|im_start|>" and tok.sp.id_to_piece(7) == "<|im_end|>"


@pytest.mark.unit
def test_llava_1_5_without_a_clip_directory_says_how_to_give_one(ckpts):
    with pytest.raises(CheckpointError, match="no CLIP vision tower.*CLIP="):
        read_checkpoint(ckpts["tiny-llava-v1.5", "original"])


def _resave(src, dst, rename):
    """A copy of a llava-hf checkpoint with its keys renamed (the other transformers spellings)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    save_file({rename(k): v.contiguous() for k, v in sd.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.unit
def test_every_transformers_key_spelling_reads_the_same(ckpts, tmp_path):
    src = ckpts["tiny-llava-v1.6", "llava-hf"]
    want = read_checkpoint(src).tensors
    spellings = {
        # transformers 5 saves CLIPVisionModel without its vision_model level
        "tf5": lambda k: k.replace("vision_tower.vision_model.", "vision_tower."),
        # transformers 4.52+ hold the LM under model.language_model in memory
        "tf452": lambda k: (k.replace("language_model.model.", "model.language_model.")
                            .replace("language_model.lm_head.", "lm_head.")),
    }
    for name, rename in spellings.items():
        got = read_checkpoint(_resave(src, tmp_path / name, rename)).tensors
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.unit
def test_mobilevlm_reader_accepts_a_tower_saved_without_vision_model(tiny_ckpt, tmp_path):
    d = shutil.copytree(tiny_ckpt, tmp_path / "ck")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    torch.save({k.replace("vision_tower.vision_tower.vision_model.", "vision_tower.vision_tower."): v
                for k, v in sd.items()}, d / "pytorch_model.bin")
    assert set(read_checkpoint(d).tensors) == set(read_checkpoint(tiny_ckpt).tensors)


@pytest.mark.unit
@pytest.mark.parametrize("drop,shape,message", [
    ("multi_modal_projector.linear_2.bias", None, "missing key multi_modal_projector.linear_2.bias"),
    ("image_newline", None, "missing key image_newline"),
    (None, "language_model.model.layers.1.mlp.up_proj.weight",
     r"key language_model.model.layers.1.mlp.up_proj.weight has shape \[343, 128\]"),
])
def test_bad_llava_hf_checkpoints_name_the_key_as_it_is_on_disk(ckpts, tmp_path, drop, shape, message):
    from safetensors.torch import load_file, save_file
    d = shutil.copytree(ckpts["tiny-llava-v1.6", "llava-hf"], tmp_path / "bad")
    sd = load_file(str(d / "model.safetensors"))
    if drop:
        del sd[drop]
    if shape:
        sd[shape] = sd[shape][:-1].contiguous()
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(d)


# --- the reference against transformers ----------------------------------------------------

def _hf_ids(ids, n_image_tokens: int, image_token: int) -> list[int]:
    """Our ids (one IMAGE_TOKEN_INDEX) -> llava-hf's (the <image> id repeated per image token)."""
    out = []
    for t in ids:
        out += [image_token] * n_image_tokens if t == IMAGE_TOKEN_INDEX else [t]
    return out


@pytest.mark.parametrize("model", MODELS)
def test_reference_matches_transformers_llava_models(ckpts, model):
    import transformers
    d = ckpts[model, "llava-hf"]
    ck = read_checkpoint(d)
    cfg = ck.config
    ours = MobileVLM.from_weights(cfg, ck.weights())
    cls = (transformers.LlavaNextForConditionalGeneration if cfg.version == "1.6"
           else transformers.LlavaForConditionalGeneration)
    theirs = cls.from_pretrained(d, dtype=torch.float32).eval()
    tok = Tokenizer(ck.tokenizer_path)
    image_token = json.loads((d / "config.json").read_text())["image_token_index"]
    for w, h in ((260, 150), (120, 200)):  # landscape and portrait: different grids and unpads
        px, size = preprocess_tiles(_photo(w, h), cfg.vision.image_size, cfg.image_aspect, cfg.grid_pinpoints)
        ids = tokenize_prompt(tok, build_prompt("What is in the image?", template=PRESETS[model].template))
        with torch.no_grad():
            feats = ours.image_features(torch.from_numpy(px), size)
            n = feats.shape[0]
            if cfg.version == "1.6":
                v = cfg.vision
                assert n == anyres.token_count(size, cfg.grid_pinpoints, v.image_size, v.grid)
                kw = dict(pixel_values=torch.from_numpy(px)[None], image_sizes=torch.tensor([size]))
            else:
                kw = dict(pixel_values=torch.from_numpy(px))
            hf_ids = torch.tensor([_hf_ids(ids, n, image_token)])
            want = theirs(input_ids=hf_ids, **kw).logits[0, -1]
            x = ours.embed(ids, [feats])
            got, _ = ours.decoder(x, torch.arange(x.shape[1])[None], ours.decoder.empty_cache())
            torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
            greedy = ours.generate(ids, torch.from_numpy(px), image_size=size, max_new_tokens=8, stop_ids=[])
            hf_greedy = theirs.generate(input_ids=hf_ids, **kw, max_new_tokens=8, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)[0, hf_ids.shape[1]:].tolist()
        assert greedy == hf_greedy


# --- anyres and preprocessing --------------------------------------------------------------

# (W, H) -> tokens for the released 1.6 grids; the llava-hf tie convention is pinned in the last
# three rows (the original LLaVA code gives 1176, 976 and 1476 for them: same count for the
# square, different grids for the small ones).
TOKENS_1_6 = [((672, 672), 2928), ((500, 500), 2928), ((1024, 1024), 2928), ((640, 480), 2340),
              ((800, 600), 2340), ((1024, 768), 2340), ((480, 640), 2352), ((1280, 720), 1948),
              ((1920, 1080), 1948), ((899, 1024), 2640), ((1344, 336), 1890), ((336, 1344), 1944),
              ((1008, 336), 2328), ((672, 336), 1752), ((336, 672), 1776), ((500, 334), 1464),
              ((336, 336), 1176), ((300, 200), 1464), ((200, 300), 984)]


@pytest.mark.unit
@pytest.mark.parametrize("size,tokens", TOKENS_1_6)
def test_anyres_token_counts_of_the_released_grids(size, tokens):
    w, h = size
    cfg = PRESETS["llava-v1.6-vicuna-7b"]
    assert anyres.token_count((h, w), PINPOINTS_1_6, 336, 24) == tokens <= cfg.max_image_tokens == 2928
    gh, gw = anyres.grid_shape((h, w), PINPOINTS_1_6, 336)
    feats = np.zeros((1 + gh * gw, 576, 4), np.float32)
    assert anyres.pack(feats, (h, w), PINPOINTS_1_6, 336, np.ones(4, np.float32)).shape == (tokens, 4)


@pytest.mark.unit
def test_pack_puts_a_newline_after_each_unpadded_row_in_reading_order():
    # one 1x2 grid of tiles, 4x4 patches each; a feature's value is 10 * its canvas row + column
    feats = np.zeros((3, 16, 1), np.float32)
    for tile in range(2):
        for r in range(4):
            for c in range(4):
                feats[1 + tile, r * 4 + c, 0] = 10 * r + 4 * tile + c
    newline = np.array([-1.0], np.float32)
    rows = lambda picture: anyres.pack(feats, picture, ((4, 8),), 4, newline)[16:, 0].reshape(-1, 9)  # noqa: E731
    assert rows((4, 8)).tolist() == [[10 * r + c for c in range(8)] + [-1] for r in range(4)]
    # a picture wider than the canvas was padded above and below: only the middle rows hold it
    assert rows((1, 4)).tolist() == [[10 * r + c for c in range(8)] + [-1] for r in (1, 2)]


@pytest.mark.unit
@pytest.mark.parametrize("photo", ["chelsea", "camera", "coffee"])
def test_preprocessing_is_transformers_pixel_for_pixel(photo):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    data = sample_image(photo)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    size = {"shortest_edge": 336}, {"height": 336, "width": 336}
    nxt = LlavaNextImageProcessorPil(image_grid_pinpoints=[list(p) for p in PINPOINTS_1_6], size=size[0],
                                     crop_size=size[1])(images=img, return_tensors="np")
    tiles, hw = preprocess_tiles(data, 336, "anyres", PINPOINTS_1_6)
    assert list(nxt["image_sizes"][0]) == list(hw)
    np.testing.assert_array_equal(tiles, nxt["pixel_values"][0][:len(tiles)])
    crop = CLIPImageProcessorPil(size=size[0], crop_size=size[1])(images=img, return_tensors="np")
    np.testing.assert_array_equal(preprocess_tiles(data, 336, "crop")[0], crop["pixel_values"])


# --- export, parity, serving -----------------------------------------------------------------

# One export per version, one per format between them: 1.5 in the original layout (its tower
# from the CLIP directory), 1.6 in llava-hf's.
EXPORTED = (("tiny-llava-v1.5", "original"), ("tiny-llava-v1.6", "llava-hf"), ("tiny-llava-v1.6-34b", "original"))


@pytest.fixture(scope="module")
def exports(ckpts, tmp_path_factory):
    from edgevlm.export.graphs import export_onnx
    root = tmp_path_factory.mktemp("llava-onnx")
    out = {}
    for model, fmt in EXPORTED:
        d = ckpts[model, fmt]
        clip = d.parent / "clip" if (d.parent / "clip").is_dir() else None
        out[model] = export_onnx(d, root / model, clip_dir=clip, log=lambda m: None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model,fmt", EXPORTED)
def test_export_matches_the_reference(ckpts, exports, model, fmt):
    from edgevlm.export.parity import run_parity
    from edgevlm.manifest import OnnxArtifacts
    d = ckpts[model, fmt]
    clip = d.parent / "clip" if (d.parent / "clip").is_dir() else None
    report = run_parity(d, exports[model], clip_dir=clip, images=["chelsea", "camera"], new_tokens=12,
                        log=lambda m: None)
    assert report.ok(1e-3), report.summary(1e-3)
    m = OnnxArtifacts.open(exports[model]).manifest
    assert m["prompt"]["template"] == ("checkpoint" if fmt == "llava-hf" else PRESETS[model].template)
    assert ("chat_template" in m["files"]) == (fmt == "llava-hf")
    assert m["image"]["max_tokens"] == PRESETS[model].max_image_tokens
    assert ("image_newline" in m["files"]) == (PRESETS[model].image_aspect == "anyres")
    assert m["io"]["vision_encoder"]["outputs"][0]["shape"] == ["batch", 64, 128]  # per tile


@pytest.fixture(scope="module")
def servers(exports, start_server):
    from edgevlm_client import Client
    started = {model: start_server(onnx, max_sequences=2, default_max_tokens=16) for model, onnx in exports.items()}
    try:
        yield {m: Client(s.grpc_url, timeout_s=60) for m, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


@pytest.mark.integration
@pytest.mark.parametrize("model,fmt", EXPORTED)
def test_served_greedy_text_is_the_reference(ckpts, servers, model, fmt):
    ck = _read(ckpts[model, fmt])
    cfg = ck.config
    ref = MobileVLM.from_weights(cfg, ck.weights())
    tok = Tokenizer(ck.tokenizer_path)
    client = servers[model]
    info = client.metadata()
    assert (info.image_tokens_min, info.image_tokens) == (64, cfg.max_image_tokens)
    # served in its checkpoint's template: llava-hf's own chat template, run_llava's pick otherwise
    assert info.template == ("checkpoint" if fmt == "llava-hf" else PRESETS[model].template)
    other = "llava_v0"  # and any other a request names
    for image, history, template in ((_photo(260, 150), [], None), (_photo(120, 200), [("What is it?", "A cat.")], None),
                                     (None, [], None), (_photo(260, 150), [("What is it?", "A cat.")], other)):
        question = "Describe it."
        ids = tokenize_prompt(tok, _upstream_prompt(ck, question, image is not None, history, template))
        size = px = None
        if image is not None:
            px, size = preprocess_tiles(image, cfg.vision.image_size, cfg.image_aspect, cfg.grid_pinpoints)
            px = torch.from_numpy(px)
        want = ref.generate(ids, px, image_size=size, max_new_tokens=12, vocab=tok.vocab_size)
        r = client.generate(question, image=image, history=history, max_tokens=12, template=template)
        assert r.text == tok.decode(want), (image is not None, history, template)
        v = cfg.vision
        tokens = 0 if image is None else (anyres.token_count(size, cfg.grid_pinpoints, v.image_size, v.grid)
                                          if cfg.version == "1.6" else 64)
        assert r.stats["image_tokens"] == tokens
        assert r.stats["prefill_tokens"] == len(ids) + max(tokens - 1, 0)


@pytest.mark.integration
@pytest.mark.parametrize("model,fmt", EXPORTED)
def test_several_images_each_at_its_place_equal_the_reference(ckpts, servers, model, fmt):
    """Two pictures in one request: both before the question when no placeholder says where,
    or one in a history turn and one in the question where placeholders put them."""
    ck = _read(ckpts[model, fmt])
    cfg = ck.config
    ref = MobileVLM.from_weights(cfg, ck.weights())
    tok = Tokenizer(ck.tokenizer_path)
    pictures = [_photo(260, 150), sample_image("camera")]
    tiles = [preprocess_tiles(p, cfg.vision.image_size, cfg.image_aspect, cfg.grid_pinpoints) for p in pictures]
    px, sizes = [torch.from_numpy(t) for t, _ in tiles], [s for _, s in tiles]
    for question, history in (("Compare them.", []), ("<image>\nAnd this one?", [("<image>\nWhat is it?", "A cat.")])):
        placed = "<image>" in question
        ids = tokenize_prompt(tok, _upstream_prompt(ck, question, 0 if placed else 2, history))
        assert ids.count(IMAGE_TOKEN_INDEX) == 2
        want = ref.generate(ids, px, image_size=sizes, max_new_tokens=12, vocab=tok.vocab_size)
        # the second picture is seen: the same request with the first one twice answers otherwise
        assert want != ref.generate(ids, [px[0], px[0]], image_size=[sizes[0]] * 2, max_new_tokens=12,
                                    vocab=tok.vocab_size)
        r = servers[model].generate(question, image=pictures, history=history, max_tokens=12)
        assert r.text == tok.decode(want), (question, history)
        assert r.stats["images"] == 2 and r.stats["prefill_tokens"] == len(ids) - 2 + r.stats["image_tokens"]
    # the same two again: both from the image cache
    r = servers[model].generate("Compare them.", image=pictures, max_tokens=2)
    assert r.stats["image_cached"] and r.stats["image_encode_ms"] == 0


def _upstream_prompt(ck, question: str, image: int, history, template: str | None = None, system=None) -> str:
    """The prompt upstream builds: a llava-hf checkpoint's chat template rendered by transformers,
    else LLaVA's conversation layout (`template`, or the checkpoint's)."""
    if ck.chat_template and template is None:
        from transformers.utils.chat_template_utils import render_jinja_template

        from edgevlm.runtime.chat_template import conversation
        rendered = render_jinja_template([conversation(question, images=image, history=history, system=system)],
                                         chat_template=ck.chat_template, add_generation_prompt=True)
        return rendered[0][0]
    return build_prompt(question, image=image, history=history, system=system, template=template or ck.config.template)


@pytest.mark.integration
def test_bad_templates_and_images_are_refused_in_one_line(servers):
    from edgevlm_client import InvalidRequest
    v15, v16 = servers["tiny-llava-v1.5"], servers["tiny-llava-v1.6"]
    photo = _photo(260, 150)
    with pytest.raises(InvalidRequest, match="unknown prompt template 'chatml'; known: vicuna_v1"):
        v15.generate("Hi", template="chatml", max_tokens=2)
    with pytest.raises(InvalidRequest, match="template and raw_prompt exclude each other"):
        v15.generate("USER: Hi ASSISTANT:", raw_prompt=True, template="llava_v0", max_tokens=2)
    with pytest.raises(InvalidRequest, match="the conversation has 1 <image> placeholder.s. for 2 image"):
        v15.generate("<image>\nCompare.", image=[photo, photo], max_tokens=2)
    with pytest.raises(InvalidRequest, match="the conversation has 1 <image> placeholder.s. for 0 image"):
        v15.generate("What is <image>?", max_tokens=2)
    with pytest.raises(InvalidRequest, match="image 2: cannot decode"):
        v15.generate("Compare.", image=[photo, b"\x89PNG\r\n\x1a\n broken"], max_tokens=2)
    # eight anyres pictures are more positions than the tiny model's context
    with pytest.raises(InvalidRequest, match=r"prompt is \d+ tokens \(\d+ of them its images'\), the context holds"):
        v16.generate("Compare.", image=[photo] * 8, max_tokens=2)
    for server in (v15, v16):  # still serving
        assert server.generate("Hi", image=photo, max_tokens=2).stats["images"] == 1


@pytest.mark.unit
def test_prompt_ids_follow_the_upstream_path_for_every_format(ckpts, exports, tiny_onnx, tiny_ckpt):
    """Our served ids for a conversation with history and a system line: the upstream prompt
    (LLaVA's layout, or the checkpoint's chat template rendered by transformers) through
    upstream's tokenizer_image_token (each chunk between images tokenized on its own, later
    BOS dropped)."""
    from edgevlm.model.checkpoint import read_checkpoint
    from edgevlm.runtime.requests import Preprocessor
    cases = [(read_checkpoint(tiny_ckpt), tiny_onnx)] + [(_read(ckpts[m, f]), exports[m]) for m, f in EXPORTED]
    for ck, onnx_dir in cases:
        pre = Preprocessor(onnx_dir)
        for image, history, system in ((True, [("What is it?", "A cat.")], "Be brief."), (False, [], None)):
            want = tokenize_prompt(Tokenizer(ck.tokenizer_path),
                                   _upstream_prompt(ck, "Describe it.", image, history, system=system))
            assert pre.prompt_ids("Describe it.", int(image), history, system) == want, ck.path


@pytest.mark.unit
def test_tensorrt_profiles_hold_a_whole_anyres_picture(exports):
    from edgevlm.engines.profiles import decoder_profiles, vision_profiles
    from edgevlm.manifest import OnnxArtifacts
    art = OnnxArtifacts.open(exports["tiny-llava-v1.6"])
    (images,) = vision_profiles(art)
    assert images.shapes["pixel_values"] == ((1, 3, 112, 112), (5, 3, 112, 112), (5, 3, 112, 112))
    prefill = decoder_profiles(art)[0]
    assert prefill.shapes["inputs_embeds"][1][1] == PRESETS["tiny-llava-v1.6"].max_image_tokens + 56
