"""User errors at the CLI: one or two lines, exit status 2, no traceback, before Prefect or Ray.

The fast tests drive the Typer app in-process; the slow one runs the real console entry in a
fresh interpreter and checks that neither Prefect nor Ray nor MLflow was even imported (what
"fails before Prefect or Ray starts" means), within a bound that starting any of them exceeds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from moeflow.platform.cli import app

runner = CliRunner()

# (argv, env, fragment the one-line message must contain)
USER_ERRORS = [
    pytest.param(["run", "smoke", "--set", "smok.message=x"], {},
                 "unknown recipe section or option 'smok' (did you mean 'smoke'?)", id="unknown-section"),
    pytest.param(["run", "pretrain", "--set", "pretrain.max_stepz=5"], {},
                 "pretrain.max_stepz: unknown field (did you mean 'pretrain.max_steps'?)", id="unknown-field"),
    pytest.param(["run", "pretrain", "--set", "pretrain.model_overrides.num_expertz=16"], {},
                 "pretrain.model_overrides.num_expertz: unknown field (did you mean", id="unknown-model-override"),
    pytest.param(["run", "pretrain", "--set", "pretrain.max_steps=abc"], {},
                 "pretrain.max_steps: Input should be a valid integer", id="wrong-type"),
    pytest.param(["run", "pretrain", "--set", "pretrain.lr=-1"], {},
                 "pretrain.lr: Input should be greater than 0 (got -1)", id="out-of-range"),
    pytest.param(["run", "tokenize", "--set", "tokenize.val_fraction=0.9"], {},
                 "tokenize.val_fraction: Input should be less than 0.5", id="out-of-range-tokenize"),
    pytest.param(["run", "evaluate", "--set", "evaluate.batch_size=0"], {},
                 "evaluate.batch_size: Input should be greater than or equal to 1", id="out-of-range-evaluate"),
    pytest.param(["run", "pretrain", "--set", "pretrain.schedule=linear"], {},
                 "pretrain.schedule: Input should be 'cosine', 'wsd' or 'constant'", id="bad-enum"),
    pytest.param(["run", "pretrain", "--set", "pretrain.model_overrides.n_group=3"], {},
                 "ModelConfig.n_group=3: must divide num_routed_experts=8", id="inconsistent-model"),
    pytest.param(["run", "pretrain", "--set", "train_workerz=2"], {},
                 "unknown recipe section or option 'train_workerz' (did you mean 'train_workers'?)",
                 id="unknown-option"),
    pytest.param(["run", "curate", "--set", "curate.files_per_shrd=3"], {},
                 "curate.files_per_shrd: unknown field (did you mean 'curate.files_per_shard'?)",
                 id="unknown-field-in-a-config-that-allows-extras"),
    pytest.param(["run", "curate", "--set", "curate.sources=[{uri: python-stdlib, max_filez: 3}]"], {},
                 "curate.sources[0].max_filez: unknown field (did you mean 'curate.sources[0].max_files'?)",
                 id="unknown-field-in-a-list-item"),
    pytest.param(["run", "pretrian"], {}, "unknown stage 'pretrian' (did you mean 'pretrain'?)", id="unknown-stage"),
    pytest.param(["run", "smoke", "--recipe", "nope"], {}, "unknown recipe 'nope'", id="unknown-recipe"),
    pytest.param(["run", "pretrain"], {},
                 "pretrain: no token shards 'tiny-tokens' yet: run `moeflow run tokenize` first, "
                 "or pass one with --set tokens_uri=<uri>", id="missing-input"),
    pytest.param(["run", "evaluate", "--set", "tokens_uri=file:///x"], {},
                 "evaluate: no trained model 'moe-tiny' yet: run `moeflow run pretrain` first, "
                 "or pass one with --set checkpoint_uri=<uri>", id="missing-model"),
    pytest.param(["run", "tokenize"], {},
                 "tokenize: no curated dataset 'tiny-curated' yet: run `moeflow run curate` first", id="missing-curated"),
    pytest.param(["status"], {"MOEFLOW_PREFECT_PORT": "abc"},
                 "MOEFLOW_PREFECT_PORT='abc': Input should be a valid integer", id="bad-env"),
    pytest.param(["run", "smoke"], {"MOEFLOW_MLFLOW_PORT": "99999"},
                 "MOEFLOW_MLFLOW_PORT='99999': Input should be less than or equal to 65535", id="bad-env-range"),
]


@pytest.mark.parametrize("argv,env,fragment", USER_ERRORS)
def test_user_error_is_one_or_two_lines_exit_2(argv, env, fragment, moeflow_home, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, result.output
    assert lines[0].startswith("error: ") and fragment in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_debug_shows_the_traceback(moeflow_home):
    from moeflow.platform.stages import RecipeInvalid

    result = runner.invoke(app, ["--debug", "run", "pretrain", "--set", "pretrain.max_stepz=5"])
    assert isinstance(result.exception, RecipeInvalid) and "max_stepz" in str(result.exception)
    also = runner.invoke(app, ["run", "pretrain", "--debug", "--set", "pretrain.max_stepz=5"])
    assert isinstance(also.exception, RecipeInvalid)


def test_a_valid_override_passes_validation_and_reaches_the_input_check(moeflow_home):
    """The checks are not just refusing everything: good keys pass, and the next check speaks."""
    result = runner.invoke(app, ["run", "pretrain", "--set", "pretrain.max_steps=50",
                                 "--set", "pretrain.model_overrides.num_routed_experts=4"])
    assert result.exit_code == 2 and "no token shards" in result.output, result.output


def test_help_texts_have_no_rst_backticks():
    for argv in (["--help"], ["run", "--help"], ["up", "--help"], ["down", "--help"], ["status", "--help"],
                 ["config", "show", "--help"], ["stages", "--help"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0 and "``" not in result.output, (argv, result.output)


_PROBE = ("import atexit, sys\n"
          "atexit.register(lambda: print('HEAVY', sorted(m for m in ('prefect', 'ray', 'mlflow') "
          "if m in sys.modules), file=sys.stderr))\n"
          "from moeflow.platform.cli import app\n"
          "app()\n")


@pytest.mark.slow
@pytest.mark.parametrize("argv,env,fragment", [p for p in USER_ERRORS if p.id in
                                               ("unknown-section", "unknown-field", "wrong-type", "out-of-range",
                                                "missing-input", "bad-env")])
def test_user_error_exits_before_prefect_or_ray_is_imported(argv, env, fragment, tmp_path):
    full_env = {**os.environ, "MOEFLOW_HOME": str(tmp_path / "home"), **env}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], env=full_env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("HEAVY")]
    assert len(lines) <= 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr  # neither Prefect, Ray nor MLflow was imported
    # Starting Prefect's embedded server alone takes > 20 s on this machine. What remains is mostly
    # torch's import (moeflow.models imports it eagerly): ~1.5 s idle, ~5 s at load 7 on 2 cores.
    assert elapsed < 30, elapsed
