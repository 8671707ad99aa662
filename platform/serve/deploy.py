"""The deploy stage's engine: gate a model version, record the decision, move the serving alias.

``run_deploy`` reads the candidate's and the current champion's evaluation metrics from the
registry (``eval.*`` version tags), asks the gate (``gate.decide``), records the decision and its
reasons (a ``decision.json`` artefact in the store that the task registers in the catalog; the
MLflow run's tags, summary and ``deploy_decision.json``; ``deploy.*`` tags on the version), and when
it passes moves the alias (default ``champion``) to the candidate, appending to the alias history.
``rollback`` moves the alias back to the version it pointed at before the last move.

A gateway serving ``name@alias`` resolves the alias when it starts (``moeflow serve``); moving the
alias of a running gateway is ``app.Serving.move_alias`` (hot swap, tested in test_serve_ray).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from pydantic import Field

from ..config import StageConfig, config_hash
from .gate import Decision, GateConfig, decide
from .registry import RegistryError, alias_history, record_alias, version_metrics


class DeployConfig(StageConfig):
    model_name: str | None = Field(None, description="registered model to promote (default: the run name)")
    version: str | None = Field(None, description="version to promote (default: the newest)")
    alias: str = Field("champion", min_length=1, pattern=r"^[A-Za-z0-9_-]+$", description="the serving alias")
    gate: GateConfig = Field(default_factory=GateConfig, description="minimum scores and allowed regression")


@dataclass
class DeployResult:
    model_name: str
    version: str
    alias: str
    promoted: bool
    previous: str | None
    reasons: list[str] = field(default_factory=list)
    decision_uri: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_deploy(config: DeployConfig, store, *, model_name: str, registry, tracker, output_prefix: str,
               version: str | None = None) -> DeployResult:
    version = str(version or config.version or registry.latest_version(model_name))
    candidate = version_metrics(registry.version_tags(model_name, version))
    previous = registry.alias_version(model_name, config.alias)
    champion = None
    if previous is not None and previous != version:
        champion = version_metrics(registry.version_tags(model_name, previous))
    decision = decide(candidate, champion, config.gate)
    promoted = decision.passed and previous != version
    result = DeployResult(model_name, version, config.alias, decision.passed, previous, decision.reasons)
    if previous == version:
        result.reasons.append(f"{model_name}@{config.alias} already points at version {version}")
    if promoted:
        history = alias_history(registry, model_name, config.alias) or ([previous] if previous else [])
        registry.set_alias(model_name, config.alias, version)
        record_alias(registry, model_name, config.alias, history + [version])
    result.decision_uri = _record(store, output_prefix, tracker, registry, result, decision, candidate, champion)
    return result


def rollback(store, *, model_name: str, alias: str, registry, tracker, output_prefix: str) -> DeployResult:
    """Point ``alias`` back at the version it held before its last move."""
    current = registry.alias_version(model_name, alias)
    history = alias_history(registry, model_name, alias)
    if current is None or len(history) < 2 or history[-1] != current:
        raise RegistryError(f"{model_name}@{alias}: no earlier version to roll back to "
                            f"(history {history or 'empty'}, alias at {current})")
    target = history[-2]
    registry.set_alias(model_name, alias, target)
    record_alias(registry, model_name, alias, history[:-1])
    result = DeployResult(model_name, target, alias, True, current,
                          [f"rollback: {model_name}@{alias} moved from version {current} back to {target}"])
    result.decision_uri = _record(store, output_prefix, tracker, registry, result, None, None, None)
    return result


def _record(store, prefix: str, tracker, registry, result: DeployResult, decision: Decision | None,
            candidate, champion) -> str:
    doc = {**result.to_dict(), "decision_uri": None, "at": time.time(), "candidate_metrics": candidate,
           "champion_metrics": champion, "checks": decision.to_dict()["checks"] if decision else []}
    key = f"{prefix.rstrip('/')}/{result.model_name}-{result.version}-{config_hash(doc)}"
    with store.write_artifact(key, metadata={"kind": "deploy_decision", "model": result.model_name,
                                             "version": result.version}) as w:
        w.put_bytes("decision.json", json.dumps(doc, indent=2, sort_keys=True, default=str).encode())
    verdict = "rollback" if decision is None else ("promoted" if result.promoted else "rejected")
    tracker.set_tags({"moeflow.deploy.model": f"{result.model_name}/{result.version}", "moeflow.deploy.decision":
                      verdict, "moeflow.deploy.reasons": "; ".join(result.reasons)[:5000]})
    tracker.log_dict(doc, "deploy_decision.json")
    registry.set_version_tags(result.model_name, result.version, {
        "deploy.decision": verdict, "deploy.reasons": "; ".join(result.reasons)[:5000],
        "deploy.previous": result.previous or ""})
    return store.uri(key)


def rollback_run(model_name: str, alias: str = "champion", settings=None) -> DeployResult:
    """``moeflow deploy rollback``: ``rollback`` as a tracked run (MLflow run + catalog run + lineage)."""
    from .. import artifacts as A
    from ..stage import stage_run
    from .registry import MLflowRegistry

    with stage_run("deploy", {"rollback": True, "model_name": model_name, "alias": alias}, settings=settings) as st:
        result = rollback(st.store, model_name=model_name, alias=alias, registry=MLflowRegistry(st.settings.tracking_uri),
                          tracker=st.tracker, output_prefix=f"deploy/{model_name}")
        st.add_output(result.decision_uri, kind=A.DEPLOY_DECISION, name=f"{model_name}-deploy")
    return result


def follow_promotion(result: DeployResult, settings=None) -> str:
    """After a promotion, make a running gateway (if any) serve the new champion: the version's export
    is fetched through the registry and deployed as its own Serve app, then the alias moves (hot swap)."""
    if not result.promoted:
        return "not promoted: the gateway is left as it is"
    from .app import running_gateway, sync_alias
    from .resolve import resolve_served

    if running_gateway(settings) is None:
        return "no gateway is running: the alias is read when `moeflow serve` starts"
    resolved = resolve_served(f"{result.model_name}/{result.version}", settings=settings)
    return sync_alias(result.model_name, result.alias, result.version, resolved.model_dir, settings=settings)
