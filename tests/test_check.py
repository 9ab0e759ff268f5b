"""What check-config prints (check.py): the routing table in words, never a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentinel_proxy.check import describe
from sentinel_proxy.cli import main
from sentinel_proxy.config import load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "sentinel.example.toml"
KEY = "sk-do-not-print-me"

CONFIG = """
[session]
redis_url = "redis://user:hunter2@10.0.0.5:7000/3?password=hunter3"

[[providers]]
name = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"

[[providers]]
name = "local"
base_url = "http://127.0.0.1:11434/v1"
forward_client_key = true

[[providers]]
name = "spare"
base_url = "http://127.0.0.1:11435/v1"

[models.fast]
targets = [
  { provider = "openai", model = "gpt-4o-mini", weight = 3 },
  { provider = "local",  model = "llama3.1",    weight = 1 },
]

[models.smart]
targets = [{ provider = "openai", model = "gpt-4o" }]
on_target_failure = "error"
"""


def test_providers_aliases_weights_and_store_in_words(tmp_path: Path) -> None:
    path = tmp_path / "sentinel.toml"
    path.write_text(CONFIG)
    text = describe(load_config(str(path), env={"OPENAI_API_KEY": KEY}))

    assert text == (
        f"configuration: {path}\n"
        "listen: 127.0.0.1:8080, 1 worker\n"
        "providers (the first also serves every model that is no alias):\n"
        "  openai  https://api.openai.com/v1  key: $OPENAI_API_KEY, prompt_cache_key added\n"
        "  local   http://127.0.0.1:11434/v1  key: the client's own (its Authorization goes"
        " upstream)\n"
        "  spare   http://127.0.0.1:11435/v1  key: none (a client's credentials are not sent)\n"
        "aliases (a request for one gets one of its targets, by weight):\n"
        "  fast   -> openai/gpt-4o-mini  weight 3 (75%)\n"
        "         -> local/llama3.1      weight 1 (25%)\n"
        "         on target failure: another target, re-pinned\n"
        "  smart  -> openai/gpt-4o  weight 1 (100%)\n"
        "         on target failure: 503, pin kept\n"
        "other models: to openai, unchanged\n"
        "requests naming no model: none (400: model field is required)\n"
        "ejection: after 5 failures in a row, for 30 s\n"
        "users: none (clients are not authenticated)\n"
        "conversation id: body:conversation_id, then header:x-conversation-id\n"
        "sessions: Redis at redis://10.0.0.5:7000/3, ttl 86400 s, store errors: closed\n"
    )
    assert KEY not in text and "hunter" not in text and "user:" not in text


def test_demo_and_defaults() -> None:
    demo = describe(load_config(None, env={}, overrides={"port": 9000}, demo=True))
    defaults = describe(load_config(None, env={}))

    assert demo.splitlines()[:2] == [
        "configuration: no file (defaults and environment) with --demo",
        "listen: 127.0.0.1:9000, 1 worker",
    ]
    assert "  demo-a  http://demo-a.sentinel.invalid/v1  key: none (built-in demo" in demo
    assert "  demo  -> demo-a/demo-small  weight 1 (50%)\n" in demo
    assert "        -> demo-b/demo-large  weight 1 (50%)\n" in demo
    assert "sessions: in memory (this process only, at most 100000), ttl 86400 s\n" in demo
    assert "aliases: none\nother models: to openai, unchanged\n" in defaults


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rediss://:pw@[::1]/", "rediss://[::1]:6379/"),
        ("redis://cache", "redis://cache:6379/0"),
        ("unix:///run/redis.sock?db=2&password=pw", "unix:/run/redis.sock"),
    ],
)
def test_redis_urls_lose_their_credentials(url: str, shown: str) -> None:
    config = load_config(None, env={"SENTINEL_REDIS_URL": url})
    assert f"sessions: Redis at {shown}," in describe(config)


def test_check_config_prints_the_table_and_exits_0(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("LOCAL_API_KEY", KEY)
    assert main(["check-config", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"configuration: {EXAMPLE}\n") and "  fast   -> openai/gpt-4o-mini" in out
    assert "  team-a  tier: smart  models: fast, smart" in out
    assert "requests naming no model: fast" in out
    assert KEY not in out and err == ""


def test_check_config_path_defaults_to_sentinel_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[[providers]]\nname = "only"\nbase_url = "http://127.0.0.1:9/v1"\n')
    monkeypatch.setenv("SENTINEL_CONFIG", str(path))
    assert main(["check-config"]) == 0
    assert "  only  http://127.0.0.1:9/v1" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--demo", "check-config"], ["check-config", "--demo"]])
def test_check_config_takes_demo_before_or_after(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.delenv("SENTINEL_CONFIG", raising=False)
    assert main(argv) == 0
    assert "with --demo" in capsys.readouterr().out


def test_check_config_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["check-config", str(EXAMPLE)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "sentinel-proxy: configuration error: providers[0].api_key_env: environment variable "
        "OPENAI_API_KEY is not set\n"
    )


def test_a_cluster_or_sentinel_store_is_named_as_such(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[session]\nredis_url = "redis://:pw@10.0.0.5:7000"\ncluster = true\n')
    shown = describe(load_config(str(cluster), env={}))
    assert "sessions: Redis Cluster via redis://10.0.0.5:7000/0, ttl 86400 s" in shown
    assert "pw" not in shown
    sentinel = tmp_path / "sentinel.toml"
    sentinel.write_text(
        '[session]\nsentinels = ["10.0.0.7:26379", "[::1]:26380"]\nsentinel_service = "m"\n'
    )
    assert (
        "sessions: Redis primary of 'm' (sentinels 10.0.0.7:26379, ::1:26380), ttl 86400 s"
        in describe(load_config(str(sentinel), env={}))
    )
