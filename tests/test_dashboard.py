"""The dashboard renders the catalog's runs and a pretraining run's expert-load heatmap
(Streamlit's AppTest runs the real script in-process)."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.platform.catalog import Catalog
from moeflow.platform.settings import get_settings
from moeflow.platform.store import open_store
from moeflow.platform.train.expert_load import NPZ_NAME, ExpertLoadRecorder


@pytest.fixture
def populated(moeflow_home):
    settings = get_settings()
    settings.ensure_dirs()
    catalog = Catalog.from_settings(settings)
    store = open_store(settings)
    smoke = catalog.start_run("smoke", {"message": "hi"})
    catalog.finish_run(smoke, "succeeded")
    recorder = ExpertLoadRecorder()
    rng = np.random.default_rng(0)
    for step in (10, 20, 30):
        recorder.record(step, rng.integers(1, 100, size=(2, 8)))
    with store.write_artifact("runs/x/expert_load") as w:
        w.put_bytes(NPZ_NAME, recorder.to_npz_bytes())
    pretrain = catalog.start_run("pretrain", {"max_steps": 30})
    catalog.add_lineage(pretrain, outputs=[w.uri])
    catalog.finish_run(pretrain, "succeeded")
    return {"smoke": smoke, "pretrain": pretrain}


def test_dashboard_lists_runs_and_draws_expert_load(populated, repo_root):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(repo_root / "dashboard" / "app.py"), default_timeout=120).run()
    assert not app.exception, app.exception
    table = app.dataframe[0].value
    assert set(table["id"]) == {populated["smoke"], populated["pretrain"]}
    assert set(table["stage"]) == {"smoke", "pretrain"}
    # the expert-load tab found the artefact through the catalog and drew it
    assert any("3 windows up to step 30; 8 experts" in c.value for c in app.caption)
    assert app.slider[0].max == 1  # two router rows


def test_dashboard_without_runs(moeflow_home, repo_root):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(repo_root / "dashboard" / "app.py"), default_timeout=120).run()
    assert not app.exception
    assert any("No runs yet" in i.value for i in app.info)
