"""One settings object for the whole platform (pydantic-settings, env prefix ``MOEFLOW_``).

The embedded default needs no set-up: everything lives under ``MOEFLOW_HOME``
(default ``~/.moeflow``) — a local-directory object store, SQLite databases for the
catalog, Prefect and MLflow, logs and pid files. Cluster mode is the same code with
other settings: an S3 endpoint + bucket, PostgreSQL URLs and a Ray address.

Values come from (highest first): explicit keyword arguments, ``MOEFLOW_*`` environment
variables, the optional config file (``MOEFLOW_CONFIG`` or ``$MOEFLOW_HOME/config.toml``),
then the defaults below. Derived values (paths, URLs) are computed here and nowhere else.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def _default_home() -> Path:
    # an empty MOEFLOW_HOME is refused by Settings (it would mean the current directory); here it only
    # must not make the config file source read ./config.toml
    return Path(os.environ.get("MOEFLOW_HOME") or Path.home() / ".moeflow").expanduser()


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads ``MOEFLOW_CONFIG`` or ``$MOEFLOW_HOME/config.toml`` when it exists."""

    def _data(self) -> dict[str, Any]:
        path = Path(os.environ.get("MOEFLOW_CONFIG", _default_home() / "config.toml")).expanduser()
        if not path.is_file():
            return {}
        with path.open("rb") as fh:
            data = tomllib.load(fh)
        return data.get("moeflow", data)

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return self._data().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data().items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOEFLOW_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="root of all embedded state")
    project: str = Field("moeflow", description="MLflow experiment / catalog project name")

    # object store: a local directory by default, S3 (MinIO or any S3 server) when s3_endpoint is set
    store_dir: Path | None = Field(None, description="local object store directory (default $HOME/store)")
    s3_endpoint: str | None = Field(None, description="host:port of an S3-compatible server")
    s3_bucket: str = "moeflow"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = False
    s3_region: str | None = None
    s3_retry_tries: int = Field(
        4, ge=1, le=30, description="attempts of each S3 request before a stage fails (transient errors only)")
    s3_retry_max_delay_s: float = Field(
        5.0, gt=0, le=300, description="cap of the exponential backoff between S3 attempts; with s3_retry_tries it "
        "sets how long a stage rides out an S3 restart (defaults: ~1.5 s; 10 tries, 5 s cap: ~25 s)")

    stage_retries: int = Field(
        2, ge=0, le=10, description="re-runs of a stage task after a store error that outlasted the S3 retries "
        "(TransientError only; a re-run resumes: committed artefacts are reused)")
    stage_retry_delay_s: float = Field(
        30.0, ge=0, le=600, description="wait before each stage re-run of stage_retries (an S3 server restarting)")

    # databases: SQLite files under home by default, PostgreSQL URLs in a cluster
    catalog_url: str | None = Field(None, description="SQLAlchemy URL of the lineage catalog")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow server or backend URI")
    mlflow_backend_uri: str | None = Field(None, description="backend store of the local MLflow server")
    prefect_api_url: str | None = Field(None, description="Prefect API of a remote server")
    prefect_database_url: str | None = Field(
        None, description="database of the Prefect server `moeflow up` starts (postgresql://...; default SQLite under home)")

    # local services
    host: str = "127.0.0.1"
    prefect_port: int = Field(4200, ge=1, le=65535, description="port of the local Prefect server")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="port of the local MLflow server")
    dashboard_port: int = Field(8501, ge=1, le=65535, description="port of the dashboard")
    ray_port: int = Field(6380, ge=1, le=65535, description="GCS port of the local Ray head started by `moeflow up`")

    # compute
    ray_address: str | None = Field(None, description="Ray cluster address; None starts a local Ray")
    ray_object_store_mb: int = Field(512, description="object store memory of a local Ray")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: all)")
    ray_placement_timeout_s: float = Field(
        120.0, gt=0, description="seconds training waits for Ray to place its workers before failing")
    ray_max_failures: int = Field(
        2, ge=-1, le=1000, description="times Ray Train restarts a training worker group that lost a worker "
        "(a dead process or node) from the last committed checkpoint; -1: without limit, 0: never")

    @field_validator("home", "store_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is set but empty (it would mean the current directory): unset it or name a directory")
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return (init_settings, env_settings, _TomlFileSource(settings_cls), file_secret_settings)

    # ---- derived values (one place) ----
    @property
    def store_root(self) -> Path:
        return (self.store_dir or self.home / "store").expanduser()

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_endpoint)

    @property
    def store_uri(self) -> str:
        return f"s3://{self.s3_bucket}" if self.uses_s3 else self.store_root.resolve().as_uri()

    @property
    def catalog_db_url(self) -> str:
        return self.catalog_url or f"sqlite:///{self.home / 'catalog.db'}"

    @property
    def mlflow_server_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def mlflow_backend(self) -> str:
        return self.mlflow_backend_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def tracking_uri(self) -> str:
        """Where runs are logged: the configured URI, else the local backend directly.

        Logging straight to the SQLite backend means flows work without ``moeflow up``;
        the MLflow server started by ``moeflow up`` serves the same database.
        """
        return self.mlflow_tracking_uri or self.mlflow_backend

    @property
    def mlflow_artifacts_root(self) -> str:
        return f"{self.store_uri}/mlflow-artifacts"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def prefect_db_url(self) -> str:
        """The Prefect server's database as Prefect wants it (an async driver: aiosqlite or asyncpg)."""
        url = self.prefect_database_url
        if not url:
            return f"sqlite+aiosqlite:///{self.prefect_home / 'prefect.db'}"
        for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+asyncpg://" + url[len(prefix):]
        return url

    @property
    def prefect_url(self) -> str:
        return self.prefect_api_url or f"http://{self.host}:{self.prefect_port}/api"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    def ensure_dirs(self) -> None:
        """Create the home's folders (and the local store's); ``HomeError`` names the one that cannot be."""
        folders = [(p, "MOEFLOW_HOME") for p in (self.home, self.log_dir, self.run_dir, self.prefect_home)]
        if not self.uses_s3:
            folders.append((self.store_root, "MOEFLOW_STORE_DIR" if self.store_dir else "MOEFLOW_HOME"))
        for path, setting in folders:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HomeError(f"cannot create {path} ({exc.strerror or exc}): set {setting} to a directory "
                                "this user can write") from None

    def masked(self) -> dict[str, Any]:
        """Effective settings with secrets masked and derived values added, for display."""
        data = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "********" if value.get_secret_value() else ""
            data[name] = str(value) if isinstance(value, Path) else value
        for name in ("store_uri", "catalog_db_url", "tracking_uri", "prefect_url", "dashboard_url"):
            data[name] = _mask_url(getattr(self, name))
        for name in ("catalog_url", "prefect_database_url", "mlflow_backend_uri"):
            data[name] = _mask_url(data[name]) if data[name] else None
        return data


def _mask_url(url: str) -> str:
    """Hide a password in ``scheme://user:password@host`` URLs."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":********"
        return f"{scheme}://{creds}@{host}"
    return url


class SettingsError(ValueError):
    """A setting (environment variable or config file) has a value the platform cannot use."""


class HomeError(SettingsError):
    """``MOEFLOW_HOME`` (or the store directory) cannot be created or written."""


def get_settings(**overrides: Any) -> Settings:
    """A fresh Settings (never cached: tests and CLI flags change the environment).

    A bad value raises ``SettingsError`` naming the environment variable, e.g.
    ``MOEFLOW_PREFECT_PORT='abc': Input should be a valid integer``.
    """
    from pydantic import ValidationError

    try:
        return Settings(**overrides)
    except ValidationError as err:
        raise SettingsError(settings_error_message(err)) from None


def settings_error_message(err) -> str:
    lines = []
    for e in err.errors()[:2]:
        name = str(e["loc"][0]) if e["loc"] else "settings"
        lines.append(f"MOEFLOW_{name.upper()}={e.get('input')!r}: {e['msg']} "
                     f"(environment or {os.environ.get('MOEFLOW_CONFIG', '$MOEFLOW_HOME/config.toml')})")
    return "\n".join(lines)
