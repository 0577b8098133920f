"""The OpenAI chat-completions API in terms of this model: request parsing and checking,
response and stream-chunk shapes, errors in OpenAI's shape. No I/O here (see gateway.py).

The model takes one image per conversation, in its first user turn; earlier turns become
the `history` input and system messages replace the template's system line. Tool calls: a
request's `tools` go to the model as they are (it answers with calls its grammar guarantees);
in the history an assistant's calls are the JSON array the model writes them as, and a tool's
result is a user turn naming the function.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from dataclasses import dataclass, field

from edgevlm_client import errors
from edgevlm_client.contract import BY_NAME, IMAGE_PLACEHOLDER, MAX_IMAGES, VIDEO_PLACEHOLDER, value_reason

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4
MAX_N = 8  # answers per request: each is a stream of the model's batch (its max_sequences, 8 by default)
_DATA_URL = {kind: re.compile(rf"data:({kind}/[\w.+-]+)?(;[\w-]+=[\w.-]+)*;base64,", re.ASCII)
             for kind in ("image", "video")}


BUSY_RETRY_AFTER_S = 1  # a decode step frees slots within seconds even on a CPU


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# The server's reasons begin with the field at fault; OpenAI's error names it in `param`.
_PARAMS = {"tools": "tools", "tool_choice": "tool_choice", "parallel_tool_calls": "parallel_tool_calls",
           "response_format": "response_format", "min_tokens": "min_tokens", "prompt": "messages",
           "history": "messages", "system": "messages", "image": "messages"}


def from_client_error(e: errors.EdgeVLMError) -> APIError:
    """The client library's typed errors as HTTP statuses."""
    if isinstance(e, errors.InvalidRequest):
        field_ = re.match(r"[a-z_]+", str(e))
        return APIError(400, str(e), param=_PARAMS.get(field_.group() if field_ else ""))
    if isinstance(e, errors.ServerBusy):  # the model is full: come back shortly
        return APIError(429, f"model server busy: {e}", type="server_error", code="server_busy",
                        headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})
    if isinstance(e, errors.ServerUnavailable):
        return APIError(503, f"model server unavailable: {e}", type="server_error", code="server_unavailable")
    if isinstance(e, errors.Timeout):
        return APIError(504, f"model server timed out: {e}", type="server_error", code="timeout")
    return APIError(500, f"model server error: {e}", type="server_error")


@dataclass
class ChatRequest:
    model: str
    question: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None
    image_urls: list[str] = field(default_factory=list)  # data: URLs or, where allowed, http(s); in order
    video_url: str | None = None  # a clip: a data: URL or, where allowed, a file the gateway may read
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # answers asked for: choices 0 .. n-1
    options: dict = field(default_factory=dict)  # the client's keyword options (max_tokens, seed, stop ...)


def _type_error(param: str, want: str) -> APIError:
    return APIError(400, f"'{param}' must be {want}", param=param)


def _content(message: dict, i: int) -> tuple[str, list[str], list[str]]:
    """A message's text, its image URLs and its video URLs (vLLM's and trtllm-serve's
    `video_url` part)."""
    content = message.get("content")
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content, [], []
    if not isinstance(content, list):
        raise _type_error(param, "a string or a list of content parts")
    texts, media = [], {"image_url": [], "video_url": []}
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in media:
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise _type_error(f"{param}[{j}].{kind}.url", "a string")
            media[kind].append(url)
        else:
            raise APIError(400, f"unsupported content part {kind!r} (this model reads 'text', 'image_url' and "
                           "'video_url')", param=f"{param}[{j}]")
    return "\n".join(texts), media["image_url"], media["video_url"]


