"""The curate stage: raw sources -> a curated dataset artefact, with its funnel."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import CacheKeyFnPolicy

from moeflow.platform import artifacts as A
from moeflow.platform.data.curate import CurateConfig, default_output_prefix, inputs_cache_key, run_curation
from moeflow.platform.data.sources import STDLIB
from moeflow.platform.stage import stage_run
from moeflow.tasks.common import STAGE_CACHE, STAGE_RETRY

log = logging.getLogger(__name__)


def source_uri(uri: str) -> str:
    """A source as a lineage URI (the catalog and MLflow want a scheme)."""
    if uri == STDLIB:
        return f"{STDLIB}://{sys.version_info.major}.{sys.version_info.minor}"
    return uri if "://" in uri else Path(uri).resolve().as_uri()


@task(name="curate", persist_result=True,  # + the inputs' fingerprint: edited files are not a cache hit
      cache_policy=STAGE_CACHE + CacheKeyFnPolicy(cache_key_fn=lambda _ctx, inputs: inputs_cache_key(inputs["config"])),
      **STAGE_RETRY)
def curate_task(config: CurateConfig, num_workers: int | None = None, pipeline: dict | None = None) -> dict:
    inputs = [source_uri(source.uri) for source in config.sources]
    with stage_run("curate", config.model_dump(mode="json"), inputs=inputs, pipeline=pipeline) as st:
        result = run_curation(config, st.store, output_prefix=default_output_prefix(config),
                              num_workers=num_workers)
        funnel = result.stats.get("funnel", [])
        st.add_output(result.uri, kind=A.CURATED, name=A.curated_name(config.name), content_hash=result.content_hash,
                      stats={"num_docs_in": result.num_docs_in, "num_docs_out": result.num_docs_out,
                             "num_excluded": result.num_excluded, "num_quarantined": result.num_quarantined})
        st.log_metrics({"docs_in": result.num_docs_in, "docs_out": result.num_docs_out,
                        "docs_excluded": result.num_excluded, "docs_quarantined": result.num_quarantined,
                        "shards": result.num_shards, "shards_skipped": result.num_tasks_skipped,
                        "wall_seconds": result.wall_seconds})
        for row in funnel:  # the funnel in the run's logs too (the library logger reaches Prefect)
            log.info("funnel %s", " ".join(f"{k}={v}" for k, v in row.items()))
        if funnel:
            st.tracker.log_table(funnel, artifact_file="funnel.json")
            create_table_artifact(key="curation-funnel", table=funnel,
                                  description=f"curation funnel of {result.uri}")
        st.tracker.log_dict(result.stats, "curation_stats.json")
    return {"uri": result.uri, "content_hash": result.content_hash, "num_docs_out": result.num_docs_out,
            "reused": result.reused}
