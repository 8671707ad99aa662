"""Initial catalog schema: projects, datasets and their versions, model versions, runs, lineage edges.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Constraint and index names are spelled out (they follow models.NAMING_CONVENTION) so that
later revisions can refer to them by name on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def _id(name: str = "id", nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(32), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "projects",
        _id(),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_projects"),
        sa.UniqueConstraint("name", name="uq_projects_name"),
    )
    op.create_table(
        "datasets",
        _id(),
        _id("project_id"),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name="fk_datasets_project_id_projects"),
        sa.PrimaryKeyConstraint("id", name="pk_datasets"),
        sa.UniqueConstraint("project_id", "name", name="uq_datasets_project_id_name"),
    )
    op.create_table(
        "dataset_versions",
        _id(),
        _id("dataset_id"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("uri", sa.String(1024), nullable=False),
        sa.Column("content_hash", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name="fk_dataset_versions_dataset_id_datasets"),
        sa.PrimaryKeyConstraint("id", name="pk_dataset_versions"),
        sa.UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_dataset_id_version"),
        sa.UniqueConstraint("uri", name="uq_dataset_versions_uri"),
    )
    op.create_index("ix_dataset_versions_dataset_id", "dataset_versions", ["dataset_id"])

    op.create_table(
        "model_versions",
        _id(),
        _id("project_id"),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("checkpoint_uri", sa.String(1024), nullable=False),
        sa.Column("config_hash", sa.String(128), nullable=False),
        _id("parent_id", nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["model_versions.id"], name="fk_model_versions_parent_id_model_versions"
        ),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name="fk_model_versions_project_id_projects"),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("checkpoint_uri", name="uq_model_versions_checkpoint_uri"),
        sa.UniqueConstraint("project_id", "name", "version", name="uq_model_versions_project_id_name_version"),
    )
    op.create_index("ix_model_versions_parent_id", "model_versions", ["parent_id"])

    op.create_table(
        "runs",
        _id(),
        _id("project_id"),
        sa.Column("stage", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_hash", sa.String(128), nullable=False),
        sa.Column("code_version", sa.String(64), nullable=False),
        sa.Column("started_at", _TS, nullable=False),
        sa.Column("ended_at", _TS, nullable=True),
        _id("pipeline_run_id", nullable=True),
        sa.Column("prefect_flow_run_id", sa.String(64), nullable=True),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["pipeline_run_id"], ["runs.id"], name="fk_runs_pipeline_run_id_runs"),
        sa.ForeignKeyConstraint(["project_id"], ["projects.id"], name="fk_runs_project_id_projects"),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_pipeline_run_id", "runs", ["pipeline_run_id"])
    op.create_index("ix_runs_project_id_started_at", "runs", ["project_id", "started_at"])
    op.create_index("ix_runs_stage", "runs", ["stage"])
    op.create_index("ix_runs_status", "runs", ["status"])

    op.create_table(
        "lineage_edges",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _id("run_id"),
        sa.Column("artifact_uri", sa.String(1024), nullable=False),
        sa.Column("direction", sa.String(8), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_lineage_edges_run_id_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_lineage_edges"),
        sa.UniqueConstraint(
            "run_id", "artifact_uri", "direction", name="uq_lineage_edges_run_id_artifact_uri_direction"
        ),
    )
    op.create_index("ix_lineage_edges_artifact_uri", "lineage_edges", ["artifact_uri"])
    op.create_index("ix_lineage_edges_run_id", "lineage_edges", ["run_id"])


def downgrade() -> None:
    # children before parents (foreign keys); dropping a table drops its indexes
    for table in ("lineage_edges", "runs", "model_versions", "dataset_versions", "datasets", "projects"):
        op.drop_table(table)
