"""edgevlm-client: ask about an image (streamed), chat, benchmark a server, check its health,
or run the OpenAI-compatible gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from edgevlm_client.client import DEFAULT_URL, Client
from edgevlm_client.connection import TLS
from edgevlm_client.errors import EdgeVLMError
from edgevlm_client.images import image_bytes


def timing_line(stats: dict) -> str:
    """Per-stage timings in the spirit of llama.cpp's summary."""
    return (f"image encode {stats.get('image_encode_ms', 0):.1f} ms | "
            f"prompt {stats.get('prefill_tokens', 0)} tokens in {stats.get('prefill_ms', 0):.1f} ms "
            f"({stats.get('prefill_tokens_per_s', 0):.1f} tok/s) | "
            f"decode {stats.get('decode_tokens', 0)} tokens in {stats.get('decode_ms', 0):.1f} ms "
            f"({stats.get('decode_tokens_per_s', 0):.1f} tok/s)")


def _tls(args) -> TLS | None:
    if not (args.tls or args.root_certs or args.client_cert or args.client_key):
        return None
    return TLS(args.root_certs, args.client_cert, args.client_key)


def _client(args) -> Client:
    return Client(args.url, tls=_tls(args), timeout_s=getattr(args, "timeout_s", 300.0))


def _generation_options(args) -> dict:
    names = ("max_tokens", "temperature", "top_p", "top_k", "seed")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def cmd_ask(args) -> int:
    stream = _client(args).stream(args.question, image=args.image, **_generation_options(args))
    if args.json:
        for _ in stream:
            pass
        print(json.dumps({"text": stream.text, "stats": stream.stats}))
        return 0
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(timing_line(stream.stats), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """Interactive multi-turn chat about one image: one question per line, empty line or EOF ends."""
    chat = _client(args).chat(image=args.image, **_generation_options(args))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        sys.stdout.write("vlm> ")
        for delta in chat.stream(line.strip()):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_bench(args) -> int:
    from edgevlm_client import bench
    report = asyncio.run(bench.run(
        args.url, requests=args.requests, concurrency=args.concurrency, prompt=args.prompt,
        image=image_bytes(args.image) if args.image else None, warmup=args.warmup, tls=_tls(args),
        timeout_s=args.timeout_s, **_generation_options(args)))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json else bench.table(report))
    return 0 if report["ok"] == report["requests"] else 1


def cmd_health(args) -> int:
    client = _client(args)
    if not client.health():
        print(f"{args.url}: not ready")
        return 1
    info = client.metadata()
    print(f"{args.url}: ready | {info.name} serves {info.model_name}: context {info.max_context} tokens, "
          f"image {info.image_size}px -> {info.image_tokens} tokens, {info.max_sequences} streams at once")
    return 0


def cmd_gateway(args) -> int:
    try:
        from edgevlm_client.gateway import GatewayConfig, serve
    except ImportError as e:
        print(f"edgevlm-client gateway: needs the gateway extra (pip install 'edgevlm-client[gateway]'): {e}",
              file=sys.stderr)
        return 2
    config = GatewayConfig(grpc_url=args.url, tls=_tls(args), model_id=args.model_id,
                           api_key=args.api_key or os.environ.get("EDGEVLM_API_KEY") or None,
                           allow_remote_images=args.allow_remote_images,
                           max_body_bytes=int(args.max_body_mb * (1 << 20)),
                           max_image_bytes=int(args.max_image_mb * (1 << 20)), timeout_s=args.timeout_s)
    serve(config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_generation(p: argparse.ArgumentParser, max_tokens_default=None) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens_default)
    p.add_argument("--temperature", type=float, help="0 = greedy (the server's default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for the next response")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgevlm-client", description=__doc__)
    ap.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    tls = ap.add_argument_group("gRPC TLS (any of these turns it on)")
    tls.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    tls.add_argument("--root-certs", help="PEM file of the CA (or self-signed certificate) to trust")
    tls.add_argument("--client-cert", help="PEM client certificate, for mutual TLS")
    tls.add_argument("--client-key", help="PEM client key, for mutual TLS")
    sub = ap.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="ask a question, optionally about an image (streams the answer)")
    ask.add_argument("question")
    ask.add_argument("--image", help="image file (JPEG, PNG, WebP, BMP, GIF)")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    _add_generation(ask)
    ask.set_defaults(func=cmd_ask)

    chat = sub.add_parser("chat", help="multi-turn chat about one image (questions from stdin)")
    chat.add_argument("--image", help="image file the conversation is about")
    _add_generation(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="N requests at concurrency C: TTFT, inter-token latency, tok/s")
    bench.add_argument("-n", "--requests", type=int, default=32)
    bench.add_argument("-c", "--concurrency", type=int, default=4)
    bench.add_argument("--prompt", default="Describe the image in detail.")
    bench.add_argument("--image", help="image file sent with every request (default: text only)")
    bench.add_argument("--warmup", type=int, default=1, help="requests sent first and not counted")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.add_argument("--out", help="also write the JSON report to this file")
    _add_generation(bench, max_tokens_default=64)
    bench.set_defaults(func=cmd_bench)

    health = sub.add_parser("health", help="is the server ready? (and what it serves)")
    health.set_defaults(func=cmd_health)

    gw = sub.add_parser("gateway", help="OpenAI-compatible HTTP gateway (/v1/chat/completions)")
    gw.add_argument("--host", default="127.0.0.1", help="listen address (default loopback only)")
    gw.add_argument("--port", type=int, default=8080)
    gw.add_argument("--model-id", help="model id to answer to (default: the checkpoint name the server reports)")
    gw.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set EDGEVLM_API_KEY)")
    gw.add_argument("--allow-remote-images", action="store_true",
                    help="fetch http(s) image URLs (off: only base64 data URLs)")
    gw.add_argument("--max-body-mb", type=float, default=20.0)
    gw.add_argument("--max-image-mb", type=float, default=10.0)
    gw.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for the model server")
    gw.add_argument("--log-level", default="info")
    gw.set_defaults(func=cmd_gateway)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (EdgeVLMError, ValueError) as e:
        print(f"edgevlm-client: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
