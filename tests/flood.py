"""A flooding client in its own process, so that it competes with the proxy for real.

`python -m tests.flood PORT KIND SECONDS` connects to ws://127.0.0.1:PORT/ws, sends frames of
KIND (`ping`, `pong`, `text`) as fast as the socket takes them for at most SECONDS, reads what
comes back, and prints one JSON line: how many frames it sent, how many pongs and error replies
it got, and the close code (null if none came).
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson

from tests.proxyutil import RawClient

BATCH = 500


def _frame(opcode: int, payload: bytes) -> bytes:
    # a fixed mask is as valid as a random one and keeps the batch prebuilt
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def flood(port: int, kind: str, seconds: float) -> dict[str, object]:
    raw = await RawClient(port).connect()
    frame = {
        "ping": _frame(0x9, b"p"),
        "pong": _frame(0xA, b"p"),
        "text": _frame(0x1, b'{"op":"ping"}'),
    }[kind]
    batch = frame * BATCH
    result: dict[str, object] = {"sent": 0, "pongs": 0, "errors": 0, "close": None}

    async def read() -> None:
        try:
            while True:
                opcode, payload = await raw.read_frame(seconds + 5)
                if opcode == 0xA:
                    result["pongs"] = int(result["pongs"]) + 1  # type: ignore[call-overload]
                elif opcode == 0x8:
                    result["close"] = int.from_bytes(payload[:2], "big") if payload else 1005
                    return
                elif opcode == 0x1 and b'"op":"error"' in payload:
                    result["errors"] = int(result["errors"]) + 1  # type: ignore[call-overload]
                elif opcode == 0x1 and orjson.loads(payload).get("op") == "pong":
                    result["pongs"] = int(result["pongs"]) + 1  # type: ignore[call-overload]
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return

    reader = asyncio.get_running_loop().create_task(read())
    start = time.monotonic()
    try:
        while not reader.done() and time.monotonic() - start < seconds:
            raw.writer.write(batch)
            result["sent"] = int(result["sent"]) + BATCH  # type: ignore[call-overload]
            await raw.writer.drain()
    except ConnectionError:
        pass
    result["elapsed"] = round(time.monotonic() - start, 2)
    await asyncio.wait([reader], timeout=5)
    raw.close()
    return result


def main() -> None:
    port, kind, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    print(orjson.dumps(asyncio.run(flood(port, kind, seconds))).decode(), flush=True)


if __name__ == "__main__":
    main()
