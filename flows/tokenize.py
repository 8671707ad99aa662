"""The ``tokenize`` flow: a curated dataset -> tokenizer + token shards."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.data.tokenize import TokenizeConfig
from moeflow.tasks.common import latest_artifact_uri
from moeflow.tasks.tokenize import tokenize_task


@flow(name="tokenize", log_prints=True)
def tokenize(tokenize: TokenizeConfig = TokenizeConfig(), dataset: str = "tiny", curated_uri: str | None = None,
             num_workers: int | None = None) -> dict:
    """``curated_uri`` defaults to the newest curated version of ``dataset`` in the catalog."""
    curated_uri = curated_uri or latest_artifact_uri("dataset", f"{dataset}-curated")
    return tokenize_task(tokenize, curated_uri, dataset=dataset, num_workers=num_workers)
