"""The ``moeflow`` command line: local services, settings, and running flows.

``moeflow run <flow>`` loads a recipe, applies ``--set`` overrides and calls the Prefect
flow in this process. If ``moeflow up`` is running, the run reports to that Prefect server
and MLflow server, so it appears in both UIs; otherwise Prefect uses its embedded server
over the same database under ``$MOEFLOW_HOME`` and MLflow logs straight to the same SQLite
store, so the run still shows up after a later ``moeflow up``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import time
from typing import Optional

import typer

from . import recipes
from .settings import get_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
config_app = typer.Typer(no_args_is_help=True, help="Inspect settings.")
app.add_typer(config_app, name="config")

# Flows are looked up by entrypoint string, as Prefect does: platform/ must not import
# flows/ (imports go one way), but the CLI has to start them.
FLOWS = {
    "smoke": "moeflow.flows.smoke:smoke",
    "curate": "moeflow.flows.curate:curate",
    "tokenize": "moeflow.flows.tokenize:tokenize",
    "pretrain": "moeflow.flows.pretrain:pretrain",
    "evaluate": "moeflow.flows.evaluate:evaluate",
    "pipeline": "moeflow.flows.pipeline:pipeline",
}

SERVICE_NAMES = ["prefect", "mlflow", "dashboard", "ray", "flows"]  # start order: flows needs prefect


def _echo_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    typer.echo("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        typer.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


@app.command()
def up(
    only: Optional[list[str]] = typer.Option(None, "--only", help=f"start only these services: {SERVICE_NAMES}"),
    timeout: float = typer.Option(180.0, help="seconds to wait for each service's health check"),
) -> None:
    """Start the local Prefect server, MLflow server, dashboard and Ray head (idempotent)."""
    from . import services

    settings = get_settings()
    settings.ensure_dirs()
    for name in only or SERVICE_NAMES:
        if name not in SERVICE_NAMES:
            raise typer.BadParameter(f"unknown service {name!r}; choose from {SERVICE_NAMES}")
        typer.echo(f"starting {name} ...", nl=False)
        t0 = time.monotonic()
        try:
            state = services.up(settings, [name], timeout=timeout)[0]
        except RuntimeError as err:
            typer.echo(" FAILED")
            typer.echo(str(err), err=True)
            raise typer.Exit(1)
        word = "started" if state["started"] else "already running"
        typer.echo(f" {word} ({time.monotonic() - t0:.1f}s)")
    typer.echo("")
    typer.echo(f"Prefect UI : http://{settings.host}:{settings.prefect_port}")
    typer.echo(f"MLflow UI  : {settings.mlflow_server_url}")
    typer.echo(f"Dashboard  : {settings.dashboard_url}")
    typer.echo(f"Deployments: http://{settings.host}:{settings.prefect_port}/deployments (start any flow from a form)")
    typer.echo(f"logs       : {settings.log_dir}")


@app.command()
def down(only: Optional[list[str]] = typer.Option(None, "--only", help="stop only these services")) -> None:
    """Stop the local services started by ``moeflow up``."""
    from . import services

    for row in services.down(get_settings(), only or None):
        typer.echo(f"{row['name']}: {'stopped' if row['stopped'] else 'was not running'}")


@app.command()
def status() -> None:
    """Show which local services are running and healthy."""
    from . import services

    rows = services.status(get_settings())
    _echo_table(rows, ["name", "running", "healthy", "pid", "url"])


@config_app.command("show")
def config_show(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Print the effective settings (secrets masked)."""
    data = get_settings().masked()
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        for key, value in data.items():
            typer.echo(f"{key:22s} {value}")


@app.command("recipes")
def list_recipes() -> None:
    """List the named recipes under configs/."""
    for name in recipes.available_recipes():
        typer.echo(name)


def prepare_flow_environment() -> None:
    """Point Prefect (and the tracking URI) at this home's services before Prefect is imported."""
    from . import services

    settings = get_settings()
    settings.ensure_dirs()
    for key, value in services.OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    for key, value in services.prefect_env(settings).items():
        os.environ.setdefault(key, value)
    if not settings.prefect_api_url and services.prefect_server_healthy(settings):
        os.environ["PREFECT_API_URL"] = f"http://{settings.host}:{settings.prefect_port}/api"
    if not settings.mlflow_tracking_uri and services.mlflow_server_healthy(settings):
        os.environ["MOEFLOW_MLFLOW_TRACKING_URI"] = settings.mlflow_server_url


def load_flow(name: str):
    if name not in FLOWS:
        raise typer.BadParameter(f"unknown flow {name!r}; choose from {sorted(FLOWS)}")
    module_name, attr = FLOWS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def flow_kwargs(flow_obj, recipe: dict) -> dict:
    """Recipe sections named like the flow's parameters become its arguments."""
    params = inspect.signature(flow_obj.fn).parameters
    return {name: recipe[name] for name in params if name in recipe}


@app.command()
def run(
    flow: str = typer.Argument(..., help=f"one of {sorted(FLOWS)}"),
    recipe: str = typer.Option("tiny", "--recipe", "-r", help="recipe name under configs/ or a YAML path"),
    set_: Optional[list[str]] = typer.Option(None, "--set", "-s", help="override, e.g. pretrain.max_steps=50"),
) -> None:
    """Run a flow with a recipe (reports to the local servers when ``moeflow up`` is running)."""
    try:
        loaded = recipes.load_recipe(recipe, set_ or [])
    except recipes.RecipeError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    prepare_flow_environment()
    flow_obj = load_flow(flow)
    kwargs = flow_kwargs(flow_obj, loaded)
    typer.echo(f"running flow {flow!r} with recipe {loaded.get('name', recipe)!r}")
    t0 = time.monotonic()
    result = flow_obj(**kwargs)
    typer.echo(json.dumps(result, indent=2, default=str))
    typer.echo(f"flow {flow!r} finished in {time.monotonic() - t0:.1f}s")
    metrics = result.get("eval", result) if isinstance(result, dict) else {}
    if isinstance(metrics, dict) and {"val_loss", "unigram_loss"} <= set(metrics):
        typer.echo(f"validation loss {metrics['val_loss']:.3f} nats/token "
                   f"(unigram baseline {metrics['unigram_loss']:.3f})"
                   + (f"; {metrics['val_bpb']:.3f} bits/byte (unigram {metrics['unigram_bpb']:.3f})"
                      if "val_bpb" in metrics and "unigram_bpb" in metrics else ""))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
