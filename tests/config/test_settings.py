"""The settings loader: defaults, environment overrides, and start-up errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import DEFAULT_CONFIG_PATH, SettingsError, WorkerSettings, load_pools, load_settings


def test_settings_default_file_loads_with_documented_values() -> None:
    settings = load_settings(DEFAULT_CONFIG_PATH, {})
    model = settings.models["@cf/meta/llama-3.1-8b-instruct"]
    assert (model.context_window_tokens, model.default_max_tokens) == (7968, 256)
    assert (model.prompt_nano_usd_per_token, model.completion_nano_usd_per_token) == (280, 830)
    assert settings.models["@cf/meta/llama-3.1-8b-instruct-fp8"].context_window_tokens == 32000
    assert model.input_schema_path.is_file()


def test_settings_environment_overrides_cast_by_type() -> None:
    settings = load_settings(
        DEFAULT_CONFIG_PATH,
        {
            "TOLLGATE_SERVER__PORT": "9000",
            "TOLLGATE_VALIDATION__SPECIAL_TOKENS": "allow",
            "TOLLGATE_UPSTREAM__BETWEEN_TOKENS_TIMEOUT_SECONDS": "2.5",
            "TOLLGATE_ROUTING__PREFIX_AFFINITY": "true",
            "TOLLGATE_POOLS__BF16__WORKERS": "http://a:8000, http://b:8000",
            "UNRELATED": "x",
        },
    )
    assert settings.server.port == 9000 and settings.validation.special_tokens == "allow"
    assert settings.upstream.between_tokens_timeout_seconds == 2.5
    assert settings.routing.prefix_affinity is True
    assert settings.pools["bf16"].workers == (WorkerSettings(url="http://a:8000"), WorkerSettings(url="http://b:8000"))


def test_settings_config_path_can_come_from_the_environment(tmp_path: Path) -> None:
    custom = tmp_path / "custom.yaml"
    custom.write_text(DEFAULT_CONFIG_PATH.read_text().replace("port: 8080", "port: 8181"))
    assert load_settings(environ={"TOLLGATE_CONFIG": str(custom)}).server.port == 8181


def test_settings_are_frozen() -> None:
    settings = load_settings(DEFAULT_CONFIG_PATH, {})
    with pytest.raises(AttributeError):
        settings.server.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.models["x"] = settings.models["@cf/meta/llama-3.1-8b-instruct"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TOLLGATE_SERVER__PORT": "eighty"}, "server.port: expected int"),
        ({"TOLLGATE_SERVER__PORT": "0"}, "server.port: must be greater than 0"),
        ({"TOLLGATE_SERVER__PORT": "65536"}, "server.port: must be at most 65535"),
        ({"TOLLGATE_SERVER__PROT": "80"}, "server.prot: unknown key"),
        ({"TOLLGATE_REDIS__SOCKET_TIMEOUT_SECONDS": "-1"}, "redis.socket_timeout_seconds: must be a finite, non-neg"),
        ({"TOLLGATE_SERVER__DRAIN_SECONDS": "inf"}, "server.drain_seconds: must be a finite, non-negative"),
        ({"TOLLGATE_VALIDATION__SPECIAL_TOKENS": "maybe"}, "validation.special_tokens: expected one of reject, allow"),
        ({"TOLLGATE_POOLS__BF16__WORKERS": "ftp://x"}, "pools.bf16.workers[0]: expected an http(s) URL"),
        ({"TOLLGATE_AUTH": "x"}, "auth: expected a mapping"),
        ({"TOLLGATE_ADMIN__TOKEN": "short"}, "admin.token: use at least 32 random characters"),
        ({"TOLLGATE_METRICS__TOKEN": "x" * 31}, "metrics.token: use at least 32 random characters"),
    ],
)
def test_settings_bad_value_fails_naming_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=r"^" + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_settings(DEFAULT_CONFIG_PATH, environ)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("pool: bf16", "pool: nope"), "models.@cf/meta/llama-3.1-8b-instruct.pool: no pool named 'nope'"),
        (
            ("    context_window_tokens: 7968", "    #"),
            "models.@cf/meta/llama-3.1-8b-instruct.context_window_tokens: missing",
        ),
        (
            ("prompt_nano_usd_per_token: 280", "prompt_nano_usd_per_token: 0.28"),
            "prompt_nano_usd_per_token: expected int",
        ),
        (
            ("input_schema: llama-3.1-8b-instruct.input.json", "input_schema: missing.json"),
            "input_schema: no such file",
        ),
        (("tokenizer:\n  path:", "tokenizer: [1]\n#  path:"), "tokenizer: expected a mapping"),
    ],
)
def test_settings_bad_file_fails_naming_the_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(DEFAULT_CONFIG_PATH.read_text().replace(*edit, 1))
    with pytest.raises(SettingsError) as error:
        load_settings(path, {})
    assert message in str(error.value)


def test_settings_unreadable_file_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yaml", {})
    broken = tmp_path / "broken.yaml"
    broken.write_text("server: [unclosed")
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(broken, {})


def test_settings_workers_take_a_url_or_a_mapping_and_pools_reload_checked(tmp_path: Path) -> None:
    custom = tmp_path / "pools.yaml"
    text = DEFAULT_CONFIG_PATH.read_text()
    text = text.replace(
        "  fp8:\n    workers: [http://127.0.0.1:8001]",
        "  fp8:\n    workers:\n      - http://127.0.0.1:8001\n"
        "      - {url: 'http://w2:8000/', weight: 3, lora: [pirate]}",
    )
    custom.write_text(text)
    settings = load_settings(custom, {})
    assert settings.pools["fp8"].workers == (
        WorkerSettings(url="http://127.0.0.1:8001"),
        WorkerSettings(url="http://w2:8000/", weight=3.0, lora=("pirate",)),
    )
    assert load_pools(settings, custom, {}) == settings.pools
    custom.write_text(text.replace("    pool: fp8", "    pool: gone"))
    with pytest.raises(SettingsError, match="no pool named 'gone'"):
        load_pools(settings, custom, {})
    custom.write_text(text.replace("weight: 3", "weight: 0"))
    with pytest.raises(SettingsError, match=r"pools.fp8.workers\[1\].weight"):
        load_settings(custom, {})
    custom.write_text(text.replace("'http://w2:8000/'", "http://127.0.0.1:8001"))
    with pytest.raises(SettingsError, match="listed twice"):
        load_settings(custom, {})
