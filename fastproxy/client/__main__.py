"""`python -m fastproxy.client ARG...`: print a stream's events, one JSON line each."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import orjson

from fastproxy.client import Client, ClientError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastproxy.client",
        description="Subscribe to fastproxy streams and print every event as a JSON line.",
    )
    parser.add_argument("args", nargs="+", metavar="ARG", help="e.g. ticker:BTCUSDT")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="the proxy's WS URL")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument("--count", type=int, default=0, help="stop after N events (0: never)")
    return parser.parse_args(argv)


async def run(options: argparse.Namespace) -> int:
    printed = 0
    out = sys.stdout
    async with Client(options.url, api_key=options.api_key) as client:
        await client.subscribe(*options.args)
        async for event in client:
            line = {"kind": event.kind, "arg": event.arg, "message": event.message}
            out.write(orjson.dumps(line).decode() + "\n")
            out.flush()
            printed += 1
            if options.count and printed >= options.count:
                break
    return 0


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        return asyncio.run(run(options))
    except (ClientError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
