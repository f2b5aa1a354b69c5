"""results side: study date, model versions, result deliveries, audit log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 08:30:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_date", sa.String(length=8), nullable=True))
        batch_op.create_index(batch_op.f("ix_study_study_date"), ["study_date"], unique=False)

    op.create_table(
        "model_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("preprocessing_version", sa.String(length=16), nullable=True),
        sa.Column("card", sa.Text(), nullable=False),
        sa.Column("first_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("version"),
    )
    op.create_table(
        "result_delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("destination", sa.String(length=128), nullable=False),
        sa.Column("state", sa.Enum("PENDING", "SENDING", "SENT", "FAILED", name="delivery_state",
                                   native_enum=False, length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("sr_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "model_version", "destination", name="uq_delivery_study_model_dest"),
    )
    with op.batch_alter_table("result_delivery", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_result_delivery_study_id"), ["study_id"], unique=False)

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=True),
        sa.Column("action", sa.String(length=256), nullable=False),
        sa.Column("params", sa.Text(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("result_count", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_at"), ["at"], unique=False)

    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.create_index("ix_prediction_model_version", ["model_version"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.drop_index("ix_prediction_model_version")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_at"))
    op.drop_table("audit_log")
    with op.batch_alter_table("result_delivery", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_result_delivery_study_id"))
    op.drop_table("result_delivery")
    op.drop_table("model_version")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_study_date"))
        batch_op.drop_column("study_date")
