"""The lineage catalog API: runs, registered datasets/models and the lineage graph.

One ``Catalog`` per process is enough; every method opens its own short transaction, so
a catalog can be shared by threads and several processes can write to the same database
(see ``db.py`` for how SQLite and PostgreSQL are made to queue writers).

Writes are idempotent where a stage may repeat them on a re-run: registering the same
URI again returns the same version id (refreshing hash and stats), lineage edges are
unique. Version numbers (per dataset name / model name) are allocated as ``max + 1``; a
concurrent writer that takes the same number loses on a unique constraint and retries.

The graph is bipartite: artefact URI --input--> run --output--> artefact URI. ``upstream``
and ``downstream`` walk it breadth-first, one query per hop, with visited sets so cycles
(a run that rewrites its own input) terminate. Results are plain dicts (JSON-ready,
timestamps as ISO 8601 UTC strings) so Prefect tasks and the dashboard can pass them on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import Engine, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .db import CatalogError, make_engine, migrate
from .ids import code_version as default_code_version
from .ids import config_hash as hash_config
from .ids import new_id, normalize_json
from .models import (
    DATASET_KINDS,
    RUN_STATUSES,
    Dataset,
    DatasetVersion,
    LineageEdge,
    ModelVersion,
    Project,
    Run,
    utcnow,
)
from .owner import Owner, is_dead, this_process
from .records import artifact_node, dataset_dict, edge, model_dict, run_dict

log = logging.getLogger(__name__)
T = TypeVar("T")
_WRITE_RETRIES = 8


class NotFoundError(CatalogError, KeyError):
    """A run, model or artefact id/URI the catalog does not know."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class Catalog:
    """Lineage catalog on a SQLAlchemy database (``sqlite:///...`` or ``postgresql://...``)."""

    def __init__(self, url: str, project: str = "moeflow", *, migrate_schema: bool = True, echo: bool = False):
        if not project or not isinstance(project, str):
            raise ValueError(f"catalog project name must be a non-empty string, got {project!r}")
        self.url = url
        self.project = project
        self.engine: Engine = make_engine(url, echo=echo)
        if migrate_schema:
            migrate(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._project_id: str | None = None

    @classmethod
    def from_settings(cls, settings=None) -> Catalog:
        from moeflow.platform.settings import get_settings

        settings = settings or get_settings()
        return cls(settings.catalog_db_url, project=settings.project)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Catalog({self.engine.url.render_as_string(hide_password=True)!r}, project={self.project!r})"

    # ------------------------------------------------------------------ plumbing
    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a transaction; retry when a concurrent writer won a unique race."""
        self._ensure_project()
        for attempt in range(_WRITE_RETRIES):
            try:
                with self._sessions.begin() as session:
                    return fn(session)
            except IntegrityError:
                if attempt == _WRITE_RETRIES - 1:
                    raise
                log.debug("catalog write lost a race (attempt %d); retrying", attempt + 1)
            except OperationalError as exc:
                # PostgreSQL deadlock / serialisation failures are safe to retry
                code = getattr(getattr(exc, "orig", None), "sqlstate", None)
                if code not in ("40001", "40P01") or attempt == _WRITE_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _read(self, fn: Callable[[Session], T]) -> T:
        with self._sessions.begin() as session:
            return fn(session)

    def _insert_ignore(self, session: Session, model, values: dict[str, Any], conflict_cols: list[str]) -> None:
        """INSERT ... ON CONFLICT DO NOTHING (the get-or-create primitive)."""
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            stmt = postgresql.insert(model).values(**values).on_conflict_do_nothing(index_elements=conflict_cols)
        elif dialect == "sqlite":
            stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing(index_elements=conflict_cols)
        else:  # generic fallback: a savepoint that may fail on the unique constraint
            try:
                with session.begin_nested():
                    session.add(model(**values))
            except IntegrityError:
                pass
            return
        session.execute(stmt)

    def _ensure_project(self) -> str:
        """Id of this catalog's project row, created on first write.

        Created in its own committed transaction, before the caller's begins (SQLite
        allows one writer: nesting would wait on ourselves), so the cached id never points
        at a row that a rolled-back transaction took away again.
        """
        if self._project_id is None:
            with self._sessions.begin() as own:
                self._insert_ignore(
                    own, Project, {"id": new_id(), "name": self.project, "created_at": utcnow()}, ["name"]
                )
                self._project_id = own.scalar(select(Project.id).where(Project.name == self.project))
        return self._project_id

    def _get_run(self, session: Session, run_id: str) -> Run:
        run = session.get(Run, run_id) if isinstance(run_id, str) else None
        if run is None:
            raise NotFoundError(f"catalog has no run {run_id!r}")
        return run

    # ------------------------------------------------------------------ runs
    def start_run(
        self,
        stage: str,
        config: dict | None = None,
        *,
        pipeline_run_id: str | None = None,
        prefect_flow_run_id: str | None = None,
        mlflow_run_id: str | None = None,
        code_version: str | None = None,
        owner: str | None = None,
    ) -> str:
        """Record a run of ``stage`` as ``running``; returns its id (uuid hex). ``owner`` is the process
        that will finish it (``host:pid:start-time``, this process by default): see ``crashed_runs``."""
        if not stage or not isinstance(stage, str):
            raise ValueError(f"stage must be a non-empty string, got {stage!r}")
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config of stage {stage!r} must be a dict, got {type(config).__name__}")
        config_json = normalize_json(config or {})
        run_id = new_id()

        def write(session: Session) -> str:
            if pipeline_run_id is not None:
                self._get_run(session, pipeline_run_id)
            session.add(
                Run(
                    id=run_id,
                    project_id=self._project_id,
                    stage=stage,
                    status="running",
                    config=config_json,
                    config_hash=hash_config(config_json),
                    code_version=code_version or default_code_version(),
                    started_at=utcnow(),
                    pipeline_run_id=pipeline_run_id,
                    prefect_flow_run_id=_opt_str(prefect_flow_run_id),
                    mlflow_run_id=_opt_str(mlflow_run_id),
                    metrics={},
                    owner=owner or str(this_process()),
                )
            )
            return run_id

        return self._write(write)

    def finish_run(
        self, run_id: str, status: str = "succeeded", error: str | None = None, metrics: dict | None = None
    ) -> None:
        """Mark a run ``succeeded``/``failed``; ``metrics`` are merged into the run's metrics."""
        if status not in RUN_STATUSES or status == "running":
            raise ValueError(f"finish_run status must be one of {RUN_STATUSES[1:]}, got {status!r}")

        def write(session: Session) -> None:
            run = self._get_run(session, run_id)
            run.status = status
            run.ended_at = utcnow()
            run.error = error
            if metrics:
                run.metrics = {**(run.metrics or {}), **normalize_json(metrics)}

        self._write(write)

    def mark_dead_runs_crashed(self) -> list[dict]:
        """Every ``running`` run whose owner process on this host is gone becomes ``crashed`` (with
        the reason as its error); returns those runs as they were. Runs of other hosts, runs without
        an owner and runs of live processes are left alone. Safe to call from several processes:
        each run is re-checked inside the write transaction."""
        def read(session: Session) -> list[tuple[str, str]]:
            query = (select(Run.id, Run.owner).join(Project, Project.id == Run.project_id)
                     .where(Project.name == self.project, Run.status == "running", Run.owner.is_not(None)))
            return list(session.execute(query).all())

        dead = [(run_id, o) for run_id, text in self._read(read)
                if (o := Owner.parse(text)) is not None and is_dead(o)]
        crashed = []
        for run_id, o in dead:
            def write(session: Session, run_id=run_id, o=o) -> dict | None:
                run = self._get_run(session, run_id)
                if run.status != "running":
                    return None  # another process got there first
                before = run_dict(run)
                run.status = "crashed"
                run.ended_at = utcnow()
                run.error = (f"crashed: its process (pid {o.pid} on {o.host}) ended without finishing the run "
                             "(killed, out of memory, or the machine went down)")
                return before

            if (found := self._write(write)) is not None:
                crashed.append(found)
        return crashed

    def set_run_ids(
        self, run_id: str, *, mlflow_run_id: str | None = None, prefect_flow_run_id: str | None = None
    ) -> None:
        """Attach the MLflow / Prefect ids of a run once they are known (None leaves a field as is)."""

        def write(session: Session) -> None:
            run = self._get_run(session, run_id)
            if mlflow_run_id is not None:
                run.mlflow_run_id = str(mlflow_run_id)
            if prefect_flow_run_id is not None:
                run.prefect_flow_run_id = str(prefect_flow_run_id)

        self._write(write)

    def log_run_metrics(self, run_id: str, metrics: dict) -> None:
        """Merge ``metrics`` into a run's metrics before it finishes."""

        def write(session: Session) -> None:
            run = self._get_run(session, run_id)
            run.metrics = {**(run.metrics or {}), **normalize_json(metrics)}

        self._write(write)

    def get_run(self, run_id: str) -> dict:
        def read(session: Session) -> dict:
            run = self._get_run(session, run_id)
            return run_dict(run, self._edges_of(session, [run.id]).get(run.id, {}))

        return self._read(read)

    def list_runs(
        self, limit: int = 100, stage: str | None = None, *, status: str | None = None,
        pipeline_run_id: str | None = None,
    ) -> list[dict]:
        """Newest first; optionally only one stage / status / pipeline's children."""

        def read(session: Session) -> list[dict]:
            query = select(Run).join(Project, Project.id == Run.project_id).where(Project.name == self.project)
            if stage is not None:
                query = query.where(Run.stage == stage)
            if status is not None:
                query = query.where(Run.status == status)
            if pipeline_run_id is not None:
                query = query.where(Run.pipeline_run_id == pipeline_run_id)
            runs = session.scalars(query.order_by(Run.started_at.desc(), Run.id).limit(limit)).all()
            edges = self._edges_of(session, [r.id for r in runs])
            return [run_dict(r, edges.get(r.id, {})) for r in runs]

        return self._read(read)

    def _edges_of(self, session: Session, run_ids: list[str]) -> dict[str, dict[str, list[str]]]:
        out: dict[str, dict[str, list[str]]] = {}
        for chunk in _chunks(run_ids, 500):
            rows = session.execute(
                select(LineageEdge.run_id, LineageEdge.direction, LineageEdge.artifact_uri)
                .where(LineageEdge.run_id.in_(chunk))
                .order_by(LineageEdge.id)
            )
            for run_id, direction, uri in rows:
                out.setdefault(run_id, {}).setdefault(direction + "s", []).append(uri)
        return out

    # ------------------------------------------------------------------ artefacts
    def register_dataset(
        self, name: str, uri: str, content_hash: str, stats: dict | None = None, kind: str = "dataset"
    ) -> str:
        """Register a dataset version at ``uri``; returns its id. Re-registering a URI is idempotent."""
        _check_name(name, "dataset name")
        _check_uri(uri)
        if kind not in DATASET_KINDS:
            raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got {kind!r} for {uri}")
        if not content_hash or not isinstance(content_hash, str):
            raise ValueError(f"content_hash of {uri} must be a non-empty string, got {content_hash!r}")
        stats_json = normalize_json(stats or {})

        def write(session: Session) -> str:
            existing = session.scalar(select(DatasetVersion).where(DatasetVersion.uri == uri))
            if existing is not None:
                if existing.content_hash != content_hash:
                    log.warning("dataset %s re-registered with a new content hash %s (was %s)",
                                uri, content_hash, existing.content_hash)
                existing.content_hash, existing.stats, existing.kind = content_hash, stats_json, kind
                return existing.id
            project_id = self._project_id
            self._insert_ignore(
                session,
                Dataset,
                {"id": new_id(), "project_id": project_id, "name": name, "created_at": utcnow()},
                ["project_id", "name"],
            )
            dataset_id = session.scalar(
                select(Dataset.id).where(Dataset.project_id == project_id, Dataset.name == name)
            )
            version = 1 + (session.scalar(
                select(func.max(DatasetVersion.version)).where(DatasetVersion.dataset_id == dataset_id)
            ) or 0)
            row = DatasetVersion(
                id=new_id(), dataset_id=dataset_id, version=version, uri=uri, content_hash=content_hash,
                kind=kind, stats=stats_json, created_at=utcnow(),
            )
            session.add(row)
            session.flush()  # surface a lost version/URI race here, inside the retry loop
            return row.id

        return self._write(write)

    def register_model(
        self,
        name: str,
        checkpoint_uri: str,
        config_hash: str,
        parent_model_id: str | None = None,
        metrics: dict | None = None,
    ) -> str:
        """Register a model checkpoint; returns its id. Re-registering a URI merges metrics."""
        _check_name(name, "model name")
        _check_uri(checkpoint_uri)
        if not config_hash or not isinstance(config_hash, str):
            raise ValueError(f"config_hash of model {checkpoint_uri} must be a non-empty string")
        metrics_json = normalize_json(metrics or {})

        def write(session: Session) -> str:
            if parent_model_id is not None and session.get(ModelVersion, parent_model_id) is None:
                raise NotFoundError(f"catalog has no model version {parent_model_id!r} (parent of {checkpoint_uri})")
            existing = session.scalar(select(ModelVersion).where(ModelVersion.checkpoint_uri == checkpoint_uri))
            if existing is not None:
                existing.metrics = {**(existing.metrics or {}), **metrics_json}
                return existing.id
            project_id = self._project_id
            version = 1 + (session.scalar(
                select(func.max(ModelVersion.version)).where(
                    ModelVersion.project_id == project_id, ModelVersion.name == name
                )
            ) or 0)
            row = ModelVersion(
                id=new_id(), project_id=project_id, name=name, version=version, checkpoint_uri=checkpoint_uri,
                config_hash=config_hash, parent_id=parent_model_id, metrics=metrics_json, created_at=utcnow(),
            )
            session.add(row)
            session.flush()
            return row.id

        return self._write(write)

    def get_model(self, model_id: str) -> dict:
        def read(session: Session) -> dict:
            row = session.get(ModelVersion, model_id)
            if row is None:
                raise NotFoundError(f"catalog has no model version {model_id!r}")
            return model_dict(row)

        return self._read(read)

    def list_models(self, name: str | None = None, limit: int = 100) -> list[dict]:
        def read(session: Session) -> list[dict]:
            query = select(ModelVersion).join(Project).where(Project.name == self.project)
            if name is not None:
                query = query.where(ModelVersion.name == name)
            rows = session.scalars(query.order_by(ModelVersion.created_at.desc(), ModelVersion.version.desc()).limit(limit))
            return [model_dict(r) for r in rows]

        return self._read(read)

    def list_datasets(self, kind: str | None = None, name: str | None = None, limit: int = 100) -> list[dict]:
        def read(session: Session) -> list[dict]:
            query = (
                select(DatasetVersion, Dataset.name)
                .join(Dataset, Dataset.id == DatasetVersion.dataset_id)
                .join(Project, Project.id == Dataset.project_id)
                .where(Project.name == self.project)
            )
            if kind is not None:
                query = query.where(DatasetVersion.kind == kind)
            if name is not None:
                query = query.where(Dataset.name == name)
            query = query.order_by(DatasetVersion.created_at.desc(), DatasetVersion.version.desc()).limit(limit)
            return [dataset_dict(dv, ds_name) for dv, ds_name in session.execute(query)]

        return self._read(read)

    def get_artifact(self, uri: str) -> dict | None:
        """What the catalog knows about ``uri`` (a registered dataset or model), else None."""
        return self._read(lambda session: self._artifacts(session, [uri]).get(uri))

    def _artifacts(self, session: Session, uris: Iterable[str]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for chunk in _chunks(list(uris), 500):
            for dv, name in session.execute(
                select(DatasetVersion, Dataset.name)
                .join(Dataset, Dataset.id == DatasetVersion.dataset_id)
                .where(DatasetVersion.uri.in_(chunk))
            ):
                out[dv.uri] = dataset_dict(dv, name)
            for mv in session.scalars(select(ModelVersion).where(ModelVersion.checkpoint_uri.in_(chunk))):
                out[mv.checkpoint_uri] = model_dict(mv)
        return out

    # ------------------------------------------------------------------ lineage
    def add_lineage(self, run_id: str, inputs: Iterable[str] = (), outputs: Iterable[str] = ()) -> None:
        """Record ``input -> run`` and ``run -> output`` edges (repeats are ignored)."""
        inputs, outputs = _uri_list(inputs, "inputs"), _uri_list(outputs, "outputs")

        def write(session: Session) -> None:
            self._get_run(session, run_id)
            for direction, uris in (("input", inputs), ("output", outputs)):
                for uri in dict.fromkeys(uris):
                    self._insert_ignore(
                        session,
                        LineageEdge,
                        {"run_id": run_id, "artifact_uri": uri, "direction": direction, "created_at": utcnow()},
                        ["run_id", "artifact_uri", "direction"],
                    )

        self._write(write)

    def upstream(self, uri: str) -> list[dict]:
        """Every artefact and run ``uri`` (or a run id) was derived from, transitively."""
        return self._walk(uri, upstream=True)["nodes"]

    def downstream(self, uri: str) -> list[dict]:
        """Every run that consumed ``uri`` (or a run id) and everything they produced, transitively."""
        return self._walk(uri, upstream=False)["nodes"]

    def lineage(self, uri: str) -> dict:
        """The connected graph around ``uri`` for display: ``{"nodes": [...], "edges": [...]}``.

        Nodes are the start node, its upstream and its downstream (each with ``depth``,
        negative upstream); edges are ``{"source", "target", "direction"}`` with artefact
        URIs and run ids as node keys.
        """
        up, down = self._walk(uri, upstream=True), self._walk(uri, upstream=False)
        start = up["start"]
        nodes = [start] + [{**n, "depth": -n["depth"]} for n in up["nodes"]] + down["nodes"]
        edges = {(e["source"], e["target"], e["direction"]): e for e in up["edges"] + down["edges"]}
        return {"nodes": nodes, "edges": list(edges.values())}

    def _walk(self, start: str, *, upstream: bool) -> dict:
        """Breadth-first walk over the bipartite graph, one query per hop, cycle-safe."""

        def read(session: Session) -> dict:
            start_is_run = "://" not in start and session.get(Run, start) is not None
            seen_runs: dict[str, int] = {start: 0} if start_is_run else {}
            seen_uris: dict[str, int] = {} if start_is_run else {start: 0}
            edges: list[dict] = []
            frontier_runs = [start] if start_is_run else []
            frontier_uris = [] if start_is_run else [start]
            depth = 0
            while frontier_runs or frontier_uris:
                depth += 1
                # artefacts -> runs: upstream = runs that produced them; downstream = runs that read them
                next_runs: list[str] = []
                for run_id, uri in self._edge_rows(session, frontier_uris, by="uri",
                                                   direction="output" if upstream else "input"):
                    edges.append(edge(uri, run_id, uri_is_source=not upstream))
                    if run_id not in seen_runs:
                        seen_runs[run_id] = depth
                        next_runs.append(run_id)
                # runs -> artefacts: upstream = their inputs; downstream = their outputs
                next_uris: list[str] = []
                for run_id, uri in self._edge_rows(session, frontier_runs, by="run",
                                                   direction="input" if upstream else "output"):
                    edges.append(edge(uri, run_id, uri_is_source=upstream))
                    if uri not in seen_uris:
                        seen_uris[uri] = depth
                        next_uris.append(uri)
                frontier_runs, frontier_uris = next_runs, next_uris
            return self._nodes(session, start, start_is_run, seen_runs, seen_uris, edges)

        return self._read(read)

    def _edge_rows(self, session: Session, keys: list[str], *, by: str, direction: str) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []
        column = LineageEdge.artifact_uri if by == "uri" else LineageEdge.run_id
        for chunk in _chunks(keys, 500):
            rows.extend(session.execute(
                select(LineageEdge.run_id, LineageEdge.artifact_uri)
                .where(column.in_(chunk), LineageEdge.direction == direction)
                .order_by(LineageEdge.id)
            ).tuples())
        return rows

    def _nodes(self, session, start, start_is_run, seen_runs, seen_uris, edges) -> dict:
        run_ids = [r for r in seen_runs if not (start_is_run and r == start)]
        uris = [u for u in seen_uris if start_is_run or u != start]
        runs = {}
        for chunk in _chunks(run_ids, 500):
            runs.update({r.id: r for r in session.scalars(select(Run).where(Run.id.in_(chunk)))})
        artefacts = self._artifacts(session, uris + ([] if start_is_run else [start]))
        nodes = [{**run_dict(runs[r]), "type": "run", "depth": seen_runs[r]} for r in run_ids]
        nodes += [artifact_node(u, artefacts.get(u), seen_uris[u]) for u in uris]
        nodes.sort(key=lambda n: (n["depth"], n["type"], n.get("uri") or n.get("id")))
        if start_is_run:
            start_node = {**run_dict(self._get_run(session, start)), "type": "run", "depth": 0}
        else:
            start_node = artifact_node(start, artefacts.get(start), 0)
        return {"start": start_node, "nodes": nodes, "edges": edges}


# ---------------------------------------------------------------------- helpers
def _opt_str(value) -> str | None:
    return None if value is None else str(value)


def _check_name(name, what: str) -> None:
    if not name or not isinstance(name, str):
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")


def _check_uri(uri) -> None:
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"artefact URI must be a non-empty string, got {uri!r}")
    if "://" not in uri:
        raise ValueError(f"artefact URI {uri!r} has no scheme (expected e.g. file:///..., s3://...)")


def _uri_list(uris, what: str) -> list[str]:
    if isinstance(uris, str):
        raise TypeError(f"lineage {what} must be a list of URIs, got the single string {uris!r}")
    uris = list(uris or ())
    for uri in uris:
        _check_uri(uri)
    return uris


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
