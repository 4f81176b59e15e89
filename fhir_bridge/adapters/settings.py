"""Settings: ``config/fhir-bridge.toml`` (or ``FHIR_BRIDGE_CONFIG``) overridden by ``FHIR_BRIDGE_*`` variables.

Read once at start-up by the composition root (``fhir_bridge.main``) and passed down as arguments; nothing
reads the environment at import. Nested settings use ``__``: ``FHIR_BRIDGE_SOURCE__MAX_PAGES=50``; the most
used ones also have flat names (``FHIR_BRIDGE_SOURCE_URL``, ``FHIR_BRIDGE_REDIS_URL``, ``FHIR_BRIDGE_DATA_DIR``).

The default file is the copy shipped inside the package (``fhir_bridge/data/config``, a symlink to the top-level
``config/`` in a checkout), so an installed bridge finds it wherever it runs from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.resources import files
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fhir_bridge.errors import InvalidInput

# pip installs a wheel as plain files, so the packaged copy is a real path (the TOML source wants one)
DEFAULT_CONFIG = Path(str(files("fhir_bridge").joinpath("data", "config", "fhir-bridge.toml")))


DEFAULT_SOURCE_SCOPE = (
    "system/Patient.rs system/DocumentReference.rs system/Binary.r system/ImagingStudy.rs system/Endpoint.r"
)


class SourceSettings(BaseModel):
    """How we talk to the national-record source (timeouts in seconds)."""

    url: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    pool_timeout: float = 30.0
    concurrency: int = Field(default=8, ge=1, le=256)
    max_retries: int = Field(default=5, ge=0, le=20)
    backoff_initial: float = Field(default=0.2, ge=0)
    backoff_max: float = Field(default=10.0, ge=0)
    retry_after_cap: float = Field(default=30.0, ge=0)
    total_deadline: float = Field(default=120.0, gt=0)
    page_size: int = Field(default=100, ge=1, le=1000)
    max_pages: int = Field(default=200, ge=1)
    max_attachment_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_json_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    http2: bool = True
    bearer_token: str = ""
    client_cert: str = ""
    client_key: str = ""
    ca_bundle: str = ""
    # SMART Backend Services against the source's token endpoint (STANDARDS.md §8); empty token_url: none
    token_url: str = ""
    client_id: str = ""
    private_key_jwk: str = ""  # path of our private JWK (``fhir-bridge clients keygen``)
    scope: str = DEFAULT_SOURCE_SCOPE


class RedisSettings(BaseModel):
    url: str = ""
    server_binary: str = "redis-server"
    # the private server holds the audit log: an AuditEvent must be on disk before its answer leaves
    appendfsync: str = "always"
    cluster: bool = False  # url names a node of a Redis Cluster (issue 8: keys are designed for one)


class AuditSettings(BaseModel):
    """The audit trail (issue 7): checkpoint cadence, retention, which key signs."""

    checkpoint_every: int = Field(default=1000, ge=1)
    checkpoint_seconds: float = Field(default=60.0, gt=0)
    retention_days: int = Field(default=0, ge=0)  # 0: keep every event
    signing_key: str = ""  # a PKCS#8 P-384 PEM; empty: data_dir/keys/audit-signing.pem, created on first use
    verify_keys: list[str] = Field(default_factory=list)  # public JWK (Set) files of earlier signing keys


class AuthSettings(BaseModel):
    """SMART Backend Services (STANDARDS.md §8): who may get a token, and for how long."""

    clients_file: str = ""  # the client registry (JSON); empty: data_dir/clients.json
    token_lifetime: int = Field(default=300, ge=1, le=300)  # seconds; SMART: at most five minutes


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8080
    public_base_url: str = ""
    max_body_bytes: int = 10 * 1024 * 1024
    page_size: int = 20
    max_page_size: int = 200
    # TLS of `fhir-bridge serve` (PEM paths; empty tls_cert: plain HTTP) and client certificates (mutual TLS,
    # RFC 8705): tls_client_cert is "none", "optional" or "required", checked by fhir_bridge.adapters.tls
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_client_cert: str = "none"


class WorkerSettings(BaseModel):
    max_attempts: int = 5
    reclaim_idle_ms: int = 30_000
    retry_backoff_initial: float = 1.0
    retry_backoff_max: float = 60.0


class DeliverySettings(BaseModel):
    max_attempts: int = 30
    backoff_initial: float = 5.0
    backoff_max: float = 900.0
    webhook_timeout: float = 10.0


class SyncSettings(BaseModel):
    """Batch jobs for hospital IT (issue 8): worklists, refreshing open cases, deliveries."""

    # `sync worklist` calls the API as a registered platform client (SMART Backend Services): the API's FHIR
    # base (empty: api.public_base_url, else http://api.host:api.port/fhir), the client id and its private JWK
    api_url: str = ""
    client_id: str = ""
    private_key_jwk: str = ""
    worklist_concurrency: int = Field(default=4, ge=1, le=64)
    # system of the request identifiers a worklist gives its lines; a bare NIR's INS system
    request_system: str = "https://fhir-bridge.dev/fhir/NamingSystem/worklist-request"
    patient_system: str = "urn:oid:1.2.250.1.213.1.4.8"
    refresh_concurrency: int = Field(default=8, ge=1, le=64)
    refresh_imaging: bool = False  # also an ImagingStudy?_lastUpdated search per patient (a second search)
    delivery_kinds: list[str] = Field(default_factory=lambda: ["deliver-*"])  # job kinds `sync deliver` re-drives


class ScheduleSettings(BaseModel):
    """Cron expressions (5 fields, or 6 with seconds first) of the jobs the workers run; empty: off."""

    refresh: str = ""
    overdue: str = ""
    deliver: str = ""
    timezone: str = "UTC"
    # a tick missed by every worker (all down or stalled) is still run when one comes back within this long
    grace_seconds: float = Field(default=60.0, ge=0)


class ReferenceSettings(BaseModel):
    """One path per data file of ``config/`` (read by :mod:`fhir_bridge.adapters.reference_data`); empty: the
    file of that name in ``config_dir``."""

    reviewers: str = ""
    deadlines: str = ""
    reviewer_networks: str = ""
    write_back: str = ""
    roles: str = ""
    report_labels: str = ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FHIR_BRIDGE_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_dir: Path = Path(".data")
    # the data files (fhir_bridge.adapters.reference_data); empty: the copies shipped in the package
    config_dir: str = ""
    mappings_dir: str = ""
    profiles_dir: str = ""
    reference: ReferenceSettings = ReferenceSettings()
    source: SourceSettings = SourceSettings()
    redis: RedisSettings = RedisSettings()
    api: ApiSettings = ApiSettings()
    worker: WorkerSettings = WorkerSettings()
    delivery: DeliverySettings = DeliverySettings()
    audit: AuditSettings = AuditSettings()
    auth: AuthSettings = AuthSettings()
    sync: SyncSettings = SyncSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    log_level: str = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        kwargs = getattr(init_settings, "init_kwargs", {})
        toml_file = kwargs.pop("_config_file", None)
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=toml_file or DEFAULT_CONFIG),
        )


_FLAT_ALIASES = {
    "FHIR_BRIDGE_SOURCE_URL": ("source", "url"),
    "FHIR_BRIDGE_REDIS_URL": ("redis", "url"),
}


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the settings once: TOML file, then environment, then explicit overrides (CLI options)."""
    env = os.environ if env is None else env
    config_file = env.get("FHIR_BRIDGE_CONFIG") or str(DEFAULT_CONFIG)
    if not Path(config_file).is_file():
        raise InvalidInput(f"configuration file not found: {config_file}")
    init: dict[str, Any] = {"_config_file": config_file}
    for var, (section, key) in _FLAT_ALIASES.items():
        if env.get(var):
            init.setdefault(section, {})[key] = env[var]
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition("__")
        if key:
            init.setdefault(section, {})[key] = value
        else:
            init[section] = value
    return Settings(**init)


def clients_file(settings: Settings) -> Path:
    """Where the client registry is: ``auth.clients_file`` or ``data_dir/clients.json``."""
    return Path(settings.auth.clients_file) if settings.auth.clients_file else settings.data_dir / "clients.json"
