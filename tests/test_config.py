from __future__ import annotations

import hashlib
import resource
from dataclasses import fields, replace
from pathlib import Path

import pytest

from sentinel_proxy.config import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_UPSTREAM_URL,
    FILE_DESCRIPTOR_RESERVE,
    Config,
    DebugConfig,
    IdSource,
    Provider,
    Secret,
    ServerConfig,
    SessionConfig,
    UpstreamConfig,
    keep_restart_settings,
    load_config,
)
from sentinel_proxy.exceptions import ConfigError

FULL = """
[server]
host = "0.0.0.0"
port = 9000

[session]
redis_url = "redis://127.0.0.1:6390/0"
ttl_seconds = 600
header = "X-Conv"
on_store_error = "open"

[[providers]]
name = "openai"
base_url = "https://api.openai.com/v1/"
api_key_env = "OPENAI_API_KEY"

[[providers]]
name = "local"
base_url = "http://127.0.0.1:11434/v1"

[models.fast]
targets = [
  { provider = "openai", model = "gpt-4o-mini", weight = 3 },
  { provider = "local",  model = "llama3.1" },
]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sentinel.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_any_config() -> None:
    config = load_config(None, env={})
    assert [p.name for p in config.providers] == ["openai"]
    assert config.providers[0].base_url == DEFAULT_UPSTREAM_URL
    assert config.providers[0].api_key is None
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.session.redis_url is None
    assert config.session.ttl_seconds == 86400
    assert config.session.on_store_error == "closed"


def test_full_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), env={"OPENAI_API_KEY": "sk-secret"})
    assert config.server.port == 9000
    # The older `header` key: the body field, then this header in place of x-conversation-id.
    assert [s.label for s in config.session.id_sources] == [
        "body:conversation_id",
        "header:x-conv",
    ]
    assert config.session.ttl_seconds == 600
    assert config.providers[0].base_url == "https://api.openai.com/v1"
    assert config.providers[0].api_key == Secret("sk-secret")
    fast = config.aliases["fast"]
    assert [(t.provider, t.model, t.weight) for t in fast.targets] == [
        ("openai", "gpt-4o-mini", 3),
        ("local", "llama3.1", 1),
    ]


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    env = {
        "OPENAI_API_KEY": "k",
        "SENTINEL_CONFIG": write(tmp_path, FULL),
        "SENTINEL_PORT": "9100",
        "SENTINEL_HOST": "127.0.0.2",
        "SENTINEL_REDIS_URL": "redis://10.0.0.1:6379/1",
        "SESSION_TTL_SECONDS": "30",
    }
    config = load_config(None, env=env, overrides={"port": 9200, "host": None})
    assert config.server.port == 9200
    assert config.server.host == "127.0.0.2"
    assert config.session.ttl_seconds == 30
    assert config.session.redis_url == Secret("redis://10.0.0.1:6379/1")


def test_upstream_url_from_environment() -> None:
    config = load_config(None, env={"SENTINEL_UPSTREAM_URL": "http://127.0.0.1:9999/v1/"})
    assert config.providers[0].base_url == "http://127.0.0.1:9999/v1"


def test_secrets_never_show_in_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), env={"OPENAI_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(config)
    assert "6390" not in repr(config.session)  # the Redis URL may hold a password
    assert config.providers[0].api_key is not None
    assert config.providers[0].api_key.reveal() == "sk-very-secret"


def test_config_is_frozen() -> None:
    config = load_config(None, env={})
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]
    assert isinstance(config, Config)


@pytest.mark.parametrize(
    ("text", "env", "key", "words"),
    [
        (
            '[models.x]\ntargets = [{provider = "nope", model = "m"}]',
            {},
            "models.x.targets[0].provider",
            "unknown provider",
        ),
        (
            '[[providers]]\nname = "a"\nbase_url = "ftp://x"',
            {},
            "providers[0].base_url",
            "not an http",
        ),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x:99999"',
            {},
            "providers[0].base_url",
            "bad port",
        ),
        ("[session]\nttl_seconds = -1", {}, "session.ttl_seconds", "between 1 and"),
        ("[session]\nttl_seconds = 10000000000", {}, "session.ttl_seconds", "between 1 and"),
        ('[session]\nheader = "authorization"', {}, "session.header", "something else"),
        ('[session]\nheader = "Content-Type"', {}, "session.header", "something else"),
        ('[session]\nheader = "x-sentinel-id"', {}, "session.header", "something else"),
        ('[session]\nheader = "x conv"', {}, "session.header", "header name"),
        ('[session]\nredis_url = "redis://h/zero"', {}, "session.redis_url", "database number"),
        ("[session]\ntimeout_seconds = 1e300", {}, "session.timeout_seconds", "at most"),
        ("[server]\nworkers = 100000", {}, "server.workers", "between 1 and"),
        (
            '[[providers]]\nname = "a\\u0001"\nbase_url = "http://x"',
            {},
            "providers[0].name",
            "printable",
        ),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x"\n'
            f'[models.fast]\ntargets = [{{provider = "a", model = "{"m" * 257}"}}]',
            {},
            "models.fast.targets[0].model",
            "at most 256",
        ),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x"\n'
            '[models." fast"]\ntargets = [{provider = "a", model = "m"}]',
            {},
            "models.' fast'",
            "printable",
        ),
        ('[session]\non_store_error = "maybe"', {}, "session.on_store_error", "closed"),
        ('[session]\nredis_url = "http://x"', {}, "session.redis_url", "redis://"),
        ("[sesion]\nttl_seconds = 1", {}, "sesion", "unknown key"),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x"\napi_key_env = "K"',
            {},
            "providers[0].api_key_env",
            "K is not set",
        ),
        ('[debug]\nenabled = true\ntoken = "short"', {}, "debug.token", "16"),
        ("not = [toml", {}, "config", "not valid TOML"),
        ("[upstream]\nchunk_timeout = 0", {}, "upstream.chunk_timeout", "above 0"),
        ('[upstream]\npool_timeout = "5"', {}, "upstream.pool_timeout", "number"),
        ("[upstream]\nstream_idle_seconds = -1", {}, "upstream.stream_idle_seconds", "above 0"),
        (
            "[upstream]\nread_timeout = 60\nchunk_timeout = 5",
            {},
            "upstream.read_timeout",
            "replaced by first_byte_timeout and chunk_timeout",
        ),
        ("[server]\nheader_timeout_seconds = 0", {}, "server.header_timeout_seconds", "above 0"),
        ('[server]\nheader_timeout_seconds = "10"', {}, "server.header_timeout_seconds", "number"),
        (
            "[server]\nbody_min_rate_bytes_per_second = 0",
            {},
            "server.body_min_rate_bytes_per_second",
            "at least 1",
        ),
        (
            "[server]\nbody_min_rate_bytes_per_second = 1.5",
            {},
            "server.body_min_rate_bytes_per_second",
            "integer",
        ),
        (
            "[server]\nbody_rate_window_seconds = -1",
            {},
            "server.body_rate_window_seconds",
            "above 0",
        ),
        ("[server]\nmax_connections = 0", {}, "server.max_connections", "at least 1"),
        ("", {"SESSION_TTL_SECONDS": "day"}, "SESSION_TTL_SECONDS", "integer"),
        ('[metrics]\nmodels = "gpt-4o"', {}, "metrics.models", "array"),
        ('[metrics]\nmodels = ["ok", " padded"]', {}, "metrics.models[1]", "printable"),
        ("[metrics]\nmodel = []", {}, "metrics.model", "unknown key"),
        ('[tracing]\nconversation_key_env = "K"', {}, "tracing.conversation_key_env", "K is not"),
        (
            "",
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://",
        ),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, text: str, env: dict[str, str], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert info.value.key == key
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("text", "env", "key", "secret"),
    [
        (
            '[[providers]]\nname = "a"\nbase_url = "https://user:hunter2@x/v1"',
            {},
            "providers[0].base_url",
            "hunter2",
        ),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x"\napi_key_env = "K"',
            {"K": "sk-hunter2\n"},
            "providers[0].api_key_env",
            "hunter2",
        ),
        ('[session]\nredis_url = "redis://:hun#ter2@h:6379/0"', {}, "session.redis_url", "hun"),
        ('[session]\nredis_url = "redis://:hunter2@h:port/0"', {}, "session.redis_url", "hunter2"),
    ],
)
def test_bad_secrets_are_named_by_key_and_never_shown(
    tmp_path: Path, text: str, env: dict[str, str], key: str, secret: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert info.value.key == key
    assert secret not in str(info.value)


def test_percent_encoded_redis_password_is_accepted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[session]\nredis_url = "redis://:a%23b@h:1/2"'), env={})
    assert config.session.redis_url == Secret("redis://:a%23b@h:1/2")


def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(path), env={})


def test_fractional_grace_period_is_kept(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[server]\nshutdown_grace_seconds = 0.5"), env={})
    assert config.server.shutdown_grace_seconds == 0.5


def test_upstream_timeouts(tmp_path: Path) -> None:
    default = load_config(None, env={}).upstream
    assert (default.first_byte_timeout, default.chunk_timeout) == (600, 300)
    assert (default.pool_timeout, default.stream_idle_seconds) == (5, 300)
    text = (
        "[upstream]\nconnect_timeout = 2\nfirst_byte_timeout = 900\nchunk_timeout = 60\n"
        "pool_timeout = 0.5\nstream_idle_seconds = 120\n"
    )
    upstream = load_config(write(tmp_path, text), env={}).upstream
    assert (upstream.connect_timeout, upstream.first_byte_timeout) == (2, 900)
    assert (upstream.chunk_timeout, upstream.pool_timeout) == (60, 0.5)
    assert upstream.stream_idle_seconds == 120


def test_read_timeout_of_older_configs_sets_first_byte_and_chunk(tmp_path: Path) -> None:
    upstream = load_config(write(tmp_path, "[upstream]\nread_timeout = 45\n"), env={}).upstream
    assert (upstream.first_byte_timeout, upstream.chunk_timeout) == (45, 45)


def test_unreadable_file() -> None:
    with pytest.raises(ConfigError, match="cannot read /nonexistent.toml"):
        load_config("/nonexistent.toml", env={})


def test_memory_store_refuses_several_workers() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}, overrides={"workers": 2})
    assert info.value.key == "server.workers"
    config = load_config(None, env={"SENTINEL_REDIS_URL": "redis://x"}, overrides={"workers": 2})
    assert config.server.workers == 2


def test_the_example_config_loads() -> None:
    path = Path(__file__).parent.parent / "config" / "sentinel.example.toml"
    config = load_config(str(path), env={"OPENAI_API_KEY": "sk-x", "LOCAL_API_KEY": "k"})
    assert [p.name for p in config.providers] == ["openai", "local"]
    assert config.aliases["fast"].targets[0].weight == 3
    assert config.routing.default_model == "fast"
    team_a, team_b = config.users
    # The keys the comments name are the keys the hashes are of.
    assert team_a.key_sha256 == hashlib.sha256(b"sk-team-a-example").digest()
    assert team_b.key_sha256 == hashlib.sha256(b"sk-team-b-example").digest()


def test_client_connection_limits(tmp_path: Path) -> None:
    defaults = load_config(None, env={}).server
    assert (defaults.header_timeout_seconds, defaults.max_connections) == (10.0, 1024)
    assert (defaults.body_min_rate_bytes_per_second, defaults.body_rate_window_seconds) == (
        1024,
        10.0,
    )
    text = (
        "[server]\nheader_timeout_seconds = 2.5\nbody_min_rate_bytes_per_second = 100\n"
        "body_rate_window_seconds = 30\nmax_connections = 50\n"
    )
    server = load_config(write(tmp_path, text), env={}).server
    assert server.header_timeout_seconds == 2.5
    assert server.body_min_rate_bytes_per_second == 100
    assert server.body_rate_window_seconds == 30.0
    assert server.max_connections == 50


def test_a_connection_cap_beyond_the_file_limit_is_refused(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # The client connections, the upstream pool and a reserve must fit under the hard limit.
    most = hard - DEFAULT_MAX_CONNECTIONS - FILE_DESCRIPTOR_RESERVE
    if hard == resource.RLIM_INFINITY or most < 1:
        pytest.skip(f"the hard limit on open files is {hard}")
    fits = load_config(write(tmp_path, f"[server]\nmax_connections = {most}"), env={})
    assert fits.server.max_connections == most
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[server]\nmax_connections = {most + 1}"), env={})
    assert info.value.key == "server.max_connections"
    assert f"hard limit of {hard}" in str(info.value)


USERS = """
[routing]
default_model = "fast"

