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
    image = "image cached" if stats.get("image_cached") else f"image encode {stats.get('image_encode_ms', 0):.1f} ms"
    if stats.get("image_tokens"):
        image += f" ({stats['image_tokens']} tokens)"
    if stats.get("frames"):  # a clip: its frames, decoded before they were encoded
        image = (f"clip {stats['frames']} frames x {stats.get('frame_tokens', 0)} tokens, decoded in "
                 f"{stats.get('video_decode_ms', 0):.1f} ms, " + image)
    cached = f" ({stats['cached_tokens']} cached)" if stats.get("cached_tokens") else ""
    return (f"{image} | "
            f"prompt {stats.get('prefill_tokens', 0)} tokens{cached} in {stats.get('prefill_ms', 0):.1f} ms "
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
    options = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if getattr(args, "json_schema", None):
        try:
            options["json_schema"] = json.loads(Path(args.json_schema).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--json-schema {args.json_schema}: {e}") from None
    if getattr(args, "regex", None):
        options["regex"] = args.regex
    if getattr(args, "choice", None):
        options["choices"] = args.choice
    return options


def cmd_ask(args) -> int:
    image = args.image[0] if args.image and len(args.image) == 1 else args.image
    video = {"video": args.video, "video_frames": args.frames} if args.video else {}
    stream = _client(args).stream(args.question, image=image, **video, **_generation_options(args))
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


def cmd_watch(args) -> int:
    """JSON lines, one per question per answered frame; a summary on stderr at the end."""
    from edgevlm_client.aio import AsyncClient
    from edgevlm_client.watch import watch
    options = {}
    for o in args.option:
        key, eq, value = o.partition("=")
        if not eq or not key:
            raise ValueError(f"--option {o!r}: expected KEY=VALUE")
        options[key] = value
    summary = {"answered": 0, "frames_dropped": 0}

    async def run() -> None:
        async with AsyncClient(args.url, tls=_tls(args), timeout_s=args.timeout_s) as client:
            async for line in watch(client, args.source, args.questions, every_s=args.every,
                                    max_frames=args.max_frames, fmt=args.format, options=options,
                                    realtime=False if args.no_realtime else None, clip_seconds=args.clip_seconds,
                                    **_generation_options(args)):
                if not args.stats:
                    line.pop("stats")
                print(json.dumps(line), flush=True)
                summary["answered"] += line["question"] == args.questions[0]
                summary["frames_dropped"] = line["frames_dropped_total"]
    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass  # Ctrl-C is the usual way to stop watching a camera: a clean end, not an error
    print(f"watch: {summary['answered']} frames answered, {summary['frames_dropped']} dropped", file=sys.stderr)
    return 0


def cmd_health(args) -> int:
    client = _client(args)
    if not client.health():
        print(f"{args.url}: not ready")
        return 1
    info = client.metadata()
    tokens = (f"{info.image_tokens_min}-{info.image_tokens}" if info.image_tokens_min < info.image_tokens
              else str(info.image_tokens))
    print(f"{args.url}: ready | {info.name} serves {info.model_name}: context {info.max_context} tokens, "
          f"image {info.image_size}px -> {tokens} tokens, {info.max_sequences} streams at once"
          + (f", prompt template {info.template}" if info.template else ""))
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
                           allow_remote_images=args.allow_remote_images, video_dir=args.video_dir,
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
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="the answer is JSON valid against this JSON Schema file")
    shape.add_argument("--regex", help="the whole answer matches this regular expression")
    shape.add_argument("--choice", action="append", metavar="TEXT", help="the answer is one of these (repeatable)")


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
    ask.add_argument("--video", help="a video clip (mp4, webm, mkv); a model without a video mode reads its frames as pictures")
    ask.add_argument("--frames", type=int, help="frames taken from the clip (default: the server's, 8)")
    ask.add_argument("--image", action="append",
                     help="image file (JPEG, PNG, WebP, BMP, GIF); again for more, each at its <image> in the "
                          "question, or all before it")
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

    w = sub.add_parser("watch", help="ask about the newest frame of a video, stream or camera, over and over "
                                     "(JSON lines; frames that arrive while the model answers are dropped)")
    w.add_argument("source", help="video file, rtsp:// or http:// URL, or a V4L2 device (/dev/video0 --format v4l2)")
    w.add_argument("questions", nargs="+", help="one or more questions, each asked about every answered frame")
    w.add_argument("--every", type=float, default=0.0, help="ask at most once per this many seconds "
                                                            "(default 0: as fast as the model keeps up)")
    w.add_argument("--max-frames", type=int, help="stop after answering this many frames")
    w.add_argument("--clip-seconds", type=float, default=0.0,
                   help="ask about the last N seconds as a clip, not one frame")
    w.add_argument("--format", help="FFmpeg input format (v4l2 for a camera device)")
    w.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="FFmpeg input option, e.g. rtsp_transport=tcp or video_size=640x480 (repeatable)")
    w.add_argument("--no-realtime", action="store_true",
                   help="answer every frame of a file in order (none dropped) instead of playing it "
                        "at its frame rate")
    w.add_argument("--stats", action="store_true", help="include the server's stats in each line")
    _add_generation(w, max_tokens_default=64)
    w.set_defaults(func=cmd_watch)

    health = sub.add_parser("health", help="is the server ready? (and what it serves)")
    health.set_defaults(func=cmd_health)

    gw = sub.add_parser("gateway", help="OpenAI-compatible HTTP gateway (/v1/chat/completions)")
    gw.add_argument("--host", default="127.0.0.1", help="listen address (default loopback only)")
    gw.add_argument("--port", type=int, default=8080)
    gw.add_argument("--model-id", help="model id to answer to (default: the checkpoint name the server reports)")
    gw.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set EDGEVLM_API_KEY)")
    gw.add_argument("--allow-remote-images", action="store_true",
                    help="fetch http(s) image URLs (off: only base64 data URLs)")
    gw.add_argument("--video-dir", help="video_url may name a file under this directory (default: data: URLs only)")
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
