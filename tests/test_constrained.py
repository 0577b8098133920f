"""Constrained decoding: with the random-weight model (which otherwise emits noise) every
answer parses and validates against its JSON schema, matches its regex or is one of its
choices, greedy and sampled, decoded in a batch beside unconstrained rows, in process and
through the real tritonserver; a bad schema or regex is refused with the grammar library's
reason before decoding; an answer cut by max_tokens says so. Through the gateway with the
official openai SDK, OpenAI's response_format is honoured or refused, never ignored."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
from edgevlm_client import IncompleteAnswer, InvalidRequest

from edgevlm.runtime.errors import BadRequest
from edgevlm.runtime.sampling import SamplingParams
from edgevlm.runtime.scheduler import Scheduler
from edgevlm.runtime.text_model import open_text_model
from edgevlm.samples import sample_image
from tests.test_scheduler import Stream, alone

DETECTION = {  # booleans, a bounded count, an enum
    "type": "object", "additionalProperties": False, "required": ["person", "count", "light"],
    "properties": {"person": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 12},
                   "light": {"enum": ["red", "amber", "green"]}}}
BOXES = {  # an array of labelled bounding boxes
    "type": "object", "additionalProperties": False, "required": ["boxes"],
    "properties": {"boxes": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "additionalProperties": False, "required": ["label", "box"],
        "properties": {"label": {"enum": ["cup", "person", "door"]},
                       "box": {"type": "array", "minItems": 4, "maxItems": 4,
                               "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}}}}
NESTED = {  # nested objects, a bounded string
    "type": "object", "additionalProperties": False, "required": ["robot"],
    "properties": {"robot": {"type": "object", "additionalProperties": False, "required": ["arm", "battery", "name"],
                             "properties": {
                                 "arm": {"type": "object", "additionalProperties": False, "required": ["open", "angle"],
                                         "properties": {"open": {"type": "boolean"},
                                                        "angle": {"type": "integer", "minimum": -90, "maximum": 90}}},
                                 "battery": {"type": "integer", "minimum": 0, "maximum": 100},
                                 "name": {"type": "string", "minLength": 1, "maxLength": 10}}}}}
SCHEMAS = {"detection": DETECTION, "boxes": BOXES, "nested": NESTED}
PLATE = r"[A-Z]{2}-[0-9]{3}-[A-Z]{2}"
CHOICES = ["left", "right", "stop", "forward"]
SAMPLING = {"greedy": {}, "sampled": {"temperature": 1.0, "seed": 7}, "sampled-top": {"temperature": 0.8,
                                                                                      "top_p": 0.9, "seed": 3}}


def formats() -> dict[str, dict]:
    out = {name: {"type": "json_schema", "schema": s} for name, s in SCHEMAS.items()}
    out.update(plate={"type": "regex", "pattern": PLATE}, choice={"type": "choice", "choices": CHOICES})
    return out


def object_or_cut(text: str, finish_reason: str) -> None:
    """json_object allows any keys and strings, which the random-weight model never closes:
    complete, the answer is an object; otherwise max_tokens cut it, and it says so."""
    assert text.startswith("{"), text
    if finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    else:
        assert finish_reason == "length"


def check_answer(fmt: dict, text: str) -> None:
    """Fails unless `text` satisfies `fmt` (an independent checker for each kind)."""
    if fmt["type"] == "json_schema":
        jsonschema.validate(json.loads(text), fmt["schema"])
    elif fmt["type"] == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif fmt["type"] == "regex":
        assert re.fullmatch(fmt["pattern"], text), text
    else:
        assert text in fmt["choices"], text


@pytest.fixture(scope="module")
def one_row(tiny_onnx):
    return open_text_model(tiny_onnx, kv_cache="static", max_rows=1)


def test_every_constrained_answer_validates_in_a_batch_beside_free_rows(tiny_onnx, one_row):
    rng_ids = [[1, 319, 5, 77, 900, 12][: 3 + i % 4] + [29871 % 1000] for i in range(40)]
    jobs = []
    for i, (name, fmt) in enumerate(formats().items()):
        for j, (how, sampling) in enumerate(SAMPLING.items()):
            params = SamplingParams(max_tokens=256, response_format=json.dumps(fmt), **sampling)
            jobs.append((name, how, fmt, rng_ids[3 * i + j], params))
    free = [SamplingParams(max_tokens=20), SamplingParams(max_tokens=30, temperature=0.9, seed=1)]
    sched = Scheduler(open_text_model(tiny_onnx, kv_cache="static", max_rows=4), max_queue=64, prefill_chunk=16)
    try:
        streams = [Stream() for _ in jobs]
        free_streams = [Stream() for _ in free]
        for s, (_, _, _, ids, params) in zip(streams, jobs):
            sched.submit(s.request(ids, params))
        for s, params in zip(free_streams, free):
            sched.submit(s.request([1, 2, 3, 4], params))
        for s, (name, how, fmt, ids, params) in zip(streams, jobs):
            s.wait()
            assert s.error is None, (name, how, s.error)
            text = "".join(s.text)
            check_answer(fmt, text)
            assert s.stats.finish_reason == "stop", (name, how, text)
            # the same request alone gives the same answer (the mask is per row)
            assert alone(one_row, ids, params)[0] == text, (name, how)
        for s in free_streams:
            assert s.wait().error is None and s.stats.finish_reason == "length"
    finally:
        sched.close()


def test_a_format_is_compiled_once_and_a_bad_one_is_refused_with_the_reason(one_row):
    sched = Scheduler(one_row, max_queue=1)
    sched.close()
    fmt = json.dumps({"type": "regex", "pattern": "[0-9]{4}"})
    before = one_row.grammars.compiles
    for _ in range(3):
        sched.check([1, 2], 0, SamplingParams(response_format=fmt))
    assert one_row.grammars.compiles == before + 1
    bad = {"regex": ({"type": "regex", "pattern": "[a-"}, "unclosed character class"),
           "schema": ({"type": "json_schema", "schema": {"type": "objectx"}}, "objectx"),
           "kind": ({"type": "grammar", "text": "x"}, "type is one of json_schema, json_object, regex, choice"),
           "choices": ({"type": "choice", "choices": []}, "a list of non-empty strings")}
    for fmt, reason in bad.values():
        with pytest.raises(BadRequest, match=re.escape(reason)) as e:
            sched.check([1, 2], 0, SamplingParams(response_format=json.dumps(fmt)))
        assert "\n" not in str(e.value)
    with pytest.raises(BadRequest, match="response_format is not JSON"):
        sched.check([1, 2], 0, SamplingParams(response_format="{"))


def test_served_answers_parse_and_validate(client):
    for name, schema in SCHEMAS.items():
        for how, sampling in SAMPLING.items():
            r = client.generate("Describe the scene as JSON.", image=sample_image("coffee"), json_schema=schema,
                                max_tokens=256, **sampling)
            jsonschema.validate(r.parsed, schema)
            assert r.finish_reason == "stop", (name, how, r.text)
    assert re.fullmatch(PLATE, client.generate("Read the plate.", regex=PLATE, max_tokens=64).parsed)
    assert client.generate("Which way?", choices=CHOICES, temperature=1.0, seed=2, max_tokens=16).parsed in CHOICES
    r = client.generate("JSON please.", json_object=True, max_tokens=32)
    object_or_cut(r.text, r.finish_reason)
    # the stream is the text; with stop strings and a chat follow-up too
    stream = client.stream("Count.", json_schema=DETECTION, max_tokens=128)
    text = "".join(stream)
    jsonschema.validate(json.loads(text), DETECTION)
    chat = client.chat(image=sample_image("coffee"), json_schema=DETECTION, max_tokens=128)
    chat.ask("Anyone there?")
    jsonschema.validate(chat.ask("And now?").parsed, DETECTION)


def test_a_cut_answer_says_so_and_a_bad_format_is_invalid_arg(client):
    cut = client.generate("Boxes?", json_schema=BOXES, max_tokens=3)
    assert cut.finish_reason == "length"
    with pytest.raises(IncompleteAnswer, match="max_tokens"):
        cut.parsed
    with pytest.raises(InvalidRequest, match="unclosed character class"):
        client.generate("Plate?", regex="[A-")
    with pytest.raises(InvalidRequest, match="one way, not 2"):
        client.generate("x", regex="a", choices=["a"])
    assert client.generate("Still there?", max_tokens=2).tokens == 2


def test_the_cli_asks_with_a_schema_file(server, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(DETECTION))
    out = subprocess.run([sys.executable, "-m", "edgevlm_client.cli", "--url", server.grpc_url, "ask", "--json",
                          "--json-schema", str(schema), "--max-tokens", "128", "Is anyone there?"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(json.loads(out.stdout)["text"]), DETECTION)


def test_the_gateway_honours_openais_response_format(server, start_gateway):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=start_gateway(server.grpc_url) + "/v1", api_key="unused", max_retries=0)
    model = api.models.list().data[0].id
    for name, schema in SCHEMAS.items():
        for sampling in ({}, {"temperature": 1.0, "seed": 5}):
            r = api.chat.completions.create(
                model=model, max_tokens=256, messages=[{"role": "user", "content": f"Report {name} as JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
                **sampling)
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
            assert r.choices[0].finish_reason == "stop"
    chunks = list(api.chat.completions.create(model=model, max_tokens=32, messages=[{"role": "user", "content": "JSON!"}],
                                              response_format={"type": "json_object"}, stream=True))
    object_or_cut("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                  next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason))
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "grammar", "grammar": "x"})
    assert "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "objectx"}}})
    assert "objectx" in e.value.body["message"]
