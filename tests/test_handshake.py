import pytest

from fastproxy.handshake import MAX_REQUEST_HEAD, check_request_head, check_upgrade


@pytest.mark.parametrize(
    "head, status",
    [
        (b"GET /ws HTTP/1.1\r\nHost: x", None),
        (b"GET /health HTTP/1.1", None),
        (b"POST /health HTTP/1.1\r\nHost: x", 405),
        (b"HEAD / HTTP/1.1", 405),
        (b"GET / HTTP/1.0", 400),
        (b"GET / HTTP/2.0", 400),
        (b"GET /", 400),
        (b"GET  / HTTP/1.1", 400),
        (b"\x16\x03\x01 tls hello", 400),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101, 431),
        (b"GET / HTTP/1.1\r\nX: " + b"y" * MAX_REQUEST_HEAD, 431),
    ],
)
def test_request_head_checks(head: bytes, status: int | None) -> None:
    refusal = check_request_head(head)
    assert (refusal and refusal.status) == status
    if refusal is not None:
        raw = refusal.to_bytes()
        assert raw.startswith(f"HTTP/1.1 {status} ".encode()) and b"b'" not in raw
        assert b"Connection: close\r\n" in raw and b'{"error":"' in raw
        assert (b"Allow: GET\r\n" in raw) == (status == 405)


def test_upgrade_version_check() -> None:
    assert check_upgrade({"sec-websocket-version": "13"}) is None
    refusal = check_upgrade({"sec-websocket-version": "8"})
    assert refusal is not None and refusal.status == 426
    assert ("Sec-WebSocket-Version", "13") in refusal.headers
    assert check_upgrade({}) is not None
