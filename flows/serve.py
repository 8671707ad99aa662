"""Serve every flow as a Prefect deployment, so the Prefect UI can start runs from a form.

``moeflow up`` runs this as the ``flows`` service: each flow becomes the deployment
``<flow>/local`` with the ``tiny`` recipe as its default parameters; a run started from the UI
(or ``prefect deployment run``) executes in a subprocess of this server. Wiring only.
"""

from __future__ import annotations

import os

from prefect import serve
from prefect.deployments.runner import EntrypointType

from moeflow.flows.curate import curate
from moeflow.flows.evaluate import evaluate
from moeflow.flows.pipeline import pipeline
from moeflow.flows.pretrain import pretrain
from moeflow.flows.smoke import smoke
from moeflow.flows.tokenize import tokenize
from moeflow.platform.cli import flow_kwargs
from moeflow.platform.recipes import load_recipe

FLOWS = (smoke, curate, tokenize, pretrain, evaluate, pipeline)


def main() -> None:
    recipe = load_recipe(os.environ.get("MOEFLOW_SERVE_RECIPE", "tiny"))
    deployments = [
        f.to_deployment(name="local", parameters=flow_kwargs(f, recipe), tags=["moeflow", recipe["name"]],
                        entrypoint_type=EntrypointType.MODULE_PATH,
                        description=f"{f.name} with the {recipe['name']!r} recipe as default parameters")
        for f in FLOWS
    ]
    serve(*deployments, print_starting_message=True)


if __name__ == "__main__":
    main()
