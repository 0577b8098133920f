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
