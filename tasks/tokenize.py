"""The tokenize stage: curated documents -> BPE tokenizer + token shards on the store."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact

from moeflow.platform import artifacts as A
from moeflow.platform.data.tokenize import TokenizeConfig, run_tokenize
from moeflow.platform.stage import stage_run
from moeflow.tasks.common import STAGE_CACHE, STAGE_RETRY


@task(name="tokenize", cache_policy=STAGE_CACHE, persist_result=True, **STAGE_RETRY)
def tokenize_task(config: TokenizeConfig, curated_uri: str, dataset: str = "corpus",
                  num_workers: int | None = None, pipeline: dict | None = None) -> dict:
    with stage_run("tokenize", {**config.to_dict(), "dataset": dataset}, inputs=[curated_uri],
                   pipeline=pipeline) as st:
        result = run_tokenize(config, st.store, curated_uri=curated_uri,
                              output_prefix=f"datasets/{dataset}/tokens", num_workers=num_workers)
        st.add_output(result.tokenizer_uri, kind=A.TOKENIZER, name=A.tokenizer_name(dataset))
        st.add_output(result.uri, kind=A.TOKENS, name=A.tokens_name(dataset), stats=result.stats,
                      content_hash=result.content_hash)
        st.log_metrics(result.metrics())
        st.tracker.log_dict(result.stats, "tokenizer_stats.json")
        create_table_artifact(key="tokenize-stats", table=[{"stat": k, "value": v} for k, v in result.stats.items()],
                              description=f"token shards {result.uri}")
    return {"uri": result.uri, "tokenizer_uri": result.tokenizer_uri, "content_hash": result.content_hash,
            "stats": result.stats, "reused": result.reused}
