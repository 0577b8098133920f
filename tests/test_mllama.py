"""Llama-3.2-Vision (mllama), the parts that stand today: the checkpoint as released and as
transformers 5 re-saves it, the image tiling, the tokenizer and chat template, and the PyTorch
reference model, each held against transformers' own implementation on a tiny random-weight
checkpoint written in the released layout. The exported graphs and serving come next."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgevlm.model.canonical import CheckpointError
from edgevlm.model.mllama import Mllama
from edgevlm.model.mllama_checkpoint import read_mllama, write_random_mllama
from edgevlm.presets import MLLAMA_PRESETS
from edgevlm.runtime.chat_template import ChatTemplate, conversation
from edgevlm.runtime.tiles import preprocess
from edgevlm.runtime.tokenizer import BPETokenizer
from edgevlm.samples import sample_image

transformers = pytest.importorskip("transformers")
CFG = MLLAMA_PRESETS["tiny-mllama"]


def photo(name: str = "chelsea", box=None) -> Image.Image:
    img = Image.open(io.BytesIO(sample_image(name))).convert("RGB")
    return img.crop(box) if box else img


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_mllama(tmp_path_factory.mktemp("mllama") / "tiny-mllama", CFG, seed=3)


def transformers_mllama(ckpt):
    """transformers' model and processor (PIL image backend) for a checkpoint directory."""
    from transformers import AutoTokenizer, MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import MllamaProcessor
    model = MllamaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    proc = MllamaProcessor(image_processor=MllamaImageProcessorPil.from_pretrained(ckpt), tokenizer=tok,
                           chat_template=read_mllama(ckpt).chat_template)
    return model, proc


@pytest.fixture(scope="module")
def theirs(ckpt):
    return transformers_mllama(ckpt)


@pytest.fixture(scope="module")
def ours(ckpt):
    ck = read_mllama(ckpt)
    return Mllama.from_weights(ck.config, ck.weights())


def _inputs(proc, messages, images):
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    return proc(images=images or None, text=text, return_tensors="pt", add_special_tokens=False)


def _ours(model: Mllama, inp, steps: int = 8):
    ids = inp["input_ids"][0].tolist()
    if "pixel_values" not in inp:
        return model.generate(ids, max_new_tokens=steps, vocab=CFG.text.vocab_size)
    return model.generate(ids, inp["pixel_values"][0:1, 0], inp["aspect_ratio_ids"][0], inp["aspect_ratio_mask"][0],
                          max_new_tokens=steps, vocab=CFG.text.vocab_size)


CASES = {
    "landscape photo": (lambda: [photo()], conversation("What is in the image?", images=1)),
    "portrait crop": (lambda: [photo("astronaut", (100, 0, 260, 400))], conversation("Describe it.", images=1)),
    "follow-up": (lambda: [photo("coffee")], conversation("And the colour?", images=1,
                                                           history=[("What is this?", "A cup of coffee.")])),
    "text only": (lambda: [], conversation("Name three colours.")),
}


@pytest.mark.parametrize("case", CASES)
def test_the_reference_matches_transformers_token_for_token(case, ours, theirs):
    model, proc = theirs
    images, messages = CASES[case]
    inp = _inputs(proc, messages, images())
    tokens, logits = _ours(ours, inp)
    with torch.no_grad():
        want = model(**inp).logits[0, -1, :CFG.text.vocab_size]
        greedy = model.generate(**inp, max_new_tokens=len(tokens), do_sample=False, min_new_tokens=len(tokens))
    assert (logits[0, :CFG.text.vocab_size] - want).abs().max().item() < 1e-4
    assert tokens == greedy[0, inp["input_ids"].shape[1]:].tolist()


def test_the_picture_changes_what_the_model_says(ours, theirs):
    """Random weights with a zero gate would hide the image; these gates are not zero."""
    _, proc = theirs
    messages = conversation("What is in the image?", images=1)
    a = _ours(ours, _inputs(proc, messages, [photo("chelsea")]), 1)[1][0]
    b = _ours(ours, _inputs(proc, messages, [photo("coffee")]), 1)[1][0]
    assert (a - b).abs().max().item() > 1e-2


