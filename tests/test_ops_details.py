"""Small operator-facing details: a bad HOST is named, down_since is epoch ms."""

from __future__ import annotations

import time

import pytest

from fastproxy.config import ConfigError, load
from fastproxy.upstream import UpstreamPool, UpstreamSettings


@pytest.mark.parametrize("host", ["not a host", "exa mple.com", "-bad-", "a..b"])
def test_bad_host_names_the_variable(host: str) -> None:
    with pytest.raises(ConfigError, match=r"^HOST=.* is not valid: expected an IP address"):
        load(environ={"HOST": host})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "localhost", "proxy-1.internal"])
def test_good_hosts(host: str) -> None:
    assert load(environ={"HOST": host}).host == host


def test_down_since_is_epoch_milliseconds() -> None:
    pool = UpstreamPool(
        UpstreamSettings(url="ws://127.0.0.1:1/v5/public/linear"),
        on_data=lambda *a: None,
        on_failed=lambda *a: None,
        on_reset=lambda *a: None,
    )
    assert pool.status()["down_since"] is None
    pool.down_since = time.monotonic() - 5.0
    shown = pool.status()["down_since"]
    assert isinstance(shown, int)
    assert abs(shown - (time.time() - 5.0) * 1000) < 1000
