"""Conversation templates, as LLaVA's conversation.py lays out the prompts its models were
trained on, and tokenization around the image placeholder.

Four separator styles cover every template a LLaVA or MobileVLM checkpoint is run with:

  two      vicuna_v1 (MobileVLM's `v1`, LLaVA-1.5's evaluations), llava_v1:
           "<system> USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:"
  single   llava_v0: "<system>###Human: <image>\nQ###Assistant:"
  llama_2  mistral_instruct, llava_llama_2: "[INST] <<SYS>>\n<system>\n<</SYS>>\n\n<image>\nQ [/INST] A </s>"
           (the system block only when there is a system line; llava_llama_2 opens each later
           turn with "<s>")
  mpt      chatml_direct (LLaVA-1.6-34B), mpt:
           "<|im_start|>system\n<system><|im_end|><|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\n"

Which one a checkpoint gets is decided when it is read (model/checkpoint.py template_for, by
LLaVA's run_llava rule); a checkpoint with its own chat template (llava-hf) is rendered with it
instead (chat_template.py). A request or `make repo TEMPLATE=` may pick any of these by name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# "<image>", and "<video>" (LLaVA-NeXT-Video's clip: its frames' tokens go there)
from edgevlm_client.contract import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

from edgevlm.presets import IMAGE_TOKEN_INDEX

SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
SYSTEM_LLAVA_LLAMA_2 = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")
STOP_STRING = "</s>"
CHATML_SYSTEM = "<|im_start|>system\n{}"
CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")


@dataclass(frozen=True)
class Template:
    name: str
    style: str  # two | single | llama_2 | mpt
    system: str  # the default system line, as the request's `system` input replaces it
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    system_format: str = "{}"  # how the system line is written into the prompt

    def render(self, turns: list[tuple[str, str | None]], system: str) -> str:
        """(question, answer) turns, the last answer None: the prompt the model continues."""
        if self.style != "llama_2":
            # two, single, mpt: "<system><sep>" then "<role>: <message><sep>" per message (mpt's
            # roles carry their own newline, no ": "); two ends an answer with sep2
            colon = "" if self.style == "mpt" else ": "
            after_answer = self.sep2 if self.style == "two" else self.sep
            out = self.system_format.format(system) + self.sep
            for q, a in turns:
                out += f"{self.roles[0]}{colon}{q}{self.sep}"
                out += f"{self.roles[1]}{colon}{a}{after_answer}" if a is not None else self.roles[1] + colon.rstrip()
            return out
        # llama_2: each question inside [INST] ... [/INST] after `sep`, each answer followed by
        # " sep2"; the system block opens the first question; the leading `sep` is stripped
        out = ""
        for i, (q, a) in enumerate(turns):
            if i == 0 and system:
                q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}"
            out += f"{self.sep}[INST] {q} [/INST]"
            if a is not None:
                out += f" {a} {self.sep2}"
        return out.lstrip(self.sep) if self.sep else out


TEMPLATES = {t.name: t for t in (
    Template("vicuna_v1", "two", SYSTEM_V1),
    Template("llava_v1", "two", SYSTEM_LLAVA_V1),
    Template("llava_v0", "single", SYSTEM_LLAVA_V1, roles=("Human", "Assistant"), sep="###", sep2=""),
    Template("mistral_instruct", "llama_2", "", sep=""),
    Template("llava_llama_2", "llama_2", SYSTEM_LLAVA_LLAMA_2, sep="<s>"),
    Template("chatml_direct", "mpt", "Answer the questions.", roles=CHATML_ROLES, sep="<|im_end|>", sep2="",
             system_format=CHATML_SYSTEM),
    Template("mpt", "mpt", "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful "
             "and honest answers.", roles=CHATML_ROLES, sep="<|im_end|>", sep2="", system_format=CHATML_SYSTEM),
)}


def template_named(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}") from None


def build_prompt(question: str, *, image: bool | int = True, history: Sequence[tuple[str, str]] = (),
                 system: str | None = None, template: str = "vicuna_v1", video: int = 0) -> str:
    """The prompt for `question`, after earlier (question, answer) turns, in `template`.

    The image (or `image` images), if any, belongs to the first user turn, as "<image>\n"
    before its text (as run_llava and LLaVA's CLI put it); placeholders already written into
    the turns stay where they are. system None is the template's own line.
    """
    t = template_named(template)
    turns = [*history, (question, None)]
    if image or video:  # images, then the clip
        opening = (IMAGE_PLACEHOLDER + "\n") * int(image) + (VIDEO_PLACEHOLDER + "\n") * video
        turns[0] = (opening + turns[0][0], turns[0][1])
    return t.render(turns, t.system if system is None else system)


CHECKPOINT = "checkpoint"  # the template name that stands for the checkpoint's own chat template


def check_template(name: str, has_chat_template: bool) -> str:
    """`name` if a model with (or without) a chat template can lay prompts out in it."""
    if name == CHECKPOINT:
        if not has_chat_template:
            raise ValueError("template 'checkpoint': this model's checkpoint has no chat template; known: "
                             + ", ".join(TEMPLATES))
        return name
    template_named(name)
    return name


class Layouts:
    """The prompt layouts a served model offers: its default (the manifest's, or `make repo
    TEMPLATE=`) and any other a request names; `checkpoint` is the checkpoint's chat template
    where the export has one."""

    def __init__(self, default: str, chat=None):
        """chat: the checkpoint's chat_template.ChatTemplate, or None."""
        self.chat = chat
        self.default = self.check(default)

    def check(self, name: str) -> str:
        return check_template(name, self.chat is not None)

    def system(self, name: str) -> str | None:
        """The layout's own system line (None: a chat template's own choice)."""
        return None if name == CHECKPOINT else template_named(name).system

    def render(self, name: str, question: str, images: int, history: Sequence[tuple[str, str]],
               system: str | None, videos: int = 0) -> str:
        if name == CHECKPOINT:
            from edgevlm.runtime.chat_template import conversation
            return self.chat.render(conversation(question, images=images, history=history, system=system,
                                                 videos=videos))
        return build_prompt(question, image=images, history=history, system=system, template=name, video=videos)


_PLACEHOLDERS = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}")


def placeholders(prompt: str) -> list[str]:
    """The prompt's image and video placeholders, in order."""
    return _PLACEHOLDERS.findall(prompt)


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Ids with IMAGE_TOKEN_INDEX where "<image>" (or a clip's "<video>") was.

    As upstream: the chunks between placeholders are tokenized separately, each with its own
    BOS and dummy-prefix space; the first BOS stays and later ones are dropped. So the tokens
    next to the image differ from tokenizing the whole string, and parity depends on this.
    """
    chunks = [tokenizer.encode(c) for c in _PLACEHOLDERS.split(prompt)]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[1:])
    return ids
