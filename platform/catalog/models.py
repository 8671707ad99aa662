"""ORM tables of the lineage catalog (SQLAlchemy 2 typed declarative).

The schema is owned by the Alembic migrations in ``migrations/versions``; these classes
must describe exactly the same tables (a test compares them with Alembic's
``compare_metadata``). Unusual choices:

* Every id is a 32-character uuid4 hex string made in Python, so ids are known before
  the insert and are the same on SQLite and PostgreSQL. Lineage edges alone use an
  integer key: nobody refers to an edge by id.
* Lineage is stored by artefact **URI**, not by foreign key to a dataset/model row: a
  stage may read an artefact the catalog never registered (raw corpora) and the graph
  must still connect. Registered artefacts are joined in by URI when the graph is read.
* Constraint names follow a naming convention so migrations can drop/alter them by name
  on both databases.
* Timestamps are timezone-aware UTC, set by Python (SQLite has no ``now()`` with zone).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from moeflow.platform import artifacts as A

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LEN = 32
NAME_LEN = 255
URI_LEN = 1024
HASH_LEN = 128

RUN_STATUSES = ("running", "succeeded", "failed", "crashed")  # crashed: its process died (recovery.py)
DATASET_KINDS = (A.CURATED, A.TOKENIZER, A.TOKENS, A.EXPERT_LOAD, A.CHAT_DATA, A.PREFERENCE_DATA, A.PROMPT_DATA,
                 A.EVAL_RESULTS, A.DEPLOY_DECISION)  # spelled once, in platform/artifacts.py
EDGE_DIRECTIONS = ("input", "output")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Project(Base):
    """A namespace (the MLflow experiment of the same name); one per Catalog instance."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """A named data product (``wiki-curated``); its contents live in versions."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetVersion(Base):
    """One committed artefact of a dataset: curated docs, a tokenizer or token shards."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "version"),)

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    uri: Mapped[str] = mapped_column(String(URI_LEN), unique=True)
    content_hash: Mapped[str] = mapped_column(String(HASH_LEN))
    kind: Mapped[str] = mapped_column(String(32))
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    """A checkpoint of a named model, optionally derived from a parent (SFT from base)."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("project_id", "name", "version"),)

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[int] = mapped_column(Integer)
    checkpoint_uri: Mapped[str] = mapped_column(String(URI_LEN), unique=True)
    config_hash: Mapped[str] = mapped_column(String(HASH_LEN))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"), index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Run(Base):
    """One execution of a stage (or of a whole pipeline, the parent of its stage runs)."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_project_id_started_at", "project_id", "started_at"),)

    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    stage: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config_hash: Mapped[str] = mapped_column(String(HASH_LEN))
    code_version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    pipeline_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), index=True)
    prefect_flow_run_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    owner: Mapped[str | None] = mapped_column(String(255))  # host:pid:start-time (owner.py), None before 0002


class LineageEdge(Base):
    """``artifact_uri -> run`` (direction ``input``) or ``run -> artifact_uri`` (``output``)."""

    __tablename__ = "lineage_edges"
    __table_args__ = (UniqueConstraint("run_id", "artifact_uri", "direction"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    artifact_uri: Mapped[str] = mapped_column(String(URI_LEN), index=True)
    direction: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
