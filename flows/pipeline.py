"""The ``pipeline`` flow: curate -> tokenize -> pretrain -> sft -> reward -> align(dpo) -> evaluate -> deploy.

Each stage is a cached task: re-running the pipeline after a failure skips the stages that
finished and resumes the failed one (training stages from their last checkpoint). The pipeline
has its own catalog run and MLflow run; every stage run nests under it. ``skip`` (a recipe
option) leaves stages out: a skipped producer's output is then the newest one in the catalog,
and the post-training stages start from the last model that was trained (the policy: sft's
output, else the pretrained model). Reward and align both start from the policy.

Evaluate scores every model version the pipeline made (pretrained, sft, aligned; the reward model
is no policy) in one comparison, writing ``eval.*`` tags onto each version; deploy then gates the
last policy version — exactly the version evaluate scored (``name/version``) — and moves its
``champion`` alias when the gate passes.
"""

from __future__ import annotations

from prefect import flow

from moeflow.platform.data.curate import CurateConfig
from moeflow.platform.data.tokenize import TokenizeConfig
from moeflow.platform.posttrain.align import AlignConfig
from moeflow.platform.posttrain.generated import GeneratedDataConfig
from moeflow.platform.posttrain.reward import RewardConfig
from moeflow.platform.posttrain.sft import SFTConfig
from moeflow.platform.serve.deploy import DeployConfig
from moeflow.platform.stage import stage_run
from moeflow.platform.train.config import PretrainConfig
from moeflow.platform.train.evaluate import EvaluateConfig
from moeflow.tasks.align import align_task
from moeflow.tasks.common import flow_run_namer, resolve_input
from moeflow.tasks.curate import curate_task
from moeflow.tasks.deploy import deploy_task
from moeflow.tasks.evaluate import evaluate_task
from moeflow.tasks.posttrain_data import posttrain_data_task
from moeflow.tasks.pretrain import pretrain_task
from moeflow.tasks.reward import reward_task
from moeflow.tasks.sft import sft_task
from moeflow.tasks.tokenize import tokenize_task

POSTTRAIN_STAGES = ("sft", "reward", "align")
POLICY_STAGES = ("pretrain", "sft", "align")  # what evaluate scores; the last one that ran is deployed


def _version(result: dict, name: str) -> tuple[str, str | None]:
    """(reference, MLflow version) of the model a stage made: ``name/version`` when it registered one
    (MLflow tracking on), else its catalog id or artefact URI."""
    version = result.get("mlflow_model_version")
    if version:
        return f"{name}/{version}", str(version)
    ref = f"catalog:{result['model_id']}" if result.get("model_id") else result.get("hf_uri") or result["checkpoint_uri"]
    return ref, None


