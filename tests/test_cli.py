from __future__ import annotations

import pickle
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sentinel_proxy.cli import uvicorn_options
from sentinel_proxy.config import load_config
from sentinel_proxy.protocol import ClientProtocol


def test_uvicorn_runs_on_asyncio_loop_with_httptools() -> None:
    # uvloop starved a few connections for seconds at 512 connections (bench/RESULTS.md).
    options = uvicorn_options(load_config(None, env={}))
    assert options["loop"] == "asyncio"
    assert issubclass(options["http"].func, HttpToolsProtocol)


def test_options_follow_the_configuration() -> None:
    config = load_config(None, env={}, overrides={"host": "0.0.0.0", "port": 9123})
    options = uvicorn_options(config)
    assert (options["host"], options["port"]) == ("0.0.0.0", 9123)
    # Every key is one uvicorn.Config accepts: a typo would fail at start-up, not here.
    uvicorn.Config(app=lambda: None, **options)


def test_the_grace_period_keeps_its_fraction(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text("[server]\nshutdown_grace_seconds = 1.5\n")
    options = uvicorn_options(load_config(str(path), env={}))
    assert options["timeout_graceful_shutdown"] == 1.5


def test_client_connections_get_the_protocol_with_its_limits_and_the_cap() -> None:
    config = load_config(
        None, env={}, overrides={"max_connections": 100, "header_timeout_seconds": 2.5}
    )
    options = uvicorn_options(config)
    # --workers pickles the options into each worker process.
    protocol = pickle.loads(pickle.dumps(options["http"]))
    assert protocol.func is ClientProtocol
    assert protocol.keywords["limits"] == config.server
    # uvicorn counts the connection that asks too: 101 lets 100 in.
    assert options["limit_concurrency"] == 101
