"""A checkpoint's own chat template (Jinja), rendered as transformers' `apply_chat_template`
renders it, so a prompt is the one the model card's users get.

The environment is the one transformers builds: a sandbox (templates are the checkpoint's
code, not ours), `trim_blocks` and `lstrip_blocks`, the loop-controls extension, `tojson`
without HTML escaping, `raise_exception`, `strftime_now` and sandboxed `namespace` objects;
the template sees `messages`, `add_generation_prompt`, `tools` and the tokenizer's special
tokens (`bos_token` ...). A template that raises is a bad request, said in one line.
"""

from __future__ import annotations

import json
from datetime import datetime

from edgevlm.runtime.errors import BadRequest

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where an export keeps a checkpoint's chat template


def _raise(message: str):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace

        class _Namespace(Namespace):  # no dunder attributes through a namespace, as transformers'
            def __setitem__(self, name, value):
                if isinstance(name, str) and name.startswith("_"):
                    raise ValueError(f"a template cannot set {name!r} on a namespace")
                super().__setitem__(name, value)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                           namespace=_Namespace)
        self.template = env.from_string(source)
        self.renders_tools = "tools" in source  # it reads the `tools` it is given
        self.special_tokens = {k: v for k, v in special_tokens.items() if isinstance(v, str)}

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        from jinja2.exceptions import TemplateError
        try:
            return self.template.render(messages=messages, tools=tools, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except TemplateError as e:
            raise BadRequest(f"the chat template refused the conversation: {e}") from None


def conversation(question: str, images: int = 0, history=(), system: str | None = None, videos: int = 0) -> list[dict]:
    """OpenAI-style messages for a question after (question, answer) turns; the images (then
    the clips) belong to the first user turn, before its text, as content parts {"type":
    "image"} ({"type": "video"})."""
    messages = [{"role": "system", "content": system}] if system else []
    turns = [*history, (question, None)]
    for i, (q, a) in enumerate(turns):
        parts = [{"type": "image"}] * images + [{"type": "video"}] * videos if i == 0 else []
        messages.append({"role": "user", "content": parts + [{"type": "text", "text": q}]})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return messages
