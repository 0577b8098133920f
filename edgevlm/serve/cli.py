"""`make serve`: run tritonserver on a rendered repository and keep it serving.

    python -m edgevlm.serve --repository artifacts/tiny/repository [--host 0.0.0.0] [--tls-cert ...]

Binds loopback unless told otherwise; restarts the server when it or the entry model's stub
dies (see serve/supervisor.py); exits non-zero when restarts keep failing, for systemd or Docker to
take over.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from edgevlm.serve.supervisor import Supervisor
from edgevlm.serve.tritonserver import ADMIN_APIS, ADMIN_HEADER, GrpcTLS, ServerError, TritonServer


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Serve a rendered model repository with tritonserver.")
    ap.add_argument("--repository", required=True)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--tls-cert", help="PEM server certificate: serve gRPC over TLS")
    ap.add_argument("--tls-key", help="PEM key of --tls-cert")
    ap.add_argument("--tls-client-ca", help="PEM CA: require client certificates it signed (mutual TLS)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    tls = GrpcTLS(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None) \
        if args.tls_cert else None
    server = TritonServer(args.repository, host=args.host, grpc_port=args.grpc_port,
                          http_port=args.http_port, verbose=args.verbose, tls=tls)
    print(f"serve: starting tritonserver on {args.repository} (log: {server.log_path})", flush=True)
    try:
        server.start()
    except ServerError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    print(f"serve: ready, gRPC at {server.grpc_url}, metrics at {server.metrics_url} (Ctrl-C stops)",
          flush=True)
    print(f"serve: admin APIs ({ADMIN_APIS}) need header {ADMIN_HEADER}, value in "
          f"{server.work / 'admin-key'}", flush=True)
    supervisor = Supervisor(server, log=lambda m: print(f"serve: {m}", flush=True))
    signal.signal(signal.SIGTERM, lambda *a: supervisor.stop())
    try:
        supervisor.run()  # until SIGTERM, Ctrl-C, or giving up after too many restarts
    except KeyboardInterrupt:
        pass
    print("serve: stopping", flush=True)
    server.stop()
    return 1 if supervisor.failed else 0

