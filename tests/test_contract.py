"""The wire contract (edgevlm_client/contract.py) is what the server really serves and
enforces, and failures reach the client as their status code, whatever their text."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from edgevlm_client import InvalidRequest, contract
from edgevlm_client.errors import BY_STATUS, Cancelled, ServerBusy, ServerError, ServerUnavailable, Timeout, from_triton
from tritonclient.utils import InferenceServerException

from support import settle


@pytest.mark.integration
def test_served_model_has_exactly_the_contracts_tensors(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        config = c.get_model_config(contract.MODEL, as_json=True)["config"]
    want = {t.name: (t.datatype, list(t.dims), t.optional) for t in contract.INPUTS}
    got = {i["name"]: (i["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES"),
                       [int(d) for d in i["dims"]], bool(i.get("optional"))) for i in config["input"]}
    assert got == want
    outputs = {o["name"]: (o["data_type"].removeprefix("TYPE_").replace("STRING", "BYTES"),
                           [int(d) for d in o["dims"]]) for o in config["output"]}
    assert outputs == {t.name: (t.datatype, list(t.dims)) for t in contract.OUTPUTS}


def _edges(param):
    """(a value just inside the range, one just outside) at each end the range has."""
    lim, step = param.limit, (1 if param.datatype.startswith("INT") else 1e-3)
    low_in = lim.low + step if lim.open_low else lim.low
    low_out = lim.low if lim.open_low else lim.low - step
    pairs = [(low_in, low_out)]
    if lim.high is not None:
        pairs.append((lim.high, lim.high + step))
    return pairs


@pytest.mark.integration
@pytest.mark.parametrize("param", [p for p in contract.PARAMETERS if p.limit], ids=lambda p: p.name)
def test_server_enforces_each_parameter_range_of_the_contract(client, param):
    for inside, outside in _edges(param):
        kwargs = {"max_tokens": 2} if param.name != "max_tokens" else {}
        if param.name in ("max_tokens", "min_tokens") and inside > 2:
            inside = 2  # the upper edge is not worth generating (nor allowed past max_tokens); 2 is inside too
        assert client.generate("Hi", **kwargs, **{param.name: inside}).tokens >= 1
        with pytest.raises(InvalidRequest, match=f"^{param.name} must be"):  # refused by the client library
            client.generate("Hi", **kwargs, **{param.name: outside})
        # and by the server, for a client that sends it anyway
        raw = grpcclient.InferInput(param.name, [1], param.datatype)
        raw.set_data_from_numpy(np.array([outside], dtype={"INT32": np.int32, "INT64": np.int64,
                                                           "FP32": np.float32}[param.datatype]))
        announced, err = _raw_stream_error(client.url, [_bytes_input("prompt", b"Hi"), raw])
        assert announced["status"] == "INVALID_ARG" and f"{param.name} must be" in err.message()


# Values a program may send by mistake; every one is refused locally, naming the field
ODD_VALUES = [2 ** 32 + 5, -2 ** 32 + 7, 2 ** 31 + 3, 2 ** 64 + 1, -(2 ** 70), 10 ** 400, float("nan"),
              float("inf"), -float("inf"), True, "7", [1]]


@pytest.mark.parametrize("param", [p for p in contract.PARAMETERS if p.limit], ids=lambda p: p.name)
def test_every_number_is_checked_as_sent_by_the_client_and_the_gateway(param):
    from edgevlm_client.openai_api import APIError, parse_chat_request
    from edgevlm_client.request import build_inputs
    openai_name = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
                   "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                   "min_tokens": "min_tokens"}
    for value in ODD_VALUES:
        lim = param.limit
        fits = (isinstance(value, int) and not isinstance(value, bool) and param.datatype != "FP32"
                and value >= lim.low and (lim.high is None or value <= lim.high) and value < 2 ** 63
                and (param.datatype != "INT32" or value < 2 ** 31))
        if fits:
            continue
        with pytest.raises(InvalidRequest, match=f"^{param.name} must be"):
            build_inputs("Hi", **{param.name: value})
        if param.name in openai_name:
            with pytest.raises(APIError) as e:
                parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                    openai_name[param.name]: value})
            assert e.value.status == 400 and e.value.param == openai_name[param.name] and "\n" not in e.value.message


@pytest.mark.integration
def test_server_enforces_the_request_limits(client):
    with pytest.raises(InvalidRequest, match="^stop takes at most"):
        client.generate("Hi", max_tokens=2, stop=["x"] * (contract.MAX_STOP + 1))
    with pytest.raises(InvalidRequest, match="over the"):
        client.generate("x" * (contract.MAX_PROMPT_CHARS + 1), max_tokens=2)
    with pytest.raises(InvalidRequest, match="history must be"):
        client.generate("Hi", max_tokens=2, history=[("q", "a")] * (contract.MAX_TURNS + 1))


def _raw_stream_error(url: str, inputs) -> tuple[dict, InferenceServerException]:
    """What a plain tritonclient stream receives for a refused request: the stats announcing
    the status (empty if none came) and the error."""
    import json
    import queue
    q = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    announced = {}
    try:
        c.async_stream_infer(contract.MODEL, inputs)
        while True:
            result, error = q.get(timeout=120)
            if error is not None:
                return announced, error
            stats = result.as_numpy("stats")[0]
            announced = json.loads(stats).get(contract.STATS_ERROR, {}) if stats else {}
    finally:
        c.stop_stream(cancel_requests=True)
        c.close()


def _bytes_input(name, value):
    t = grpcclient.InferInput(name, [1], "BYTES")
    t.set_data_from_numpy(np.array([value], dtype=object))
    return t


@pytest.mark.integration
@pytest.mark.parametrize("where,inputs", [
    # refused by mobilevlm itself (decode parameters)
    ("mobilevlm", lambda: [_bytes_input("prompt", b"Hi"), _int_input("max_tokens", 0)]),
    # refused while preprocessing (the image does not decode)
    ("image", lambda: [_bytes_input("prompt", b"Hi"), _bytes_input("image", b"\x89PNG\r\n\x1a\nbroken")]),
])
def test_bad_requests_announce_invalid_arg_then_fail(server, where, inputs):
    before = settle(server, 0)
    announced, err = _raw_stream_error(server.grpc_url, inputs())
    assert announced["status"] == "INVALID_ARG" and announced["message"] == err.message().split("] ", 1)[-1] \
        or announced["message"] in err.message(), (where, announced, err.message())
    assert isinstance(from_triton(err, announced["status"]), InvalidRequest)
    after = settle(server, sum(before[o] for o in ("complete", "cancelled", "invalid", "error")) + 1)
    assert after["invalid"] == before["invalid"] + 1 and after["error"] == before["error"]


@pytest.mark.integration
def test_tritons_own_stream_refusals_carry_no_status(server):
    """A wrong datatype is refused by Triton's gRPC frontend before our model runs, as a bare
    message. The client calls it the server's fault rather than guess from the text (see
    README, Errors); it never sends such tensors itself."""
    announced, err = _raw_stream_error(server.grpc_url, [_bytes_input("prompt", b"Hi"), _bytes_input("max_tokens", b"3")])
    assert announced == {} and err.status() is None and "max_tokens" in err.message()
    assert isinstance(from_triton(err), ServerError)


def _int_input(name, value):
    t = grpcclient.InferInput(name, [1], "INT32")
    t.set_data_from_numpy(np.array([value], dtype=np.int32))
    return t


class _Rpc(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("status,cls", [("INVALID_ARGUMENT", InvalidRequest), ("UNAVAILABLE", ServerUnavailable),
                                        ("DEADLINE_EXCEEDED", Timeout), ("CANCELLED", Cancelled),
                                        ("INTERNAL", ServerError), ("UNKNOWN", ServerError)])
def test_client_types_errors_by_status_never_by_message(status, cls):
    # messages that say the opposite of their status
    misleading = "internal error: connection refused; server exiting; cancelled; deadline"
    code = getattr(grpc.StatusCode, status)
    assert type(from_triton(_Rpc(code, misleading))) is cls
    assert type(from_triton(InferenceServerException(misleading, status=str(code)))) is cls
    assert str(from_triton(_Rpc(code, " the reason \n"))) == "the reason"


@pytest.mark.parametrize("status,cls", [("INVALID_ARG", InvalidRequest), ("UNAVAILABLE", ServerBusy),
                                        ("INTERNAL", ServerError)])
def test_a_streamed_refusal_is_typed_by_the_status_its_stats_announced(status, cls):
    bare = InferenceServerException("invalid argument: server exiting, connection refused")  # no gRPC code
    assert set(contract.STATUS) == {"INVALID_ARG", "UNAVAILABLE", "INTERNAL"}
    assert type(from_triton(bare, status)) is cls


def test_an_error_without_a_status_is_the_servers_fault_not_the_requests():
    assert type(from_triton(InferenceServerException("failed to connect to all addresses"))) is ServerError
    assert set(BY_STATUS) == {"INVALID_ARGUMENT", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}


def test_the_contract_document_is_written_from_the_contract():
    """docs/CONTRACT.md is what tools/contract_doc.py writes from contract.py and the metrics
    list: a change to either without `python3 tools/contract_doc.py` fails here."""
    from tools.contract_doc import DOC, render
    assert DOC.read_text() == render(), "docs/CONTRACT.md is out of date: run python3 tools/contract_doc.py"


def test_a_flag_takes_only_true_or_false():
    from edgevlm_client.openai_api import APIError, parse_chat_request
    from edgevlm_client.request import build_inputs
    for value in (1, "yes", [True]):
        with pytest.raises(InvalidRequest, match="^ignore_eos must be true or false"):
            build_inputs("Hi", ignore_eos=value)
        with pytest.raises(APIError, match="ignore_eos must be true or false"):
            parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": value})
