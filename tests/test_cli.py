from __future__ import annotations

from pathlib import Path

import uvicorn

from sentinel_proxy.cli import uvicorn_options
from sentinel_proxy.config import load_config


def test_uvicorn_runs_on_asyncio_loop_with_httptools() -> None:
    # uvloop starved a few connections for seconds at 512 connections (bench/RESULTS.md).
    options = uvicorn_options(load_config(None, env={}))
    assert options["loop"] == "asyncio"
    assert options["http"] == "httptools"


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
