"""The Experts page on a real RL run: a short GRPO run of the real align engine (tiny base model, generated
arithmetic prompts, routing replay off so the update's routing may drift from the rollout's) logged to a
real MLflow (SQLite in the home) and recorded in the catalog as the align task records it (its MLflow run,
its expert-load artefact as an output). The page must show rollout-vs-update MaxVio per layer over steps and
the routing agreement, from what the engine logged."""

from __future__ import annotations

import pytest
import torch

from test_posttrain_rl import _cfg, _world  # the RL tests' tiny world (base export + prompt set)

from moeflow.platform.posttrain.generated import GeneratedDataConfig

STEPS = 4


@pytest.fixture(scope="module")
def rl_home(tmp_path_factory):
    from moeflow.platform.catalog import Catalog
    from moeflow.platform.posttrain.align import run_align
    from moeflow.platform.settings import Settings
    from moeflow.platform.tracking import MLflowTracker

    home = tmp_path_factory.mktemp("dash-rl") / "home"
    settings = Settings(home=home)
    settings.ensure_dirs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        world = _world(home, GeneratedDataConfig(max_functions=0, num_arithmetic=120, max_operand=10,
                                                 heldout_fraction=0.15))
        tracker = MLflowTracker(settings.tracking_uri, settings.project)
        with tracker.start_run("align-grpo") as mlflow_run_id:
            result = run_align(_cfg(max_steps=STEPS, log_every=1, checkpoint_every=0, routing_replay=False, lr=2e-2,
                                    ppo_epochs=2, eval_prompts=4), world["store"], model_uri=world["base_uri"],
                               data_uri=world["sets"].prompt_uri, output_prefix="runs/dash-grpo", tracker=tracker)
    finally:
        torch.set_num_threads(threads)
    catalog = Catalog(settings.catalog_db_url, project=settings.project)
    run_id = catalog.start_run("align", {"method": "grpo"}, mlflow_run_id=mlflow_run_id)
    catalog.add_lineage(run_id, inputs=[world["base_uri"]], outputs=[result.hf_uri, result.expert_load_uri])
    catalog.finish_run(run_id, "succeeded", metrics={"exact_match": result.after.get("exact_match", 0.0)})
    catalog.close()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEFLOW_HOME", str(home))
        yield {"home": home, "run": run_id, "mlflow_run": mlflow_run_id}


def test_rl_routing_rows_from_the_logged_run(rl_home):
    from moeflow.dashboard import data
    from moeflow.dashboard.sources import open_mlflow
    from moeflow.platform.settings import get_settings

    client = open_mlflow(get_settings())
    keys = data.rl_routing_keys(client.get_run(rl_home["mlflow_run"]).data.metrics)
    rl = data.rl_routing(data.metric_history(client, rl_home["mlflow_run"], keys))
    rollout = [r for r in rl["maxvio"] if r["phase"] == "rollout"]
    update = [r for r in rl["maxvio"] if r["phase"] == "update"]
    layers = {r["layer"] for r in rollout}
    assert layers and layers == {r["layer"] for r in update}
    assert {r["step"] for r in rollout} == {r["step"] for r in update} == set(range(1, STEPS + 1))
    assert all(r["maxvio"] >= 0 for r in rl["maxvio"])
    agreement = [r for r in rl["agreement"] if r["layer"] != "mean"]
    assert {r["layer"] for r in agreement} == layers
    assert all(0.0 < r["agreement"] <= 1.0 for r in rl["agreement"])
    assert min(r["agreement"] for r in rl["agreement"]) < 1.0  # replay off: the update re-routed some tokens
    # a pretraining run's history (update MaxVio only, no rollout) is not an RL run
    only_update = [{"metric": "maxvio_batch/layer0", "step": 1, "value": 0.5}]
    assert data.rl_routing(only_update) == {"maxvio": [], "agreement": []}


def test_experts_page_shows_rollout_vs_update_maxvio_and_agreement(rl_home):
    from streamlit.testing.v1 import AppTest

    def page():
        from moeflow.dashboard.views import experts

        experts.render()

    app = AppTest.from_function(page, default_timeout=60)
    app.query_params["run"] = rl_home["run"]
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    specs = [c.proto.spec for c in app.get("vega_lite_chart")]
    rl_maxvio = [s for s in specs if "MaxVio per layer (" in s]
    assert len(rl_maxvio) == 1 and '"strokeDash": {"field": "phase"' in rl_maxvio[0]
    assert any("routing agreement" in s for s in specs)
    assert any("agreement at step 4" in c.value for c in app.caption)
