"""The moeflow command line: local services, settings, and running flows.

'moeflow run <stage>' loads a recipe, applies --set overrides and validates both against the
stage configs before Prefect or Ray is touched. While 'moeflow up' is running, the run goes
through the stage's Prefect deployment (so its deployment page lists it, and the worker runs
it); otherwise the flow runs in this process on Prefect's embedded server over the same
database under $MOEFLOW_HOME, and MLflow logs straight to the same SQLite store, so the run
still shows up after a later 'moeflow up'.

User errors (a bad recipe key, a missing input, a bad setting) print one or two lines and exit
with status 2; --debug shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Iterator, Optional

import typer

from . import recipes
from .databases import init_databases
from .settings import Settings, SettingsError, get_settings
from .store.errors import AuthError as StoreRefused
from .stages import (STAGES, MissingInput, RecipeInvalid, UnknownStage, find_input, flow_kwargs, get_stage,
                     validate_recipe)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0],
                  pretty_exceptions_enable=False)
config_app = typer.Typer(no_args_is_help=True, help="Inspect settings.")
app.add_typer(config_app, name="config")
deploy_app = typer.Typer(no_args_is_help=True, help="Promotion: 'moeflow run deploy' gates and promotes; "
                                                    "'moeflow deploy rollback' moves the alias back.")
app.add_typer(deploy_app, name="deploy")

SERVICE_NAMES = ["prefect", "mlflow", "dashboard", "ray", "flows"]  # start order: flows needs prefect


class StoreUnavailable(RuntimeError):
    """The object store cannot be written (read-only, refused credentials, no bucket): nothing can run."""


USER_ERRORS = (recipes.RecipeError, RecipeInvalid, MissingInput, SettingsError, UnknownStage, StoreRefused,
               StoreUnavailable)
_STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="show tracebacks of user errors")) -> None:
    """moeflow: raw text to a served MoE model."""
    _STATE["debug"] = debug


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a user error in one or two lines and exit 2 (a traceback only with --debug)."""
    try:
        yield
    except USER_ERRORS as err:
        if _STATE["debug"]:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)


def _settings() -> Settings:
    with user_errors():
        return get_settings()


def _echo_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    typer.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        typer.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


@app.command()
def up(
    only: Optional[list[str]] = typer.Option(None, "--only", help=f"start only these services: {SERVICE_NAMES}"),
    timeout: float = typer.Option(180.0, help="seconds to wait for each service's health check"),
    serve: Optional[str] = typer.Option(None, "--serve", help="also serve this model (as `moeflow serve --model`): "
                                                              "name@alias, name/<version>, a store URI or an export dir"),
    serve_port: int = typer.Option(8000, "--serve-port", min=1, max=65535, help="HTTP port of the served API"),
) -> None:
    """Start the local Prefect server and worker, MLflow server, dashboard and Ray head (idempotent);
    with --serve, the OpenAI-compatible serving gateway too (on that Ray head)."""
    from . import services

    settings = _settings()
    with user_errors():
        settings.ensure_dirs()
    if {"prefect", "mlflow", "flows"} & set(only or SERVICE_NAMES):
        init_databases(settings)
    names = list(only or SERVICE_NAMES) + (["serve"] if serve else [])  # --serve adds it to --only too
    for name in dict.fromkeys(names):
        if name == "serve" and not serve:
            raise typer.BadParameter("the serve service needs --serve <model reference>")
        if name not in SERVICE_NAMES + ["serve"]:
            raise typer.BadParameter(f"unknown service {name!r}; choose from {SERVICE_NAMES + ['serve']}")
        typer.echo(f"starting {name} ...", nl=False)
        t0 = time.monotonic()
        try:
            state = (services.start_serving(settings, serve, serve_port, timeout) if name == "serve" else
                     services.up(settings, [name], timeout=timeout)[0])
        except RuntimeError as err:
            typer.echo(" FAILED")
            typer.echo(str(err), err=True)
            raise typer.Exit(1)
        word = "started" if state["started"] else "already running"
        typer.echo(f" {word} ({time.monotonic() - t0:.1f}s)")
    for run in _recover_crashed_runs(settings):
        typer.echo(f"run {run['id']} ({run['stage']}, started {run['started_at']}): its process died; marked crashed")
    typer.echo("")
    typer.echo(f"Prefect UI : http://{settings.host}:{settings.prefect_port}")
    typer.echo(f"MLflow UI  : {settings.mlflow_server_url}")
    typer.echo(f"Dashboard  : {settings.dashboard_url}")
    typer.echo(f"Deployments: http://{settings.host}:{settings.prefect_port}/deployments (start any flow from a form)")
    if serve:
        typer.echo(f"Serving API: http://{settings.host}:{serve_port}/v1 ({serve})")
    typer.echo(f"logs       : {settings.log_dir}")


