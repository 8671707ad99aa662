"""Stage tasks re-run after a store outage that outlasted the store's own retries (``TransientError``),
``MOEFLOW_STAGE_RETRIES`` times, and never after a user error. Real services: the Prefect test server,
moto's S3 server on loopback (stopped and started again), SQLite catalog and MLflow under a fresh home."""

from __future__ import annotations

import contextlib
import logging
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import MotoS3  # noqa: E402
from test_data_tokens import make_docs, write_curated  # noqa: E402

from moeflow.platform.data.tokenize import TokenizeConfig  # noqa: E402
from moeflow.platform.settings import get_settings  # noqa: E402
from moeflow.platform.store import open_store  # noqa: E402
from moeflow.platform.store.errors import TransientError  # noqa: E402

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]

CFG = TokenizeConfig(vocab_size=300, shard_tokens=1000, val_fraction=0.1, max_train_bytes=50_000)


@pytest.fixture(scope="module")
def moto():
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def s3_home(moto, moeflow_home, prefect_harness, monkeypatch):
    """A home whose store is the S3 server, with a short per-request retry budget (2 tries, 0.2 s)."""
    settings = {"S3_ENDPOINT": moto.endpoint, "S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s", "S3_REGION": "us-east-1",
                "S3_BUCKET": f"retry-{uuid.uuid4().hex[:10]}", "S3_RETRY_TRIES": "2", "S3_RETRY_MAX_DELAY_S": "0.2",
                "STAGE_RETRY_DELAY_S": "1"}
    for key, value in settings.items():
        monkeypatch.setenv(f"MOEFLOW_{key}", value)
    store = open_store(get_settings(), create_bucket=True)
    return store, write_curated(store, make_docs(30))


def _tokenize_in_a_flow(curated_uri: str):
    """(final state of the tokenize task, its run_count) from a flow run on the Prefect test server."""
    from prefect import flow, get_client

    from moeflow.tasks.tokenize import tokenize_task

    states = []

    @flow(name="stage-retry-test")
    def one_stage() -> None:
        states.append(tokenize_task(CFG, curated_uri, dataset="retry", num_workers=1, return_state=True))

    one_stage(return_state=True)
    (state,) = states
    with get_client(sync_client=True) as client:
        run_count = client.read_task_run(state.state_details.task_run_id).run_count
    return state, run_count


class _RestartOnStageRetry(logging.Handler):
    """Starts the stopped S3 server when the first stage re-run is announced: the outage then outlasts
    the store's retries and the first attempt whatever the machine's speed."""

    def __init__(self, moto: MotoS3):
        super().__init__()
        self.moto, self.restarted = moto, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.restarted and "re-running the stage" in record.getMessage():
            self.restarted = True
            self.moto.start()


@contextlib.contextmanager
def _outage(moto: MotoS3):
    """The S3 server is down from here until the first stage re-run (or the end of the block)."""
    handler = _RestartOnStageRetry(moto)
    log = logging.getLogger("moeflow.tasks")
    log.addHandler(handler)
    moto.stop()
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        if not handler.restarted:
            moto.start()


def test_a_stage_rides_out_an_s3_outage_longer_than_the_store_retries(s3_home, moto, monkeypatch):
    store, curated_uri = s3_home
    monkeypatch.setenv("MOEFLOW_STAGE_RETRIES", "4")
    with _outage(moto) as outage:  # the store gives up after ~0.3 s; the stage re-runs 1 s later
        state, run_count = _tokenize_in_a_flow(curated_uri)
    assert outage.restarted and state.is_completed(), state
    assert run_count >= 2, run_count  # the first attempt met the stopped server
    result = state.result()
    assert store.read_artifact(result["uri"]).content_hash == result["content_hash"]
    assert not [k for k in store.list("datasets/retry") if "/.tmp-" in k]


def test_without_stage_retries_the_same_outage_fails_the_stage(s3_home, moto, monkeypatch):
    _, curated_uri = s3_home
    monkeypatch.setenv("MOEFLOW_STAGE_RETRIES", "0")
    with _outage(moto) as outage:
        state, run_count = _tokenize_in_a_flow(curated_uri)
    assert not outage.restarted
    assert state.is_failed() and run_count == 1, (state, run_count)
    with pytest.raises(TransientError):
        state.result()


def test_prefects_cap_is_the_settings_bound():
    from moeflow.platform.settings import Settings
    from moeflow.tasks.common import STAGE_RETRY_LIMIT
    from moeflow.tasks.tokenize import tokenize_task

    assert tokenize_task.retries == STAGE_RETRY_LIMIT
    Settings(stage_retries=STAGE_RETRY_LIMIT)
    with pytest.raises(ValueError, match="stage_retries"):
        Settings(stage_retries=STAGE_RETRY_LIMIT + 1)


def test_a_user_error_is_not_retried(s3_home, monkeypatch):
    store, _ = s3_home
    monkeypatch.setenv("MOEFLOW_STAGE_RETRIES", "4")
    state, run_count = _tokenize_in_a_flow(store.uri("datasets/nothing/curated/here"))
    assert state.is_failed() and run_count == 1, (state, run_count)
