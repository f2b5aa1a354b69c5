"""delivery kinds: one delivery row for every kind of destination (DICOM SR by C-STORE or STOW-RS, HL7 v2
to the RIS, FHIR), its receipt kept whatever the kind

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 09:00:00

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("result_delivery", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="dicom"))
        batch_op.alter_column("destination", existing_type=sa.String(length=128), type_=sa.String(length=512),
                              existing_nullable=False)
        batch_op.alter_column("sr_sop_instance_uid", new_column_name="receipt", existing_type=sa.String(length=64),
                              type_=sa.Text(), existing_nullable=True)
        batch_op.drop_constraint("uq_delivery_study_model_dest", type_="unique")
        batch_op.create_unique_constraint("uq_delivery_study_model_kind_dest",
                                          ["study_id", "model_version", "kind", "destination"])


def downgrade() -> None:
    op.execute("DELETE FROM result_delivery WHERE kind <> 'dicom'")
    with op.batch_alter_table("result_delivery", schema=None) as batch_op:
        batch_op.drop_constraint("uq_delivery_study_model_kind_dest", type_="unique")
        batch_op.create_unique_constraint("uq_delivery_study_model_dest", ["study_id", "model_version", "destination"])
        batch_op.alter_column("receipt", new_column_name="sr_sop_instance_uid", existing_type=sa.Text(),
                              type_=sa.String(length=64), existing_nullable=True)
        batch_op.alter_column("destination", existing_type=sa.String(length=512), type_=sa.String(length=128),
                              existing_nullable=False)
        batch_op.drop_column("kind")
