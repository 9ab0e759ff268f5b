"""The `sentinel-proxy` command: load the configuration once, then serve it, in this
process or under the supervisor of `--workers N` (which hands the workers that same
configuration). `sentinel-proxy check-config [PATH]` loads it and prints it instead."""

from __future__ import annotations

import argparse
import functools
import logging.config
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from sentinel_proxy import __version__
from sentinel_proxy.check import describe
from sentinel_proxy.config import LOG_LEVELS, Config, file_descriptors, load_config
from sentinel_proxy.exceptions import ConfigError
from sentinel_proxy.logs import logging_config
from sentinel_proxy.protocol import protocol_class, raise_file_limit
from sentinel_proxy.server import serve
from sentinel_proxy.workers import run_workers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentinel-proxy",
        description="A session-sticky reverse proxy for OpenAI-compatible APIs. Clients use "
        "http://HOST:PORT/v1 as their base URL.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML configuration file (default: $SENTINEL_CONFIG; none: one provider at "
        "$SENTINEL_UPSTREAM_URL and the in-memory session store)",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8080)")
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes (default 1; more than one needs session.redis_url)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default info)")
    parser.add_argument(
        "--log-format", choices=("text", "json"), help="log line format (default text)"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="serve two built-in demo providers, demo-a and demo-b, behind the alias 'demo': "
        "no network, no key; the configuration file may set anything but providers and models",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(
        dest="command", title="commands (none: serve)", metavar="[COMMAND]"
    )
    check = commands.add_parser(
        "check-config",
        help="check a configuration and print its routing table, without starting",
        description="Load a configuration as the proxy would (file, environment, --demo) and "
        "print its routing table; exit 0, or 2 with one line naming the key at fault.",
    )
    check.add_argument(
        "path", nargs="?", metavar="PATH", help="TOML file (default: --config, $SENTINEL_CONFIG)"
    )
    # SUPPRESS: absent here, the --demo given before the command stands.
    check.add_argument(
        "--demo", action="store_true", default=argparse.SUPPRESS, help="as the proxy's --demo"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGHUP reads the configuration again as here: the same file, environment and flags.
    load = functools.partial(resolve_config, args, os.environ)
    try:
        config = load()
    except ConfigError as exc:
        print(f"sentinel-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        sys.stdout.write(describe(config))
        return 0
    # Before any worker starts: workers inherit the limit.
    raise_file_limit(file_descriptors(config))
    options = uvicorn_options(config)
    if config.server.workers == 1:
        return serve(config, options, load=load)
    logging.config.dictConfig(options["log_config"])
    return run_workers(config, uvicorn_options, load)


def resolve_config(args: argparse.Namespace, env: Mapping[str, str]) -> Config:
    """The configuration that parsed command-line `args` start with."""
    overrides = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    path = getattr(args, "path", None) or args.config
    return load_config(path, env=env, overrides=overrides, demo=args.demo)


def uvicorn_options(config: Config) -> dict[str, Any]:
    """uvicorn's settings for one worker of this configuration."""
    server = config.server
    # Here, before any worker starts: workers inherit the limit.
    raise_file_limit(file_descriptors(config))
    return {
        "host": server.host,
        "port": server.port,
        # Not uvloop: while saturated it took on new connections about one every 70 ms, so
        # some clients waited seconds for a first answer; on asyncio's loop the slowest of 512
        # connections waited 0.78 s, at the same CPU per request (bench/RESULTS.md).
        "loop": "asyncio",
        # uvicorn's httptools protocol with deadlines and a head size limit (protocol.py).
        "http": protocol_class(server),
        # uvicorn counts the connection asking too: one more lets max_connections in.
        "limit_concurrency": server.max_connections + 1,
        "lifespan": "on",
        "access_log": False,
        # Client addresses are not used, so X-Forwarded-* need no parsing.
        "proxy_headers": False,
        "log_config": logging_config(server.log_level, server.log_format),
        "log_level": server.log_level,
        # The upstream's own Server and Date headers pass through; uvicorn's would double them.
        "server_header": False,
        "date_header": False,
        "timeout_graceful_shutdown": server.shutdown_grace_seconds,
        "backlog": 4096,
    }