SHAPES = [(300, 451), (451, 300), (56, 56), (56, 168), (168, 56), (60, 500), (500, 60), (112, 112), (100, 250),
          (250, 100), (57, 113), (40, 30), (224, 224), (90, 400), (400, 90), (56, 112), (112, 56), (100, 200),
          (200, 100)]


def test_tiling_is_pixel_exact_for_every_arrangement(ckpt):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    ip = MllamaImageProcessorPil.from_pretrained(ckpt)
    ratios = set()
    for h, w in SHAPES:
        img = photo().resize((w, h))
        want = ip(images=[[img]], return_tensors="np")
        pixels, ratio, mask = preprocess(img, CFG.vision)
        assert ratio == int(want["aspect_ratio_ids"][0, 0]), (h, w)
        np.testing.assert_array_equal(mask, want["aspect_ratio_mask"][0, 0])
        np.testing.assert_allclose(pixels, want["pixel_values"][0, 0], atol=1e-6, err_msg=f"{h}x{w}")
        ratios.add(ratio)
    assert ratios == set(range(1, len(CFG.vision.supported_aspect_ratios) + 1))  # every arrangement seen


def test_tokenizer_and_chat_template_give_transformers_ids(ckpt, theirs):
    _, proc = theirs
    ck = read_mllama(ckpt)
    tok = BPETokenizer(ck.tokenizer_path, CFG.text.vocab_size, CFG.stop_token_ids)
    template = ChatTemplate(ck.chat_template, ck.tokenizer_config)
    for messages in [c[1] for c in CASES.values()] + [conversation("Hi", system="Answer briefly.")]:
        text = template.render(messages)
        assert text == proc.apply_chat_template(messages, add_generation_prompt=True)
        assert tok.encode(text, add_bos=False) == proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tok.token_id("<|image|>") == CFG.image_token_id


def test_the_chat_template_renders_tools_as_transformers_does(ckpt, theirs):
    _, proc = theirs
    ck = read_mllama(ckpt)
    template = ChatTemplate(ck.chat_template, ck.tokenizer_config)
    tools = [{"type": "function", "function": {"name": "move_to", "description": "Drive to a shelf", "parameters": {
        "type": "object", "properties": {"shelf": {"type": "integer"}}, "required": ["shelf"]}}}]
    for messages in (conversation("Go to shelf 3.", images=1), conversation("Go.", history=[("Where?", "Here.")])):
        ours = template.render(messages, tools=tools)
        assert ours == proc.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        assert '"name": "move_to"' in ours and template.renders_tools


def test_both_key_spellings_read_to_the_same_weights(ckpt, tmp_path):
    t5 = write_random_mllama(tmp_path / "t5", CFG, seed=3, spelling="transformers5")
    a, b = read_mllama(ckpt), read_mllama(t5)
    assert (a.spelling, b.spelling) == ("released", "transformers5")
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_shards_hold_the_weights_one_file_holds(ckpt, tmp_path):
    # the 11B is written shard by shard (never whole in memory), as released: five files
    sharded = write_random_mllama(tmp_path / "sharded", CFG, seed=3, shard_bytes=200_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    a, b = read_mllama(ckpt), read_mllama(sharded)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_a_damaged_checkpoint_names_the_key_as_its_files_spell_it(tmp_path):
    from safetensors.torch import load_file, save_file
    t5 = write_random_mllama(tmp_path / "t5", CFG, seed=1, spelling="transformers5")
    files = sorted(t5.glob("*.safetensors"))
    tensors = load_file(files[0])
    key = next(k for k in tensors if k.startswith("model.language_model.") and "cross_attn" in k)
    del tensors[key]
    save_file(tensors, files[0], metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        read_mllama(t5)
    cfg = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(CheckpointError, match="not 'mllama'"):
        read_mllama(t5)
