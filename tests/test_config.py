import subprocess
import sys

import pytest

from fastproxy.config import BYBIT_MAINNET_WS, BYBIT_TESTNET_WS, Config, ConfigError, load


def test_defaults_match_the_original() -> None:
    config = load({}, {})
    assert config.redis_url == ""
    assert config.redis_max_connections == 50
    assert config.max_clients_total == 10000
    assert config.max_subscriptions_per_client == 100
    assert config.max_message_rate_per_client == 100
    assert config.client_idle_timeout == 300
    assert config.fanout_callback_timeout == 5
    assert config.environment == "production"
    assert config.debug is False
    assert config.bybit_ws_url == BYBIT_MAINNET_WS


def test_flags_win_over_env() -> None:
    env = {"PORT": "9000", "MAX_CLIENTS_TOTAL": "5", "DEBUG": "yes"}
    config = load({"port": "9100"}, env)
    assert (config.port, config.max_clients_total, config.debug) == (9100, 5, True)


def test_testnet_only_when_no_url_given() -> None:
    assert load({}, {"BYBIT_TESTNET": "true"}).bybit_ws_url == BYBIT_TESTNET_WS
    url = "ws://127.0.0.1:9001/v5/public/linear"
    assert load({}, {"BYBIT_TESTNET": "true", "BYBIT_WS_URL": url}).bybit_ws_url == url


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"PORT": "http"}, "PORT='http' is not valid: expected a whole number"),
        ({"MAX_CLIENTS_TOTAL": "0"}, "MAX_CLIENTS_TOTAL='0'"),
        ({"CLIENT_IDLE_TIMEOUT": "-1"}, "CLIENT_IDLE_TIMEOUT"),
        ({"CLIENT_IDLE_TIMEOUT": "nan"}, "CLIENT_IDLE_TIMEOUT"),
        ({"DEBUG": "maybe"}, "DEBUG='maybe' is not valid: expected true or false"),
        ({"LOG_FORMAT": "xml"}, "json or text"),
        ({"BYBIT_WS_URL": "https://x"}, "ws:// or wss://"),
        ({"REDIS_URL": "http://x"}, "redis://"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/0?ttl=0"}, "ttl"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/0?cluster=maybe"}, "cluster"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({}, env)
    assert words in str(info.value)


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--port='x'"):
        load({"port": "x"}, {})


def test_cli_bad_value_is_one_line_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastproxy", "--max-clients-total", "lots"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--max-clients-total='lots'" in lines[0] and "Traceback" not in result.stderr


def test_readme_config_table_is_current() -> None:
    from pathlib import Path

    from fastproxy.config import describe

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert describe() in readme, "README's configuration table is stale: paste config.describe()"


def test_list_settings_given_in_code_as_one_string_are_parsed_as_the_environment_would_be() -> None:
    config = Config(
        api_keys="k1, k2",  # type: ignore[arg-type]
        trusted_proxies="10.0.0.0/8,127.0.0.1",  # type: ignore[arg-type]
        allowed_origins="https://app.example.com",  # type: ignore[arg-type]
    )
    assert config.api_keys == ("k1", "k2")
    assert config.trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")
    assert config.allowed_origins == ("https://app.example.com",)
    assert config.replace(port=1).trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")
    with pytest.raises(ValueError):
        Config(trusted_proxies="not-a-network")  # type: ignore[arg-type]
