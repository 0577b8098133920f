"""edgevlm-client: ask a question about an image, streamed to the terminal."""

from __future__ import annotations

import argparse
import json
import sys

from edgevlm_client.client import DEFAULT_URL, Client
from edgevlm_client.errors import EdgeVLMError


def timing_line(stats: dict) -> str:
    """Per-stage timings in the spirit of llama.cpp's summary."""
    return (f"image encode {stats.get('image_encode_ms', 0):.1f} ms | "
            f"prompt {stats.get('prefill_tokens', 0)} tokens in {stats.get('prefill_ms', 0):.1f} ms "
            f"({stats.get('prefill_tokens_per_s', 0):.1f} tok/s) | "
            f"decode {stats.get('decode_tokens', 0)} tokens in {stats.get('decode_ms', 0):.1f} ms "
            f"({stats.get('decode_tokens_per_s', 0):.1f} tok/s)")


def cmd_ask(args) -> int:
    client = Client(args.url, timeout_s=args.timeout_s)
    options = {k: v for k, v in dict(max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_p=args.top_p, top_k=args.top_k, seed=args.seed).items()
               if v is not None}
    stream = client.stream(args.question, image=args.image, **options)
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
    chat = Client(args.url, timeout_s=args.timeout_s).chat(
        image=args.image, **({"max_tokens": args.max_tokens} if args.max_tokens else {}))
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


def cmd_health(args) -> int:
    ok = Client(args.url).health()
    print(f"{args.url}: {'ready' if ok else 'not ready'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="edgevlm-client", description=__doc__)
    ap.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    sub = ap.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="ask a question, optionally about an image")
    ask.add_argument("question")
    ask.add_argument("--image", help="image file (JPEG, PNG, ...)")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--top-p", type=float)
    ask.add_argument("--top-k", type=int)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--timeout-s", type=float, default=300.0)
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    ask.set_defaults(func=cmd_ask)
    chat = sub.add_parser("chat", help="multi-turn chat (reads questions from stdin)")
    chat.add_argument("--image", help="image file the conversation is about")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--timeout-s", type=float, default=300.0)
    chat.set_defaults(func=cmd_chat)
    health = sub.add_parser("health", help="is the server ready?")
    health.set_defaults(func=cmd_health)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except EdgeVLMError as e:
        print(f"edgevlm-client: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
