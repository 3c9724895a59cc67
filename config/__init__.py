"""Configuration: the default ``tollgate.yaml``, the published input schemas and the settings loader."""

from config.settings import (
    CONFIG_DIR,
    DEFAULT_CONFIG_PATH,
    SCHEMA_DIR,
    AuthSettings,
    LedgerSettings,
    ModelSettings,
    PoolSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    SettingsError,
    TokenizerSettings,
    UpstreamSettings,
    ValidationSettings,
    load_settings,
)

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG_PATH",
    "SCHEMA_DIR",
    "AuthSettings",
    "LedgerSettings",
    "ModelSettings",
    "PoolSettings",
    "RedisSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "TokenizerSettings",
    "UpstreamSettings",
    "ValidationSettings",
    "load_settings",
]