@flow(name="pipeline", log_prints=True, flow_run_name=flow_run_namer("pipeline"))
def pipeline(
    run_name: str = "moe",
    pretrain: PretrainConfig = PretrainConfig(),  # first: what people change (steps, lr, model preset)
    curate: CurateConfig = CurateConfig(),
    tokenize: TokenizeConfig = TokenizeConfig(),
    posttrain_data: GeneratedDataConfig = GeneratedDataConfig(),
    sft: SFTConfig = SFTConfig(),
    reward: RewardConfig = RewardConfig(),
    align: AlignConfig = AlignConfig(),
    evaluate: EvaluateConfig = EvaluateConfig(),
    deploy: DeployConfig = DeployConfig(),
    skip: list[str] = [],  # noqa: B006  (Prefect parameters are copied per run)
    num_workers: int | None = None,
    train_workers: int = 1,
    use_gpu: bool = False,
) -> dict:
    config = {"curate": curate.model_dump(mode="json"), "tokenize": tokenize.to_dict(), "pretrain": pretrain.to_dict(),
              "posttrain_data": posttrain_data.to_dict(), "sft": sft.to_dict(), "reward": reward.to_dict(),
              "align": align.to_dict(), "evaluate": evaluate.to_dict(), "deploy": deploy.to_dict(), "run_name": run_name,
              "skip": list(skip)}
    out: dict = {"skipped": list(skip)}
    with stage_run("pipeline", config) as run:
        ids = {"catalog_run_id": run.run_id, "mlflow_run_id": run.mlflow_run_id}
        dataset = curate.name
        train = {"run_name": run_name, "num_workers": train_workers, "use_gpu": use_gpu, "pipeline": ids}
        # curate
        curated_uri = (curate_task(curate, num_workers=num_workers, pipeline=ids)["uri"] if "curate" not in skip
                       else resolve_input("tokenize", "curated_uri", dataset=dataset))
        # tokenize
        tokens_uri = (tokenize_task(tokenize, curated_uri, dataset=dataset, num_workers=num_workers, pipeline=ids)["uri"]
                      if "tokenize" not in skip else resolve_input("pretrain", "tokens_uri", dataset=dataset))
        # pretrain
        policy = None  # the model post-training continues from (None: each stage's default, the newest of its input)
        if "pretrain" not in skip:
            out["pretrain"] = pretrain_task(pretrain, tokens_uri, **train)
            policy = out["pretrain"]["checkpoint_uri"]  # the registered version (its HF export is found from it)
        # post-training data (the built-in sets, from the curated corpus)
        if not set(POSTTRAIN_STAGES) <= set(skip):
            data = posttrain_data_task(posttrain_data, curated_uri=curated_uri, dataset=dataset, pipeline=ids)
            out["posttrain_data"] = data
        # sft
        if "sft" not in skip:
            out["sft"] = sft_task(sft, data["chat_uri"], data["prompt_uri"], model=policy, **train)
            policy = out["sft"]["model_id"] or out["sft"]["hf_uri"]
        # reward
        if "reward" not in skip:
            out["reward"] = reward_task(reward, data["preference_uri"], model=policy, **train)
        # align (dpo on preference pairs; grpo/ppo on prompts)
        if "align" not in skip:
            out["align"] = align_task(align, data[align.data_key], model=policy, **train)
        # evaluate: every policy version this run made (or, with pretrain skipped, the newest pretrained model)
        names = {"pretrain": run_name, "sft": out.get("sft", {}).get("mlflow_model_name"),
                 "align": out.get("align", {}).get("mlflow_model_name")}
        versions = {stage: _version(out[stage], names[stage]) for stage in POLICY_STAGES if stage in out}
        if "evaluate" not in skip:
            models = [ref for ref, _ in versions.values()] or evaluate.models or [
                resolve_input("evaluate", "checkpoint_uri", run_name=run_name)]
            out["eval"] = evaluate_task(evaluate, tokens_uri=tokens_uri, models=models, pipeline=ids)
            out["comparison"] = out["eval"].pop("comparison")
            out["eval_models"] = models
            run.log_metrics({f"eval/{k}": v for k, v in out["eval"].items()})
        # deploy: gate the last policy version (the one evaluate scored) and move the serving alias
        last = next((stage for stage in ("align", "sft", "pretrain") if stage in versions), None)
        if "deploy" not in skip and last is not None:
            if versions[last][1] is None:
                print(f"deploy: skipped, {last}'s model has no registry version (MLflow tracking is off)")
            else:
                out["deploy"] = deploy_task(deploy, names[last], versions[last][1], pipeline=ids)
                run.log_metrics({"deploy/promoted": float(out["deploy"]["promoted"])})
        run.log_metrics({f"{stage}/{when}/{k}": v for stage in POSTTRAIN_STAGES if stage in out
                         for when in ("before", "after") for k, v in out[stage].get(when, {}).items()
                         if isinstance(v, (int, float))})
    out.update(curated_uri=curated_uri, tokens_uri=tokens_uri)
    if "pretrain" in out:
        out.update(checkpoint_uri=out["pretrain"]["checkpoint_uri"], hf_uri=out["pretrain"]["hf_uri"],
                   expert_load_uri=out["pretrain"]["expert_load_uri"])
    return out