def _recover_crashed_runs(settings: Settings) -> list[dict]:
    """Runs left "running" by killed processes become crashed (catalog, MLflow, and Prefect when it is up)."""
    from . import services
    from .catalog import Catalog
    from .recovery import recover_crashed_runs
    from .tracking import get_tracker

    api = services.prefect_api_url(settings)
    with Catalog.from_settings(settings) as catalog, \
            (_environ("PREFECT_API_URL", api) if api else contextlib.nullcontext()):
        return recover_crashed_runs(catalog, get_tracker(settings))


@app.command()
def down(only: Optional[list[str]] = typer.Option(None, "--only", help="stop only these services")) -> None:
    """Stop the local services started by 'moeflow up'."""
    from . import services

    for row in services.down(_settings(), only or None):
        typer.echo(f"{row['name']}: {'stopped' if row['stopped'] else 'was not running'}")


@app.command()
def status() -> None:
    """Show which local services are running and healthy, and whether their ports answer."""
    from . import services

    rows = services.status(_settings())
    for row in rows:
        row["port_open"] = {True: "open", False: "closed", None: "-"}[row["port_open"]]
    _echo_table(rows, ["name", "running", "healthy", "pid", "port", "port_open", "url", "note"])


@app.command()
def doctor(
    min_cpus: float = typer.Option(0, "--min-cpus", help="fail unless the Ray cluster has this many CPUs"),
    min_gpus: float = typer.Option(0, "--min-gpus", help="fail unless the Ray cluster has this many GPUs"),
) -> None:
    """Check the configured services (store, catalog, MLflow, Prefect, Ray): one line each; exit 1 on a problem."""
    from .doctor import run_checks

    checks = run_checks(_settings(), min_cpus=min_cpus, min_gpus=min_gpus)
    for check in checks:
        typer.echo(check.line())
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@config_app.command("show")
def config_show(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Print the effective settings (secrets masked), with the URIs runs actually use."""
    from . import services
    from .settings import _mask_url

    settings = _settings()
    data = settings.masked()
    data["tracking_uri"] = _mask_url(services.effective_tracking_uri(settings))
    data["prefect_api"] = services.prefect_api_url(settings) or f"embedded (database under {settings.prefect_home})"
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        for key, value in data.items():
            typer.echo(f"{key:24s} {value}")


@app.command("recipes")
def list_recipes() -> None:
    """List the named recipes under configs/."""
    for name in recipes.available_recipes():
        typer.echo(name)


@app.command("stages")
def list_stages() -> None:
    """List the stages (the stage registry): what each consumes and produces."""
    _echo_table([{"stage": s.name, "consumes": ",".join(s.consumes) or "-", "produces": ",".join(s.produces) or "-",
                  "description": s.description} for s in STAGES.values()],
                ["stage", "consumes", "produces", "description"])


def prepare_flow_environment(settings: Settings) -> None:
    """Point Prefect (and the tracking URI) at this home's services before Prefect is imported."""
    from . import services

    settings.ensure_dirs()
    for key, value in services.OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    for key, value in services.prefect_env(settings).items():
        os.environ.setdefault(key, value)
    api = services.prefect_api_url(settings)
    if api and not settings.prefect_api_url:
        os.environ["PREFECT_API_URL"] = api
    if not settings.mlflow_tracking_uri:
        tracking = services.effective_tracking_uri(settings)
        if tracking != settings.tracking_uri:
            os.environ["MOEFLOW_MLFLOW_TRACKING_URI"] = tracking


def check_store_or_record_failure(stage: str, recipe: dict, settings: Settings) -> None:
    """A store that refuses writes fails the run here, in one line, before Prefect starts (so nothing
    is retried); the run is still recorded in the catalog as failed, with the reason."""
    from .doctor import check_store

    check = check_store(settings)
    if check.ok:
        return
    try:
        from .catalog import Catalog

        with Catalog.from_settings(settings) as catalog:
            run_id = catalog.start_run(stage, recipe.get(stage) or {})
            catalog.finish_run(run_id, status="failed", error=check.detail)
        where = f"run {run_id} recorded as failed"
    except Exception as exc:  # the catalog may be just as unreachable; the store's problem comes first
        where = f"not recorded in the catalog: {exc}"
    raise StoreUnavailable(f"{check.detail}\n({where})")


def check_recipe(stage: str, recipe: dict) -> dict:
    """Validate the recipe (every section) and that the stage's inputs exist; returns run options.

    Nothing here imports Prefect or Ray: a user error exits before either starts.
    """
    get_stage(stage)
    validated = validate_recipe(recipe)
    return validated["options"].to_dict()


def check_inputs(stage: str, options: dict) -> None:
    """A stage whose input is neither given (--set <param>=<uri>) nor in the catalog fails here."""
    for inp in get_stage(stage).inputs:
        if not options.get(inp.param):
            find_input(inp, options, stage=stage)


def run_tags(stage: str, recipe: dict) -> list[str]:
    return ["moeflow", f"recipe:{recipe.get('name', 'recipe')}", f"stage:{stage}",
            f"dataset:{recipe.get('dataset', 'tiny')}"]


@app.command()
def run(
    flow: str = typer.Argument(..., help=f"one of {', '.join(STAGES)}"),
    recipe: str = typer.Option("tiny", "--recipe", "-r", help="recipe name under configs/ or a YAML path"),
    set_: Optional[list[str]] = typer.Option(None, "--set", "-s", help="override, e.g. pretrain.max_steps=50"),
    local: bool = typer.Option(False, "--local", help="run in this process even when 'moeflow up' is running"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks of user errors"),
) -> None:
    """Run a stage's flow with a recipe (through its deployment when 'moeflow up' is running)."""
    _STATE["debug"] = _STATE["debug"] or debug
    settings = _settings()
    with user_errors():
        get_stage(flow)
        loaded = recipes.load_recipe(recipe, set_ or [])
        options = check_recipe(flow, loaded)
        check_inputs(flow, options)
    with user_errors():
        prepare_flow_environment(settings)
        check_store_or_record_failure(flow, loaded, settings)
    init_databases(settings)  # once per home, under a lock: concurrent first runs raced the migrations
    from . import services

    tags = run_tags(flow, loaded)
    typer.echo(f"running flow {flow!r} with recipe {loaded.get('name', recipe)!r}")
    t0 = time.monotonic()
    with user_errors():  # a store that starts refusing writes mid-run ends in one line too
        if not local and services.deployments_available(settings):
            result = run_through_deployment(flow, loaded, tags)
        else:
            result = run_in_process(flow, loaded, tags)
    typer.echo(json.dumps(result, indent=2, default=str))
    typer.echo(f"flow {flow!r} finished in {time.monotonic() - t0:.1f}s")
    if isinstance(result, dict) and result.get("comparison"):
        from .eval.engine import comparison_markdown

        typer.echo("evaluation:\n" + comparison_markdown(result["comparison"]))
    if isinstance(result, dict) and isinstance(result.get("deploy"), dict):
        d = result["deploy"]
        typer.echo(f"deploy {d['model_name']}/{d['version']}: {'promoted to @' + d['alias'] if d['promoted'] else 'rejected'}"
                   f" ({'; '.join(d['reasons'])})")
    metrics = result.get("eval", result) if isinstance(result, dict) else {}
    if isinstance(metrics, dict) and {"val_loss", "unigram_loss"} <= set(metrics):
        typer.echo(f"validation loss {metrics['val_loss']:.3f} nats/token "
                   f"(unigram baseline {metrics['unigram_loss']:.3f})"
                   + (f"; {metrics['val_bpb']:.3f} bits/byte (unigram {metrics['unigram_bpb']:.3f})"
                      if "val_bpb" in metrics and "unigram_bpb" in metrics else ""))


def run_in_process(stage: str, recipe: dict, tags: list[str]):
    """Run the flow here; without a Prefect server, on a temporary one that dies with this process."""
    from . import services

    with contextlib.ExitStack() as stack:
        if not os.environ.get("PREFECT_API_URL"):
            api = stack.enter_context(services.temporary_prefect_server(get_settings()))
            stack.enter_context(_environ("PREFECT_API_URL", api))
        from prefect import tags as prefect_tags

        flow_obj = get_stage(stage).load_flow()
        _library_logging()
        try:
            with prefect_tags(*tags):
                return flow_obj(**flow_kwargs(flow_obj, recipe))
        finally:
            _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send the run's last logs and events while the server still answers (at interpreter exit the
    temporary server is gone, and Prefect's workers would retry against a closed port)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30)


@contextlib.contextmanager
def _environ(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _library_logging() -> None:
    """The library's INFO records (steps, loss, funnel) reach the terminal and the run's logs."""
    logging.getLogger("moeflow").setLevel(logging.INFO)


def run_through_deployment(stage: str, recipe: dict, tags: list[str]):
    """Create a run of the stage's deployment, stream its logs here, return its result."""
    from prefect.deployments import run_deployment

    spec = get_stage(stage)
    flow_obj = spec.load_flow()
    flow_run = run_deployment(spec.deployment, parameters=flow_kwargs(flow_obj, recipe), tags=tags, timeout=0,
                              as_subflow=False)
    typer.echo(f"flow run {flow_run.name!r} of deployment {spec.deployment} (id {flow_run.id})")
    state = _follow(flow_run.id)
    if not state.is_completed():
        typer.echo(f"error: flow run ended {state.type.value}: {state.message or ''}", err=True)
        raise typer.Exit(1)
    return state.result()


def _follow(flow_run_id, poll_s: float = 2.0):
    """Print the run's log lines as they arrive until it reaches a final state."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    seen = 0
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    sort=LogSort.TIMESTAMP_ASC, offset=seen, limit=200)
            for entry in logs:
                typer.echo(f"{entry.timestamp:%H:%M:%S} {logging.getLevelName(entry.level):7s} {entry.message}")
            seen += len(logs)
            if flow_run.state is not None and flow_run.state.is_final() and not logs:
                return flow_run.state
            if not logs:
                time.sleep(poll_s)


@deploy_app.command("rollback")
def deploy_rollback(
    model: str = typer.Option(..., "--model", "-m", help="registered model name"),
    alias: str = typer.Option("champion", "--alias", help="the serving alias to move back"),
) -> None:
    """Point MODEL@ALIAS back at the version it held before its last promotion."""
    from .serve.deploy import rollback_run
    from .serve.registry import RegistryError

    settings = _settings()
    try:
        result = rollback_run(model, alias, settings=settings)
    except RegistryError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(result.reasons[0])


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="name@alias, name/<version>, a store URI or an export dir"),
    config: Optional[str] = typer.Option(None, "--config", help="a serving YAML: several versions, aliases, "
                                                                "A/B splits (instead of --model)"),
    port: int = typer.Option(8000, "--port", help="HTTP port of the OpenAI-compatible API"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address"),
    replicas: int = typer.Option(1, "--replicas", min=1, help="model replicas (Ray Serve balances over them)"),
    quantize: str = typer.Option("none", "--quantize", help="none | int8 (weight-only INT8)"),
    engine: Optional[list[str]] = typer.Option(None, "--engine", "-e",
                                               help="engine setting of --model, e.g. max_batch=64, compile=inductor, "
                                                    "process=off (EngineConfig; repeatable)"),
) -> None:
    """Serve a model over the OpenAI HTTP API on Ray Serve (keys: MOEFLOW_SERVE_API_KEYS)."""
    from pydantic import ValidationError

    from .model_refs import ModelRefError
    from .serve.launch import config_for, load_config_file, serve_forever
    from .serve.registry import RegistryError

    if (model is None) == (config is None):
        typer.echo("error: give exactly one of --model and --config", err=True)
        raise typer.Exit(2)
    if quantize not in ("none", "int8"):
        typer.echo(f"error: --quantize {quantize!r}: choose none or int8", err=True)
        raise typer.Exit(2)
    if engine and config:
        typer.echo("error: --engine applies to --model; put engine settings in the --config file instead", err=True)
        raise typer.Exit(2)
    settings = _settings()
    try:
        overrides = recipes.apply_overrides({}, engine or [])
        cfg = (load_config_file(config) if config else
               config_for(model, host=host, port=port, replicas=replicas, quantize=quantize, engine=overrides,
                          settings=settings))
    except (ModelRefError, RegistryError, FileNotFoundError, recipes.RecipeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    except ValidationError as err:
        first = err.errors()[0]
        where = config if config else "--engine"
        loc = [str(p) for p in first["loc"]]
        if not config and "engine" in loc:  # models.0.engine.<key>: the user typed <key>
            loc = loc[loc.index("engine") + 1:]
        msg = first["msg"].removeprefix("Value error, ")
        typer.echo(f"error: {where}: " + (f"{'.'.join(loc)}: " if loc else "") + msg, err=True)
        raise typer.Exit(2)
    serve_forever(cfg, settings=settings, echo=typer.echo)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