def parse_chat_request(body) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _type_error("model", "a model id (GET /v1/models lists it)")
    for name, why in (("functions", "the deprecated function calls (use tools)"), ("audio", "audio output")):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported: this model does not do {why}", param=name)
    n = body.get("n", 1)
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise APIError(400, f"'n' must be an integer in [1, {MAX_N}], got {n!r}", param="n")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty list")
    system: list[str] = []
    turns: list[list] = []  # [role, text], consecutive messages of one role merged
    images: list[str] = []
    calls: dict[str, str] = {}  # tool call id -> function name, from the assistant turns
    videos: list[str] = []
    placed: list[tuple[int, int, int]] = []  # (turn, images and clips its messages carried)
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise APIError(400, f"messages[{i}]: role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        if role == "assistant" and m.get("tool_calls"):
            _append(turns, "assistant", _calls_text(m["tool_calls"], i, calls))
            continue
        if role == "tool":
            call = m.get("tool_call_id")
            if call not in calls:
                raise APIError(400, f"messages[{i}]: tool_call_id {call!r} answers no tool call of an earlier "
                               "assistant message", param=f"messages[{i}].tool_call_id")
            text, _, _ = _content(m, i)
            _append(turns, "user", f"Result of {calls[call]}: {text}")
            continue
        text, urls, clips = _content(m, i)
        if clips and role != "user":
            raise APIError(400, f"messages[{i}]: a video goes in a user message", param=f"messages[{i}].content")
        if role in ("system", "developer"):
            if urls:
                raise APIError(400, f"messages[{i}]: images go in a user message", param=f"messages[{i}].content")
            system.append(text)
            continue
        if urls and role != "user":
            raise APIError(400, f"messages[{i}]: images go in a user message", param=f"messages[{i}].content")
        images.extend(urls)
        videos.extend(clips)
        _append(turns, role, text)
        if urls or clips:
            placed.append((len(turns) - 1, len(urls), len(clips)))
    if len(images) > MAX_IMAGES:
        raise APIError(400, f"{len(images)} images, over the {MAX_IMAGES} a request may hold", param="messages")
    if len(videos) > 1:
        raise APIError(400, f"{len(videos)} videos: a request holds one clip", param="messages")
    if len(images) > 1 or videos:  # each at a placeholder opening its message's turn (contract IMAGES)
        for k, n_images, n_videos in placed:
            turns[k][1] = (IMAGE_PLACEHOLDER + "\n") * n_images + (VIDEO_PLACEHOLDER + "\n") * n_videos + turns[k][1]
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise APIError(400, "the conversation must start and end with a user message", param="messages")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]

    options = {}
    # OpenAI's name -> the contract's; each value checked as sent (a huge integer is refused,
    # never wrapped or overflowed into a 500)
    for name, param in (("max_completion_tokens", "max_tokens"), ("max_tokens", "max_tokens"),
                        ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                        ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
                        # vLLM's and TensorRT-LLM's names, which benchmark clients (aiperf) send
                        ("min_tokens", "min_tokens"), ("ignore_eos", "ignore_eos"),
                        ("video_frames", "video_frames")):  # ours: frames taken from a video_url clip
        v = body.get(name)
        if v is None or param in options:
            continue
        why = value_reason(BY_NAME[param], v)
        if why:
            raise APIError(400, why.replace(param, name, 1), param=name)
        options[param] = float(v) if BY_NAME[param].datatype == "FP32" else v
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
            raise _type_error("stop", f"a non-empty string or a list of up to {MAX_STOP}")
        options["stop"] = stop
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _type_error("logprobs", "true or false")
    if top is not None:
        why = value_reason(BY_NAME["logprobs"], top)
        if why:
            raise APIError(400, why.replace("logprobs", "top_logprobs", 1), param="top_logprobs")
        if not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if logprobs:
        options["logprobs"] = top or 0
    options.update(_tools(body))
    fmt = _response_format(body.get("response_format"))
    if fmt is not None:
        options["response_format"] = fmt
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _type_error("stream", "true or false")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _type_error("stream_options", "an object")
    return ChatRequest(model=model, question=turns[-1][1], history=history,
                       system="\n".join(system) if system else None, image_urls=images,
                       video_url=videos[0] if videos else None,
                       stream=stream, include_usage=bool(stream_options.get("include_usage")), n=n,
                       options=options)


def choice_options(req: ChatRequest, i: int) -> dict:
    """The model options of choice i: with a seed, choice i samples with seed + i (wrapping
    within the seed's range), so n answers differ and each one repeats."""
    options = dict(req.options)
    if "seed" in options and i:
        options["seed"] = (options["seed"] + i) % (BY_NAME["seed"].limit.high or 2 ** 63)
    return options


def _append(turns: list[list], role: str, text: str) -> None:
    """A message's text as a turn; consecutive messages of one role make one turn."""
    if turns and turns[-1][0] == role:
        turns[-1][1] += "\n" + text
    else:
        turns.append([role, text])


