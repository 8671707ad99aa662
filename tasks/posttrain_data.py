"""The post-training data step: the built-in generated chat / preference / prompt sets, written and registered."""

from __future__ import annotations

from prefect import task

from moeflow.platform.posttrain.generated import GeneratedDataConfig, write_generated_sets
from moeflow.platform.stage import stage_run
from moeflow.tasks.common import STAGE_CACHE, STAGE_RETRY


@task(name="posttrain_data", cache_policy=STAGE_CACHE, persist_result=True, **STAGE_RETRY)
def posttrain_data_task(config: GeneratedDataConfig, curated_uri: str | None = None, dataset: str = "tiny",
                        pipeline: dict | None = None) -> dict:
    with stage_run("posttrain_data", {**config.to_dict(), "curated_uri": curated_uri, "dataset": dataset},
                   inputs=[curated_uri] if curated_uri else [], pipeline=pipeline) as st:
        sets = write_generated_sets(st.store, config, curated_uri=curated_uri, catalog=st.catalog, dataset=dataset)
        st.outputs += [sets.chat_uri, sets.preference_uri, sets.prompt_uri]
        st.log_metrics({f"{kind}/{split}": n for kind, counts in sets.stats.items() for split, n in counts.items()})
    return {"chat_uri": sets.chat_uri, "preference_uri": sets.preference_uri, "prompt_uri": sets.prompt_uri,
            "stats": sets.stats}
