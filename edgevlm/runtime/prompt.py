"""Conversation templates (LLaVA's conversation.py, as its models were trained) and
tokenization around the image placeholder.

  vicuna_v1         MobileVLM, LLaVA-1.5: "<system> USER: <image>\nQ ASSISTANT:"
  llava_v1          LLaVA-1.6 vicuna: the same, with the "human" system line
  mistral_instruct  LLaVA-1.6 mistral: "[INST] <image>\nQ [/INST]", no system line by default
"""

from __future__ import annotations

from collections.abc import Sequence

from edgevlm.presets import IMAGE_TOKEN_INDEX

SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
ROLES = ("USER", "ASSISTANT")
SEPS = (" ", "</s>")  # separator style TWO: after a user turn, after an assistant turn
IMAGE_PLACEHOLDER = "<image>"
STOP_STRING = "</s>"

# template -> its default system line
TEMPLATES = {"vicuna_v1": SYSTEM_V1, "llava_v1": SYSTEM_LLAVA_V1, "mistral_instruct": ""}


def default_system(template: str) -> str:
    try:
        return TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}") from None


def build_prompt(question: str, *, image: bool = True, history: Sequence[tuple[str, str]] = (),
                 system: str | None = None, template: str = "vicuna_v1") -> str:
    """The prompt for `question`, after earlier (question, answer) turns, in `template`.

    The image, if any, belongs to the first user turn, as "<image>\n" before its text.
    system None is the template's own line.
    """
    system = default_system(template) if system is None else system
    turns = [*history, (question, None)]
    if image:
        turns[0] = (IMAGE_PLACEHOLDER + "\n" + turns[0][0], turns[0][1])
    if template == "mistral_instruct":
        return _llama2_style(system, turns)
    out = system + SEPS[0]
    for q, a in turns:
        out += f"{ROLES[0]}: {q}{SEPS[0]}"
        out += f"{ROLES[1]}: {a}{SEPS[1]}" if a is not None else f"{ROLES[1]}:"
    return out


def _llama2_style(system: str, turns) -> str:
    """LLaVA's LLAMA_2 separator style (sep "", sep2 "</s>"): each question wrapped in
    [INST] ... [/INST], each answer followed by " </s>"; a system line, if any, opens the first
    question inside <<SYS>> markers."""
    out = ""
    for i, (q, a) in enumerate(turns):
        if i == 0 and system:
            q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}"
        out += f"[INST] {q} [/INST]"
        if a is not None:
            out += f" {a} {SEPS[1]}"
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