[[providers]]
name = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"

[models.fast]
targets = [{ provider = "openai", model = "gpt-4o-mini" }]
[models.smart]
targets = [{ provider = "openai", model = "gpt-4o" }]
on_target_failure = "error"

[[users]]
external_id = "team-a"
key_sha256 = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
tier = "smart"
models = ["smart", "gpt-4o"]

[[users]]
external_id = "team.b_2"
key_sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
"""


def test_users_tiers_and_routing(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, USERS), env={"OPENAI_API_KEY": "k"})
    team_a, team_b = config.users
    assert team_a.external_id == "team-a" and team_a.tier == "smart"
    assert team_a.key_sha256 == bytes.fromhex(
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    )
    assert team_a.models == frozenset({"smart", "gpt-4o"})
    assert (team_b.tier, team_b.models) == (None, None)
    assert config.routing.default_model == "fast"
    assert config.aliases["smart"].on_target_failure == "error"
    assert config.aliases["fast"].on_target_failure == "reselect"


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (("team-a", "team:a"), "users[0].external_id", "never ':'"),
        (('tier = "smart"', 'tier = "fastest"'), "users[0].tier", "no alias"),
        (('tier = "smart"', 'tier = "fast"'), "users[0].tier", "not among"),
        (("9F86D081884C", "XF86D081884C"), "users[0].key_sha256", "64 hex"),
        (
            (
                "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752",
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            ),
            "users[1].key_sha256",
            "another user",
        ),
        (("team.b_2", "team-a"), "users[1].external_id", "twice"),
        (('default_model = "fast"', 'default_model = "gpt-4o"'), "routing.default_model", "alias"),
        (('api_key_env = "OPENAI_API_KEY"', ""), "providers[0].api_key_env", "its own key"),
        (('"smart", "gpt-4o"]', '"smart", ""]'), "users[0].models", "model names"),
    ],
)
def test_bad_users_and_routing_name_the_key(
    tmp_path: Path, change: tuple[str, str], key: str, words: str
) -> None:
    text = USERS.replace(*change)
    assert text != USERS
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={"OPENAI_API_KEY": "k"})
    assert info.value.key == key
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x"\n'
            '[models.f]\ntargets = [{provider = "a", model = "m", weight = 0}]',
            "models.f.targets",
            "weight 0",
        ),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x"\n'
            '[models.f]\ntargets = [{provider = "a", model = "m"}, {provider = "a", model = "m"}]',
            "models.f.targets[1].model",
            "twice",
        ),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x"\n'
            '[models.f]\non_target_failure = "retry"\ntargets = [{provider = "a", model = "m"}]',
            "models.f.on_target_failure",
            "reselect",
        ),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x"\napi_key_env = "K"\n'
            "forward_client_key = true",
            "providers[0].forward_client_key",
            "choose one",
        ),
    ],
)
def test_bad_aliases_and_providers_name_the_key(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={"K": "k"})
    assert info.value.key == key
    assert words in str(info.value)


def test_a_client_key_goes_on_only_where_a_provider_opts_in(tmp_path: Path) -> None:
    assert load_config(None, env={}).providers[0].forward_client_key
    text = '[[providers]]\nname = "a"\nbase_url = "http://x"\n'
    assert not load_config(write(tmp_path, text), env={}).providers[0].forward_client_key


def test_id_sources_in_order_and_which_are_the_proxy_s_own(tmp_path: Path) -> None:
    text = (
        '[session]\nid_sources = ["header:X-Session-Id", "body:conversation_id", '
        '"header:x-conversation-id", "body:prompt_cache_key", "body:user"]\n'
        'implicit_key_env = "HASH_KEY"\n'
    )
    session = load_config(write(tmp_path, text), env={"HASH_KEY": "h" * 16}).session
    assert [(s.label, s.owned) for s in session.id_sources] == [
        ("header:x-session-id", False),
        ("body:conversation_id", True),
        ("header:x-conversation-id", True),
        ("body:prompt_cache_key", False),
        ("body:user", False),
    ]
    assert session.hash_key == Secret("h" * 16)
    defaults = load_config(None, env={}).session
    assert [s.label for s in defaults.id_sources] == [
        "body:conversation_id",
        "header:x-conversation-id",
    ]


@pytest.mark.parametrize(
    ("text", "env", "key", "words"),
    [
        (
            '[session]\nheader = "x-conv"\nid_sources = ["header:x-conv"]',
            {},
            "session.header",
            "id_sources says it",
        ),
        ('[session]\nid_sources = ["body:messages"]', {}, "session.id_sources[0]", "body:"),
        ('[session]\nid_sources = ["cookie:sid"]', {}, "session.id_sources[0]", "header:"),
        ('[session]\nid_sources = ["header:authorization"]', {}, "session.id_sources[0]", "else"),
        (
            '[session]\nid_sources = ["body:user", "body:user"]',
            {},
            "session.id_sources[1]",
            "twice",
        ),
        ("[session]\nid_sources = []", {}, "session.id_sources", "non-empty"),
        ('[session]\nimplicit_key_env = "K"', {"K": "short"}, "session.implicit_key_env", "16"),
        (
            '[[providers]]\nname = "a"\nbase_url = "http://x"\n'
            '[models.f]\nimplicit_sessions = true\ntargets = [{provider = "a", model = "m"}]',
            {},
            "models.f.implicit_sessions",
            "implicit_key_env",
        ),
    ],
)
def test_bad_id_sources_and_keys_name_the_key(
    tmp_path: Path, text: str, env: dict[str, str], key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    assert info.value.key == key
    assert words in str(info.value)
    assert "short" not in str(info.value)


def test_prompt_cache_is_on_by_default_for_openai_only(tmp_path: Path) -> None:
    text = (
        '[[providers]]\nname = "openai"\nbase_url = "https://api.openai.com/v1"\n'
        '[[providers]]\nname = "local"\nbase_url = "http://127.0.0.1:11434/v1"\n'
        '[[providers]]\nname = "vllm"\nbase_url = "http://10.0.0.9/v1"\nprompt_cache = true\n'
    )
    providers = load_config(write(tmp_path, text), env={}).providers
    assert [p.prompt_cache for p in providers] == [True, False, True]


def test_a_reload_keeps_the_running_value_of_what_needs_a_restart() -> None:
    running = load_config(None, env={"SENTINEL_REDIS_URL": "redis://r:1/0"}, overrides={})
    loaded = Config(
        providers=(Provider("other", "http://other.test/v1"),),
        server=ServerConfig(
            host="0.0.0.0",
            port=1,
            workers=2,
            log_level="debug",
            log_format="json",
            shutdown_grace_seconds=1,
            header_timeout_seconds=1,
            body_min_rate_bytes_per_second=1,
            body_rate_window_seconds=1,
            max_connections=1,
        ),
        session=SessionConfig(
            redis_url=Secret("redis://s:2/0"),
            ttl_seconds=5,
            id_sources=(IdSource("header", "x-c", owned=True),),
            on_store_error="open",
            timeout_seconds=1,
            breaker_failures=1,
            breaker_reset_seconds=1,
            redis_max_connections=1,
            memory_max_sessions=1,
        ),
        upstream=UpstreamConfig(
            connect_timeout=1,
            first_byte_timeout=1,
            chunk_timeout=1,
            pool_timeout=1,
            stream_idle_seconds=1,
            max_connections=1,
            max_body_bytes=1,
        ),
        debug=DebugConfig(enabled=True, token=Secret("t" * 16)),
    )
    config, waiting = keep_restart_settings(running, loaded)
    assert waiting == [
        *(f"server.{f.name}" for f in fields(ServerConfig)),
        "session.redis_url",
        "session.timeout_seconds",
        "session.breaker_failures",
        "session.breaker_reset_seconds",
        "session.redis_max_connections",
        "session.memory_max_sessions",
        "upstream.max_connections",
    ]
    assert config.server == running.server
    assert config.session == replace(
        running.session,
        ttl_seconds=5,
        id_sources=(IdSource("header", "x-c", owned=True),),
        on_store_error="open",
    )
    assert config.upstream == replace(loaded.upstream, max_connections=DEFAULT_MAX_CONNECTIONS)
    assert (config.providers, config.debug) == (loaded.providers, loaded.debug)
    assert keep_restart_settings(running, running) == (running, [])


def test_metrics_models(tmp_path: Path) -> None:
    assert load_config(None, env={}).metrics.models == ()
    config = load_config(write(tmp_path, '[metrics]\nmodels = ["gpt-4o", "o3"]'), env={})
    assert config.metrics.models == ("gpt-4o", "o3")


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t:443/traces",
            },
            "https://t:443/traces",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "True"}, None),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "false"},
            "http://c:4318/v1/traces",
        ),
    ],
)
def test_tracing_follows_the_otel_variables(env: dict[str, str], endpoint: str | None) -> None:
    tracing = load_config(None, env=env).tracing
    assert tracing.endpoint == endpoint
    assert tracing.service_name == "sentinel-proxy"


def test_tracing_service_name_and_conversation_key(tmp_path: Path) -> None:
    # None: the tracer makes a key of its own process; the session's shared key if any.
    assert load_config(None, env={}).tracing.conversation_key is None
    shared = load_config(
        write(tmp_path, '[session]\nimplicit_key_env = "H"'), env={"H": "h" * 16}
    ).tracing.conversation_key
    assert shared == Secret("h" * 16)
    config = load_config(
        write(tmp_path, '[tracing]\nconversation_key_env = "TRACE_KEY"'),
        env={"TRACE_KEY": "k" * 32, "OTEL_SERVICE_NAME": "gateway-eu"},
    )
    assert config.tracing.conversation_key == Secret("k" * 32)
    assert config.tracing.service_name == "gateway-eu"
    assert "kkkk" not in repr(config)


def test_cluster_and_sentinel_settings(tmp_path: Path) -> None:
    default = load_config(None, env={}).session
    assert (default.cluster, default.sentinels, default.sentinel_service) == (False, (), None)
    text = '[session]\nredis_url = "redis://10.0.0.5:7000"\ncluster = true\n'
    assert load_config(write(tmp_path, text), env={}).session.cluster
    text = (
        '[session]\nsentinels = ["10.0.0.7:26379", "sentinel-b:26380", "[::1]:26381"]\n'
        'sentinel_service = "mymaster"\n'
    )
    session = load_config(write(tmp_path, text), env={}, overrides={"workers": 2}).session
    assert session.sentinels == (("10.0.0.7", 26379), ("sentinel-b", 26380), ("::1", 26381))
    assert (session.sentinel_service, session.redis_url) == ("mymaster", None)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("cluster = true", "session.cluster", "needs session.redis_url"),
        ('redis_url = "redis://h:1/2"\ncluster = true', "session.redis_url", "database 0"),
        ('redis_url = "redis://h:1?db=3"\ncluster = true', "session.redis_url", "database 0"),
        ('redis_url = "unix:///tmp/r.sock"\ncluster = true', "session.redis_url", "TCP"),
        ('redis_url = "redis://h:1"\ncluster = "yes"', "session.cluster", "true or false"),
        (
            'redis_url = "redis://h:1"\ncluster = true\nsentinels = ["h:2"]\n'
            'sentinel_service = "m"',
            "session.sentinels",
            "cannot go with session.cluster",
        ),
        ('sentinels = ["h:26379"]', "session.sentinel_service", "required"),
        ('sentinel_service = "m"', "session.sentinel_service", "needs session.sentinels"),
        ('sentinels = []\nsentinel_service = "m"', "session.sentinels", "non-empty array"),
        ('sentinels = "h:1"\nsentinel_service = "m"', "session.sentinels", "non-empty array"),
        ('sentinels = ["h"]\nsentinel_service = "m"', "session.sentinels", "[0] must be"),
        ('sentinels = ["h:1", "h:0"]\nsentinel_service = "m"', "session.sentinels", "[1] must"),
        ('sentinels = ["h:70000"]\nsentinel_service = "m"', "session.sentinels", "[0] must"),
        ('sentinels = [":1"]\nsentinel_service = "m"', "session.sentinels", "[0] must"),
        ('sentinels = ["h:1/x"]\nsentinel_service = "m"', "session.sentinels", "[0] must"),
        ('sentinels = [26379]\nsentinel_service = "m"', "session.sentinels", "[0] must"),
        ('sentinels = ["h:1", "h:1"]\nsentinel_service = "m"', "session.sentinels", "twice"),
        ('sentinels = ["h:1"]\nsentinel_service = " m"', "session.sentinel_service", "printable"),
        (
            'redis_url = "unix:///tmp/r.sock"\nsentinels = ["h:1"]\nsentinel_service = "m"',
            "session.redis_url",
            "not unix://",
        ),
    ],
)
def test_bad_cluster_and_sentinel_settings_name_the_key(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[session]\n{text}\n"), env={})
    assert info.value.key == key
    assert words in str(info.value)


def test_sentinels_are_a_shared_store_for_workers(tmp_path: Path) -> None:
    text = '[session]\nsentinels = ["h:26379"]\nsentinel_service = "m"\n'
    config = load_config(write(tmp_path, text), env={}, overrides={"workers": 3})
    assert config.server.workers == 3


def test_the_near_cache_is_on_for_every_redis_store_and_can_be_turned_off(
    tmp_path: Path,
) -> None:
    cluster = '[session]\nredis_url = "redis://h:1"\ncluster = true\n'
    sentinel = '[session]\nsentinels = ["h:1"]\nsentinel_service = "m"\n'
    single = '[session]\nredis_url = "redis://h:1"\n'
    for text in (cluster, sentinel, single):
        assert load_config(write(tmp_path, text), env={}).session.near_cache
        off = load_config(write(tmp_path, text + "near_cache = false\n"), env={})
        assert not off.session.near_cache
