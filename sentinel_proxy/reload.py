"""SIGHUP: read the configuration again, the way it was read at start (the same file, the
same environment, the same command-line flags), and say in one line what came of it.

A file that does not load keeps the running configuration. Settings that only a restart
can change (config.RESTART_SETTINGS) keep their running values while the rest is applied:
refusing the whole file instead would hold back a routing change for as long as the file
also carries, say, a new port meant for the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields

from sentinel_proxy.config import Config, keep_restart_settings
from sentinel_proxy.exceptions import ConfigError

logger = logging.getLogger("sentinel_proxy.reload")

# Builds the configuration from scratch, or raises ConfigError.
Loader = Callable[[], Config]


def reread(running: Config, load: Loader) -> Config | None:
    """The configuration to serve from now on, or None to keep `running`; logs the outcome."""
    try:
        loaded = load()
    except ConfigError as exc:
        logger.error("configuration not reloaded, still serving the previous one: %s", exc)
        return None
    config, waiting = keep_restart_settings(running, loaded)
    if waiting:
        logger.warning(
            "configuration reload: %s changed in the file and take(s) effect at the next "
            "start; the running values stay until then",
            ", ".join(waiting),
        )
    changed = [
        f.name for f in fields(Config) if getattr(running, f.name) != getattr(config, f.name)
    ]
    logger.info(
        "configuration reloaded from %s: providers %s, %d alias(es); changed: %s",
        config.source,
        ",".join(p.name for p in config.providers),
        len(config.aliases),
        ", ".join(changed) or "nothing",
    )
    return config
