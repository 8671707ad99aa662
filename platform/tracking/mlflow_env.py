"""MLflow's process environment: switch off its network side effects, hand it the store's S3 credentials.

MLflow reads both from environment variables, so they must be set before it is first
imported (telemetry) or before its artefact store first talks to S3 (boto3's variables).
"""

from __future__ import annotations

import os


def quiet_mlflow_env() -> None:
    """Switch off MLflow's network side effects before it is first imported (the platform runs offline)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow validates clashing pins of a logged model with `pip install --dry-run` (the index)
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")


def s3_env_for_mlflow(settings) -> None:
    """MLflow's S3 artefact store reads boto3's environment; fill it from Settings if unset."""
    scheme = "https" if settings.s3_secure else "http"
    os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", f"{scheme}://{settings.s3_endpoint}")
    if settings.s3_access_key is not None:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", settings.s3_access_key.get_secret_value())
    if settings.s3_secret_key is not None:
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", settings.s3_secret_key.get_secret_value())
    if settings.s3_region:
        os.environ.setdefault("AWS_DEFAULT_REGION", settings.s3_region)
