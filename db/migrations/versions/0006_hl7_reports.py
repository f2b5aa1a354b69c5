"""hl7 reports: every report message the RIS sends over MLLP kept, with what became of it (recorded as
verdicts, or unmatched / unreadable / ignored / rejected with the reason)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 12:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "hl7_report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sender", sa.String(length=128), nullable=True),
        sa.Column("control_id", sa.String(length=199), nullable=True),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("finding", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("ack_code", sa.String(length=2), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_hl7_report_state", "hl7_report", ["state"])
    op.create_index("ix_hl7_report_accession", "hl7_report", ["accession_number"])
    op.create_index("ix_hl7_report_control_id", "hl7_report", ["control_id"])


def downgrade() -> None:
    op.drop_index("ix_hl7_report_control_id", table_name="hl7_report")
    op.drop_index("ix_hl7_report_accession", table_name="hl7_report")
    op.drop_index("ix_hl7_report_state", table_name="hl7_report")
    op.drop_table("hl7_report")
