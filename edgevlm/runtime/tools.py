"""Tool calls: functions a request offers the model, and the calls it answers with.

A robot's actions are calls ("move_to(shelf=3)"); a program asks for them as OpenAI does:
`tools` (function definitions whose parameters are JSON Schemas), a `tool_choice` (none, auto,
required, or one function by name) and whether several calls may come at once.

The model is told the functions and the answer's form in its system line, and the grammar
machinery holds it to that form: a call is the JSON array

    [{"name": "<function>", "arguments": {...}}, ...]

whose arguments validate against that function's schema (one call unless parallel calls are
allowed; a named function is called once). `required` and a named function allow only that array; `auto` lets the model choose
at its first token between the array and free text (which cannot start with "[", "{" or a blank),
so a call is never half-formed and plain text is never taken for one. The finished answer is
read back into calls with ids; nothing the model writes outside the grammar is parsed.

A checkpoint whose own chat template renders tools (the Llama 3 family's) is told them by that
template instead, and answers in the form it was trained on, one call as the object
{"name": "<function>", "parameters": {...}} (style "object"); the grammar follows that form.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from edgevlm_client.contract import MAX_TOOLS, TOOL_CHOICES

from edgevlm.runtime.errors import BadRequest
from edgevlm.runtime.grammar import COMPACT

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
STYLES = {"array": ("[", "arguments"), "object": ("{", "parameters")}  # style -> (a call's first character, its key)


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class Toolset:
    functions: tuple[Function, ...]
    choice: str  # "auto", "required", or a function's name ("none" makes no Toolset)
    parallel: bool
    style: str = "array"  # STYLES: our array of calls, or a chat template's one call object

    def prompt(self) -> str:
        """What the system line adds: the functions and the form of a call."""
        listed = "\n".join(json.dumps({"name": f.name, "description": f.description, "parameters": f.parameters},
                                      separators=(",", ":")) for f in self.functions)
        many = "one or more calls" if self.parallel else "one call"
        when = {"auto": "When a function helps, answer with", "required": "Answer with"}.get(
            self.choice, f"Answer with a call of {self.choice}:")
        return (f"You can call these functions:\n{listed}\n{when} {many} as a JSON array "
                '[{"name": <function name>, "arguments": <its arguments>}] and nothing else.')

    def listed(self) -> list[dict]:
        """The functions as OpenAI's `tools` list (what a chat template that renders tools takes)."""
        return [{"type": "function", "function": {"name": f.name, "description": f.description,
                                                  "parameters": f.parameters}} for f in self.functions]

    def schema(self) -> dict:
        """The JSON Schema of a call answer."""
        key = STYLES[self.style][1]
        chosen = [f for f in self.functions if self.choice in ("auto", "required") or f.name == self.choice]
        calls = [{"type": "object", "properties": {"name": {"const": f.name}, key: closed(f.parameters)},
                  "required": ["name", key], "additionalProperties": False} for f in chosen]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.style == "object":
            return one
        return {"type": "array", "minItems": 1, **({} if self.parallel else {"maxItems": 1}), "items": one}

    def grammar(self) -> str:
        """The answer's grammar (llguidance's Lark): the call array, or with `auto` either it or text."""
        # without blanks between keys, as every JSON answer here (grammar.COMPACT)
        calls = "calls: %json " + json.dumps({**self.schema(), "x-guidance": COMPACT}, separators=(",", ":"))
        if self.choice == "auto":  # free text: anything that opens no call, in either style
            text = r"/[^\[{\s][\s\S]*/"
            return f"start: calls | text\n{calls}\ntext: {text}\n"
        return f"start: calls\n{calls}\n"

    def read(self, answer: str) -> list[dict] | None:
        """The calls a finished answer holds ({"id", "name", "arguments": JSON text}), or None
        for a text answer."""
        opener, key = STYLES[self.style]
        if not answer.startswith(opener):
            return None
        try:
            calls = json.loads(answer)
        except json.JSONDecodeError:  # cut short by max_tokens: no call is made of half a one
            return None
        return [{"id": "call_" + uuid.uuid4().hex[:24], "name": c["name"],
                 "arguments": json.dumps(c[key], ensure_ascii=False)} for c in (calls if opener == "[" else [calls])]


def closed(schema):
    """The schema with every object that does not say otherwise closed to its own properties
    (OpenAI's strict mode does the same): a call with just those still validates against the
    original, and a model cannot wander into invented keys until max_tokens cuts the call."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in ("items", "anyOf", "oneOf", "allOf", "not", "additionalItems", "prefixItems")
           else {n: closed(s) for n, s in v.items()} if k in ("properties", "$defs", "definitions") and isinstance(v, dict)
           else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def parse_tools(tools_json: str, choice: str | None, parallel: bool | None, style: str = "array") -> Toolset | None:
    """The request's tools input (OpenAI's `tools` list, JSON), checked; None when no call may
    be made (no tools, or tool_choice "none"). style: how the model calls (STYLES)."""
    try:
        tools = json.loads(tools_json)
    except (json.JSONDecodeError, RecursionError):
        raise BadRequest("tools is not JSON (a list of {\"type\": \"function\", \"function\": {...}})") from None
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise BadRequest(f"tools must be a list of 1 to {MAX_TOOLS} function definitions")
    functions = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not _NAME.match(f["name"]):
            raise BadRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": "
                             "1-64 letters, digits, _ or -, ...}}")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON Schema object")
        description = f.get("description") or ""
        if not isinstance(description, str):
            raise BadRequest(f"tools[{i}].function.description must be a string")
        functions.append(Function(f["name"], description, params))
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise BadRequest("tools: two functions have the same name")
    choice = choice or "auto"
    if choice == "none":
        return None
    if choice not in TOOL_CHOICES and choice not in names:
        raise BadRequest(f"tool_choice {choice!r} is none of {', '.join(TOOL_CHOICES)} and names no function in tools")
    # A named function is one call of it (OpenAI forces "the function", and a program asking for
    # one structured object, as instructor does, wants exactly one).
    return Toolset(tuple(functions), choice, choice in TOOL_CHOICES and parallel is not False and style == "array",
                   style)
