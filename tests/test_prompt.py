"""The `v1` template strings and tokenization around the image placeholder."""

from __future__ import annotations

import pytest

from edgevlm.presets import IMAGE_TOKEN_INDEX
from edgevlm.runtime.prompt import build_prompt, tokenize_prompt
from edgevlm.runtime.tokenizer import Tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer(tiny_ckpt / "tokenizer.model")


def test_single_turn_with_image_is_the_upstream_string():
    assert build_prompt("What is in the image?") == (
        SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT:")


def test_multi_turn_closes_answers_with_eos_and_keeps_the_image_in_turn_one():
    p = build_prompt("And?", history=[("What is in the image?", "A cat.")])
    assert p == SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: And? ASSISTANT:"


def test_text_only_prompt_has_no_placeholder():
    assert build_prompt("Hi", image=False) == SYSTEM + " USER: Hi ASSISTANT:"


def test_tokenizer_has_llama_special_ids_and_byte_fallback(tok):
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.sp.id_to_piece(13) == "<0x0A>"  # newline, as in LLaMA's vocabulary
    text = "Grüße, 東京! 123"
    assert tok.decode(tok.encode(text)) == text


def test_image_placeholder_splits_the_prompt_into_separately_tokenized_chunks(tok):
    prompt = build_prompt("What is in the image?")
    ids = tokenize_prompt(tok, prompt)
    before, after = prompt.split("<image>")
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids.count(tok.bos_id) == 1
    assert ids == tok.encode(before) + [IMAGE_TOKEN_INDEX] + tok.encode(after)[1:]
    # Each chunk gets SentencePiece's dummy-prefix space: the text after the image starts
    # with a lone "▁" and then the newline byte, as upstream's LLaMA tokenizer gives [29871, 13].
    k = ids.index(IMAGE_TOKEN_INDEX)
    assert [tok.sp.id_to_piece(i) for i in ids[k + 1:k + 3]] == ["\u2581", "<0x0A>"]


def test_eos_string_in_history_becomes_the_eos_id(tok):
    ids = tokenize_prompt(tok, build_prompt("And?", history=[("Q", "A cat.")]))
    k = ids.index(tok.eos_id)
    assert tok.sp.id_to_piece(ids[k + 1]).startswith("\u2581U")  # "USER" restarts with a prefix
    assert tok.decode(ids[k + 1:]).startswith("USER: And?")


def test_text_only_prompt_tokenizes_without_placeholder(tok):
    ids = tokenize_prompt(tok, build_prompt("Hi", image=False))
    assert IMAGE_TOKEN_INDEX not in ids and ids[0] == tok.bos_id


# LLaVA's conversation.py, as its get_prompt lays each template out: a two-turn conversation
# about an image with a system line of the request's own (None: the template's).
HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
         "detailed, and polite answers to the human's questions.")
UPSTREAM = {
    ("vicuna_v1", None): SYSTEM + " USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:",
    ("llava_v1", None): HUMAN + " USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:",
    ("llava_v1", "Be brief."): "Be brief. USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:",
    ("llava_v0", None): HUMAN + "###Human: <image>\nQ###Assistant: A###Human: Q2###Assistant:",
    ("mistral_instruct", None): "[INST] <image>\nQ [/INST] A </s>[INST] Q2 [/INST]",
    ("mistral_instruct", "Be brief."): "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nQ [/INST] A </s>[INST] Q2 [/INST]",
    ("llava_llama_2", None): ("[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to "
                              "understand the visual content that the user provides, and assist the user with a "
                              "variety of tasks using natural language.\n<</SYS>>\n\n<image>\nQ [/INST] A "
                              "</s><s>[INST] Q2 [/INST]"),
    ("chatml_direct", None): ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ"
                              "<|im_end|><|im_start|>assistant\nA<|im_end|><|im_start|>user\nQ2<|im_end|>"
                              "<|im_start|>assistant\n"),
    ("chatml_direct", "Be brief."): ("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<image>\nQ<|im_end|>"
                                     "<|im_start|>assistant\nA<|im_end|><|im_start|>user\nQ2<|im_end|>"
                                     "<|im_start|>assistant\n"),
    ("mpt", None): ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant "
                    "gives helpful and honest answers.<|im_end|><|im_start|>user\n<image>\nQ<|im_end|>"
                    "<|im_start|>assistant\nA<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"),
}


@pytest.mark.parametrize("template,system", list(UPSTREAM))
def test_every_template_lays_out_a_conversation_as_upstream_does(template, system):
    assert build_prompt("Q2", history=[("Q", "A")], system=system, template=template) == UPSTREAM[template, system]


@pytest.mark.parametrize("path,template", [
    ("/models/llava-v1.5-7b", "llava_v1"),
    ("/models/llava-v1.6-vicuna-13b", "llava_v1"),
    ("/models/llava-v1.6-mistral-7b", "mistral_instruct"),
    ("/models/llava-v1.6-34b", "chatml_direct"),
    ("/models/llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
    ("/models/LLaVA-Lightning-MPT-7B-preview", "mpt"),
    ("/models/LLaVA-13b-delta", "llava_v0"),
    ("/runs/llava-v1.5-13b/checkpoint-5000", "llava_v1"),   # a training checkpoint: its run's name counts
    ("/work/artifacts/llava-v1.5-7b/checkpoint", "llava_v1"),  # ours: artifacts/<name>/checkpoint
    ("/work/artifacts/my-finetune/checkpoint", "llava_v0"),
])
def test_run_llavas_rule_picks_the_template_by_the_models_name(path, template):
    from pathlib import Path

    from edgevlm.model.checkpoint import run_llava_name, run_llava_template
    assert run_llava_template(run_llava_name(Path(path))) == template


def test_every_llava_preset_names_what_run_llava_picks_for_it():
    from pathlib import Path

    from edgevlm.model.checkpoint import run_llava_name, run_llava_template
    from edgevlm.presets import PRESETS
    for name, cfg in PRESETS.items():
        if cfg.video_pool:  # LLaVA-NeXT-Video is read in llava-hf's layout: its chat template serves it
            continue
        want = run_llava_template(run_llava_name(Path("/models") / name)) if cfg.family == "llava" else "vicuna_v1"
        assert cfg.template == want, name


def test_layouts_name_what_they_know():
    from edgevlm.runtime.prompt import Layouts
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'; known: vicuna_v1, llava_v1"):
        Layouts("chatml")
    with pytest.raises(ValueError, match="has no chat template"):
        Layouts("checkpoint")
    layouts = Layouts("llava_v0")
    assert layouts.render("llava_v0", "Q", 0, [], None) == HUMAN + "###Human: Q###Assistant:"
    assert layouts.system("mistral_instruct") == "" and layouts.system("llava_v0") == HUMAN
