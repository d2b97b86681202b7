"""Audit events name their node: the heartbeat name of the process that wrote them
(several nodes append to one chain). Existing events keep an empty node, and their
hashes stay valid (the hash covers the node only when it is not empty).

Revision ID: 0004_audit_node
Revises: 0003_notification_claims
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_audit_node"
down_revision: str | None = "0003_notification_claims"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("node", sa.String(length=300), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("node")
