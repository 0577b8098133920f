"""Conversation template `v1` (vicuna_v1) and tokenization around the image placeholder."""

from __future__ import annotations

from collections.abc import Sequence

from edgevlm.presets import IMAGE_TOKEN_INDEX

SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = ("USER", "ASSISTANT")
SEPS = (" ", "</s>")  # separator style TWO: after a user turn, after an assistant turn
IMAGE_PLACEHOLDER = "<image>"
STOP_STRING = "</s>"


def build_prompt(question: str, *, image: bool = True,
                 history: Sequence[tuple[str, str]] = (), system: str = SYSTEM_V1) -> str:
    """The `v1` prompt for `question`, after earlier (question, answer) turns.

    The image, if any, belongs to the first user turn, as "<image>\\n" before its text.
    """
    turns = [*history, (question, None)]
    out = system + SEPS[0]
    for i, (q, a) in enumerate(turns):
        if i == 0 and image:
            q = IMAGE_PLACEHOLDER + "\n" + q
        out += f"{ROLES[0]}: {q}{SEPS[0]}"
        out += f"{ROLES[1]}: {a}{SEPS[1]}" if a is not None else f"{ROLES[1]}:"
    return out


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Ids with IMAGE_TOKEN_INDEX where "<image>" was.

    As upstream: the chunks between placeholders are tokenized separately, each with its own
    BOS and dummy-prefix space; the first BOS stays and later ones are dropped. So the tokens
    next to the image differ from tokenizing the whole string, and parity depends on this.
    """
    chunks = [tokenizer.encode(c) for c in prompt.split(IMAGE_PLACEHOLDER)]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[1:])
    return ids
