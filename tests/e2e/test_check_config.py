"""`sentinel-proxy check-config`, the real command: it prints and exits, starting nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.proxy_process import REPO_ROOT, run_proxy_to_exit

pytestmark = pytest.mark.e2e

EXAMPLE = REPO_ROOT / "config" / "sentinel.example.toml"
KEY = "sk-check-config-never-prints-this"


def test_prints_the_routing_table_and_exits_0() -> None:
    result = run_proxy_to_exit(
        ["check-config", str(EXAMPLE)], env={"OPENAI_API_KEY": KEY, "LOCAL_API_KEY": KEY}
    )

    assert result.returncode == 0, result
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"configuration: {EXAMPLE}"
    assert (
        "  openai  https://api.openai.com/v1  key: $OPENAI_API_KEY, prompt_cache_key added" in lines
    )
    assert "  fast   -> openai/gpt-4o-mini  weight 3 (75%)" in lines
    assert "  team-a  tier: smart  models: fast, smart" in lines
    assert KEY not in result.stdout


def test_the_environment_and_flags_count_as_when_serving() -> None:
    port = free_port()
    result = run_proxy_to_exit(
        ["--port", str(port), "check-config", "--demo"],
        env={"SENTINEL_REDIS_URL": "redis://:secret-pw@127.0.0.1:6390/0"},
    )

    assert result.returncode == 0, result
    assert f"listen: 127.0.0.1:{port}, 1 worker" in result.stdout
    assert "sessions: Redis at redis://127.0.0.1:6390/0," in result.stdout
    assert "secret-pw" not in result.stdout


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            '[[providers]]\nname = "a"\nbase_url = "http://127.0.0.1:9/v1"\n'
            '[models.fast]\ntargets = [{ provider = "b", model = "m" }]\n',
            "models.fast.targets[0].provider: unknown provider 'b'",
        ),
        ("[session]\nttl_seconds = -1\n", "session.ttl_seconds: must be between 1 and"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(tmp_path: Path, text: str, line: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)

    result = run_proxy_to_exit(["check-config", str(path)])

    assert result.returncode == 2, result
    assert result.stdout == ""
    [error] = result.stderr.splitlines()
    assert error.startswith(f"sentinel-proxy: configuration error: {line}"), error