def _calls_text(tool_calls, i: int, calls: dict[str, str]) -> str:
    """An assistant's tool calls as the model writes them (tools.Toolset), each id remembered."""
    param = f"messages[{i}].tool_calls"
    if not isinstance(tool_calls, list):
        raise _type_error(param, "a list")
    out = []
    for j, c in enumerate(tool_calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(c.get("id"), str):
            raise _type_error(f"{param}[{j}]", 'an object with "id" and "function": {"name", "arguments"}')
        try:
            arguments = json.loads(f.get("arguments") or "{}")
        except (json.JSONDecodeError, RecursionError, TypeError):
            raise _type_error(f"{param}[{j}].function.arguments", "a JSON object as text") from None
        calls[c["id"]] = f["name"]
        out.append({"name": f["name"], "arguments": arguments})
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def _tools(body: dict) -> dict:
    """tools, tool_choice and parallel_tool_calls as the client's options (the server checks
    the schemas; a tool_choice naming no tool is refused here, naming its field)."""
    tools, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return {}
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _type_error("tools", "a list of {\"type\": \"function\", \"function\": {...}}")
    names = [(t.get("function") or {}).get("name") for t in tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        choice = name
    elif choice not in (None, "none", "auto", "required"):
        raise _type_error("tool_choice", '"none", "auto", "required" or {"type": "function", "function": {"name"}}')
    if parallel is not None and not isinstance(parallel, bool):
        raise _type_error("parallel_tool_calls", "true or false")
    return {"tools": tools, **({"tool_choice": choice} if choice else {}),
            **({"parallel_tool_calls": parallel} if parallel is not None else {})}


def _response_format(value) -> dict | None:
    """OpenAI's response_format as the model's: text (none), json_object, json_schema (its
    `schema`, always enforced, whatever `strict` says). Anything else is refused, never ignored."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _type_error("response_format", "an object")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema: a JSON Schema object",
                           param="response_format.json_schema.schema")
        return {"type": "json_schema", "schema": spec["schema"]}
    raise APIError(400, f"response_format type {kind!r} is not supported (text, json_object or json_schema)",
                   param="response_format.type")


def decode_data_url(url: str, max_bytes: int, kind: str = "image") -> bytes:
    """data:<kind>/...;base64,... -> the bytes, size-checked before decoding."""
    param = f"{kind}_url"
    m = _DATA_URL[kind].match(url)
    if not m:
        raise APIError(400, f"{kind} data URL must be data:{kind}/<type>;base64,<data>", param=param)
    payload = url[m.end():]
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(413, f"{kind} is over the {max_bytes} byte limit", param=param, code=f"{kind}_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{kind} data URL is not valid base64", param=param) from None


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(*stats: dict) -> dict:
    """The usage of a request whose choices ended with these stats: its prompt counted once
    (OpenAI's convention), every choice's tokens."""
    prompt = int(stats[0].get("prefill_tokens", 0))
    completion = sum(int(s.get("decode_tokens", 0)) for s in stats)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(stats[0].get("cached_tokens", 0))}}


def _logprobs(entries: list[dict] | None) -> dict | None:
    """The model's logprobs entries (contract.LOGPROBS: OpenAI's fields already) as a choice's."""
    return None if entries is None else {"content": entries, "refusal": None}


def tool_calls(stats: dict, deltas: bool = False) -> list[dict]:
    """The calls an answer made, as OpenAI shapes them (deltas: a stream chunk's, with index)."""
    return [{**({"index": j} if deltas else {}), "id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for j, c in enumerate(stats.get("tool_calls") or [])]


def message(text: str, stats: dict) -> dict:
    if stats.get("tool_calls"):
        return {"role": "assistant", "content": None, "tool_calls": tool_calls(stats)}
    return {"role": "assistant", "content": text}


def completion(cid: str, model: str, answers: list[tuple[str, dict, list[dict] | None]]) -> dict:
    """answers: each choice's (text, stats, logprobs entries or None), in order."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": message(text, stats),
                         "finish_reason": stats.get("finish_reason") or "stop", "logprobs": _logprobs(logprobs)}
                        for i, (text, stats, logprobs) in enumerate(answers)],
            "usage": usage(*[stats for _, stats, _ in answers])}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, created: int | None = None,
          logprobs: list[dict] | None = None, index: int = 0) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created or int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": _logprobs(logprobs)}]}


def usage_chunk(cid: str, model: str, stats: list[dict], created: int | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created or int(time.time()), "model": model,
            "choices": [], "usage": usage(*stats)}


class CallStream:
    """Streamed text of a tool-call answer -> OpenAI's tool_calls deltas as they become known: a
    call's id, type and name once its name is complete, then its arguments piece by piece.

    The server's grammar fixes the text's shape, compact JSON: [{"name":"<name>","arguments":<JSON>}
    (,{...})*], or for a model whose chat template teaches it one call, {"name":"<name>",
    "parameters":<JSON>}; so a scanner that follows strings and nesting finds where each part ends."""

    _HEAD = '{"name":"'

    def __init__(self):
        self.buf, self.pos, self.index = "", 0, -1
        self.args, self.single = '","arguments":', False
        self.state = "open"  # open -> head -> name -> args -> next (-> head ...) -> done
        self.depth, self.in_string, self.escaped = 0, False, False

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        out = []
        while True:
            rest = self.buf[self.pos:]
            if self.state == "open" and rest:
                if rest[0] == "[":
                    self.pos += 1
                else:  # one call object
                    self.args, self.single = '","parameters":', True
                self.state = "head"
            elif self.state == "head" and len(rest) >= len(self._HEAD):
                self.pos, self.state = self.pos + len(self._HEAD), "name"
            elif self.state == "name" and self.args in rest:
                name = rest[:rest.index(self.args)]
                self.pos += len(name) + len(self.args)
                self.index += 1
                out.append({"index": self.index, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                            "function": {"name": name, "arguments": ""}})
                self.state = "args"
            elif self.state == "args" and rest:
                end = self._scan(rest)
                piece = rest if end is None else rest[:end]
                if piece:
                    out.append({"index": self.index, "function": {"arguments": piece}})
                self.pos += len(piece)
                if end is None:
                    return out
                self.state = "next"
            elif self.state == "next" and self.single and rest:  # the object's "}"
                self.state, self.pos = "done", self.pos + 1
            elif self.state == "next" and len(rest) >= 2:  # "}" then "," or "]"
                self.state = "head" if rest[1] == "," else "done"
                self.pos += 2
            else:
                return out

    def _scan(self, text: str) -> int | None:
        """Where the arguments' JSON ends in `text` (None: not yet), carrying state over calls."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]" or (ch == "," and self.depth == 0):
                if self.depth == 0:  # a scalar's end: the call's own "}" or a ","
                    return i
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None
