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
    # Events written since 0004 are hashed with their node: dropping the column would
    # make `audit --verify` report them as tampered, for good. Restore the backup taken
    # before the upgrade instead (docs/operations.md, "Upgrade").
    named = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM audit_events WHERE node <> ''")).scalar()
    if named:
        raise RuntimeError(f"{named} audit events name their node (written since 0004): "
                           "a downgrade would break the audit chain; restore the backup "
                           "taken before the upgrade instead")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("node")
