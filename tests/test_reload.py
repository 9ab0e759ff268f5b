"""Reading the configuration again: the same flags, one line for what came of it, a bad file
keeps the running configuration, settings that need a restart keep their running values."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest

from sentinel_proxy.config import load_config
from sentinel_proxy.reload import Loader, reread

PROVIDERS = """
[[providers]]
name = "a"
base_url = "http://a.test/v1"

[[providers]]
name = "b"
base_url = "http://b.test/v1"
"""


def loader(path: Path, **flags: object) -> Loader:
    overrides = {"host": None, "port": None, "workers": None, "log_level": None}
    return functools.partial(
        load_config, str(path), env={"B_KEY": "sk-b"}, overrides={**overrides, **flags}
    )


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("sentinel")]


def test_a_file_that_does_not_load_keeps_the_running_config_with_one_line_naming_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text(PROVIDERS)
    load = loader(path)
    running = load()
    path.write_text(PROVIDERS + '[models.fast]\ntargets = [{ provider = "c", model = "m" }]\n')
    with caplog.at_level(logging.INFO):
        assert reread(running, load) is None
    assert records(caplog) == [
        (
            logging.ERROR,
            "configuration not reloaded, still serving the previous one: "
            "models.fast.targets[0].provider: unknown provider 'c'",
        )
    ]


def test_the_flags_of_the_start_still_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text("[server]\nport = 7000\nlog_level = 'debug'\n" + PROVIDERS)
    load = loader(path, port=9000, log_level="warning")
    running = load()
    path.write_text("[server]\nport = 7001\nlog_level = 'info'\n" + PROVIDERS)
    config = reread(running, load)
    assert config is not None
    assert (config.server.port, config.server.log_level) == (9000, "warning")


def test_restart_settings_keep_their_running_values_and_the_rest_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text(PROVIDERS)
    load = loader(path)
    running = load()
    path.write_text(
        "[server]\nport = 7000\n[session]\nttl_seconds = 60\nredis_url = 'redis://:pw@r:1/0'\n"
        + PROVIDERS.replace('"http://b.test/v1"', '"http://b2.test/v1"\napi_key_env = "B_KEY"')
    )
    with caplog.at_level(logging.INFO):
        config = reread(running, load)
    assert config is not None
    assert (config.server.port, config.session.redis_url) == (8080, None)
    assert config.session.ttl_seconds == 60
    provider = config.provider("b")
    assert provider is not None and provider.base_url == "http://b2.test/v1"
    assert provider.api_key is not None and provider.api_key.reveal() == "sk-b"
    (warning, info) = records(caplog)
    assert warning == (
        logging.WARNING,
        "configuration reload: server.port, session.redis_url changed in the file and "
        "take(s) effect at the next start; the running values stay until then",
    )
    assert info == (
        logging.INFO,
        f"configuration reloaded from {path}: providers a,b, 0 alias(es); "
        "changed: providers, session",
    )
    assert "pw" not in caplog.text and "sk-b" not in caplog.text


def test_an_unchanged_file_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text(PROVIDERS)
    load = loader(path)
    running = load()
    with caplog.at_level(logging.INFO):
        assert reread(running, load) == running
    assert records(caplog) == [
        (
            logging.INFO,
            f"configuration reloaded from {path}: providers a,b, 0 alias(es); changed: nothing",
        )
    ]
