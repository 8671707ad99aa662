"""The ``tokenize`` flow: a curated dataset -> tokenizer + token shards."""

from __future__ import annotations

from prefect import flow

from moeflow.platform.data.tokenize import TokenizeConfig
from moeflow.tasks.common import flow_run_namer, resolve_input
from moeflow.tasks.tokenize import tokenize_task


@flow(name="tokenize", log_prints=True, flow_run_name=flow_run_namer("tokenize"))
def tokenize(tokenize: TokenizeConfig = TokenizeConfig(), dataset: str = "tiny", curated_uri: str | None = None,
             num_workers: int | None = None) -> dict:
    """``curated_uri`` defaults to the newest curated version of ``dataset`` in the catalog."""
    curated_uri = curated_uri or resolve_input("tokenize", "curated_uri", dataset=dataset)
    return tokenize_task(tokenize, curated_uri, dataset=dataset, num_workers=num_workers)
