"""The Streamlit layer over ``data.py``: one cached set of sources per home, short-lived cached reads.

Reads are cached for ``TTL_S`` seconds: long enough that clicking between pages does not re-read
MLflow and the store, short enough that a running run's new metrics show up on the next refresh.
Cached functions take the home as a string key (the handles themselves are not hashable).
"""

from __future__ import annotations

import streamlit as st

from moeflow.platform.settings import Settings, get_settings

from . import data
from .sources import Sources, database_exists, open_sources

TTL_S = 5.0


def settings() -> Settings:
    return get_settings()


@st.cache_resource(show_spinner=False)
def _sources(home: str, catalog_url: str, tracking_uri: str, store_uri: str) -> Sources:
    return open_sources(get_settings())


def sources() -> Sources:
    """The home's sources; reopened once a missing one appears (the first run in a fresh home)."""
    s = get_settings()
    key = (str(s.home), s.catalog_db_url, s.tracking_uri, s.store_uri)
    found = _sources(*key)
    appeared = ((found.catalog is None and database_exists(s.catalog_db_url))
                or (found.mlflow_missing and database_exists(s.tracking_uri))
                or (found.store is None and (s.uses_s3 or s.store_root.is_dir())))
    if appeared:
        _sources.clear()
        found = _sources(*key)
    return found


@st.cache_data(ttl=TTL_S, show_spinner=False)
def overview(home: str, limit: int) -> list[dict]:
    return data.pipeline_overview(sources().catalog, limit=limit)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def runs(home: str, stage: str | None = None, pipeline_run_id: str | None = None) -> list[dict]:
    return sources().catalog.list_runs(limit=500, stage=stage, pipeline_run_id=pipeline_run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def run(home: str, run_id: str) -> dict | None:
    from moeflow.platform.catalog.catalog import NotFoundError

    try:
        return sources().catalog.get_run(run_id)
    except NotFoundError:
        return None


@st.cache_data(ttl=TTL_S, show_spinner=False)
def metric_history(home: str, mlflow_run_id: str) -> list[dict]:
    return data.metric_history(sources().mlflow, mlflow_run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def expert_load_runs(home: str) -> list[dict]:
    return data.expert_load_runs(sources().catalog)


@st.cache_data(ttl=60, show_spinner=False)
def expert_load(home: str, uri: str) -> dict:
    return data.read_expert_load(uri, settings())


@st.cache_data(ttl=TTL_S, show_spinner=False)
def rl_routing(home: str, mlflow_run_id: str) -> dict[str, list[dict]]:
    """An RL run's rollout-vs-update MaxVio and routing agreement (only those keys' histories are read)."""
    client = sources().mlflow
    if client is None or not mlflow_run_id:
        return {"maxvio": [], "agreement": []}
    keys = data.rl_routing_keys(client.get_run(mlflow_run_id).data.metrics)
    return data.rl_routing(data.metric_history(client, mlflow_run_id, keys) if keys else [])


@st.cache_data(ttl=60, show_spinner=False)
def specialisation(home: str) -> list[dict]:
    return data.specialisation_reports(sources().catalog, settings())


@st.cache_data(ttl=TTL_S, show_spinner=False)
def curated(home: str) -> list[dict]:
    return data.curated_datasets(sources().catalog)


@st.cache_data(ttl=60, show_spinner=False)
def curation_report(home: str, uri: str) -> dict:
    return data.curation_report(uri, settings())


@st.cache_data(ttl=TTL_S, show_spinner=False)
def tokens(home: str) -> list[dict]:
    return data.token_datasets(sources().catalog)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def lineage(home: str, pipeline_run_id: str | None) -> dict:
    return data.lineage_graph(sources().catalog, pipeline_run_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def models(home: str) -> list[dict]:
    return data.registered_models(sources().mlflow)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def catalog_models(home: str) -> list[dict]:
    return sources().catalog.list_models(limit=500)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def decisions(home: str) -> list[dict]:
    return data.deploy_decisions(sources().catalog, settings())
