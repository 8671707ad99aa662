"""The ``pipeline`` flow: curate -> tokenize -> pretrain -> evaluate.

Each stage is a cached task: re-running the pipeline after a failure skips the stages that
finished and resumes the failed one (pretraining from its last checkpoint). The pipeline
has its own catalog run and MLflow run; every stage run nests under it.
"""

from __future__ import annotations

from prefect import flow

from moeflow.platform.data.curate import CurateConfig
from moeflow.platform.data.tokenize import TokenizeConfig
from moeflow.platform.stage import stage_run
from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.train.evaluate import EvaluateConfig
from moeflow.tasks.common import flow_run_namer
from moeflow.tasks.curate import curate_task
from moeflow.tasks.evaluate import evaluate_task
from moeflow.tasks.pretrain import pretrain_task
from moeflow.tasks.tokenize import tokenize_task


@flow(name="pipeline", log_prints=True, flow_run_name=flow_run_namer("pipeline"))
def pipeline(
    run_name: str = "moe",
    pretrain: PretrainConfig = PretrainConfig(),  # first: what people change (steps, lr, model preset)
    curate: CurateConfig = CurateConfig(),
    tokenize: TokenizeConfig = TokenizeConfig(),
    evaluate: EvaluateConfig = EvaluateConfig(),
    num_workers: int | None = None,
    train_workers: int = 1,
    use_gpu: bool = False,
) -> dict:
    config = {"curate": curate.model_dump(mode="json"), "tokenize": tokenize.to_dict(),
              "pretrain": pretrain.to_dict(), "evaluate": evaluate.to_dict(), "run_name": run_name}
    with stage_run("pipeline", config) as run:
        ids = {"catalog_run_id": run.run_id, "mlflow_run_id": run.mlflow_run_id}
        # curate
        curated = curate_task(curate, num_workers=num_workers, pipeline=ids)
        # tokenize
        tokens = tokenize_task(tokenize, curated["uri"], dataset=curate.name, num_workers=num_workers, pipeline=ids)
        # pretrain
        trained = pretrain_task(pretrain, tokens["uri"], run_name=run_name, num_workers=train_workers,
                                use_gpu=use_gpu, pipeline=ids)
        # evaluate
        metrics = evaluate_task(evaluate, trained["checkpoint_uri"], tokens["uri"], pipeline=ids)
        run.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
    return {"curated_uri": curated["uri"], "tokens_uri": tokens["uri"], "checkpoint_uri": trained["checkpoint_uri"],
            "hf_uri": trained["hf_uri"], "expert_load_uri": trained["expert_load_uri"], "eval": metrics}
