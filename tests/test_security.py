"""Shipped defaults: loopback only, admin APIs closed to clients, model control off."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from edgevlm.serve.tritonserver import ADMIN_HEADER


def listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


# 127.0.0.1 as /proc/net shows it: IPv4, and IPv4-mapped IPv6 (::ffff:127.0.0.1)
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}


def test_every_server_port_listens_on_loopback_only(server):
    for port in (server.grpc_port, server.http_port, server.metrics_port):
        addrs = listening(port)
        assert addrs and addrs <= LOOPBACK, (port, addrs)


ADMIN_CALLS = {
    "unload a model": lambda c, h: c.unload_model("mobilevlm", headers=h),
    "load a model": lambda c, h: c.load_model("mobilevlm", headers=h),
    "repository index": lambda c, h: c.get_model_repository_index(headers=h),
    "statistics": lambda c, h: c.get_inference_statistics(headers=h),
    "log settings": lambda c, h: c.update_log_settings({"log_verbose_level": 1}, headers=h),
    "trace settings": lambda c, h: c.get_trace_settings(headers=h),
    "shared memory": lambda c, h: c.register_system_shared_memory("x", "/x", 64, headers=h),
}


@pytest.mark.parametrize("call", list(ADMIN_CALLS))
def test_admin_grpc_apis_are_refused_without_the_admin_key(server, client, call):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        with pytest.raises(InferenceServerException, match="restricted"):
            ADMIN_CALLS[call](c, None)
    assert client.generate("Still serving?", max_tokens=3).tokens == 3


def test_admin_key_opens_reads_but_model_control_stays_off(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        assert c.get_model_repository_index(headers=server.admin_headers(), as_json=True)["models"]
        with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
            c.unload_model("mobilevlm", headers=server.admin_headers())
        assert c.is_model_ready("mobilevlm")


@pytest.mark.parametrize("method,path", [("POST", "/v2/repository/index"), ("GET", "/v2/models/stats"),
                                         ("GET", "/v2/logging"), ("GET", "/v2/trace/setting"),
                                         ("POST", "/v2/repository/models/mobilevlm/unload")])
def test_admin_http_apis_are_refused_without_the_admin_key(server, method, path):
    url = f"http://{server.host}:{server.http_port}{path}"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None),
                               timeout=10)
    assert e.value.code == 403
    keyed = urllib.request.Request(f"http://{server.host}:{server.http_port}/v2/models/stats",
                                   headers=server.admin_headers("http"))
    with urllib.request.urlopen(keyed, timeout=10) as r:
        assert r.status == 200


def test_client_apis_stay_open(server, client):
    with grpcclient.InferenceServerClient(server.grpc_url) as c:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mobilevlm")
        assert c.get_model_metadata("mobilevlm").name == "mobilevlm"
        assert c.get_model_config("mobilevlm").config.name == "mobilevlm"
    assert ADMIN_HEADER not in str(client.metadata())


def test_gateway_and_server_cli_default_to_loopback():
    from edgevlm_client.cli import parser
    args = parser().parse_args(["gateway"])
    assert args.host == "127.0.0.1" and not args.allow_remote_images and args.api_key is None
    from edgevlm.serve.cli import build_parser
    assert build_parser().parse_args(["--repository", "x"]).host == "127.0.0.1"
