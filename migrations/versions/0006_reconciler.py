"""the reconciler: streamed_at only for sweeper streams, its marks, and the indexes it reads

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 15:00:00
"""

from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconciler_marks",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_reconciler_marks")),
    )
    op.drop_index("ix_notifications_unstreamed", table_name="notifications")
    # Ingest no longer marks the rows it streams: streamed_at now says when the scheduler or
    # the reconciler last streamed a row. Every other row was streamed by ingest.
    op.execute(
        "UPDATE notifications SET streamed_at = NULL "
        "WHERE send_at IS NULL AND streamed_at IS NOT NULL"
    )
    op.create_index(
        "ix_notifications_scheduled",
        "notifications",
        ["send_at"],
        postgresql_where=sa.text("streamed_at IS NULL AND send_at IS NOT NULL"),
    )
    op.create_index(
        "ix_notifications_restreamed",
        "notifications",
        ["streamed_at"],
        postgresql_where=sa.text("streamed_at IS NOT NULL"),
    )
    op.create_index(
        "ix_deliveries_external_inflight",
        "deliveries",
        ["id"],
        postgresql_where=sa.text("status = 'pending' AND channel <> 'websocket'"),
    )
    op.create_index("ix_dead_letters_notification_id", "dead_letters", ["notification_id"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_notification_id", table_name="dead_letters")
    op.drop_index("ix_deliveries_external_inflight", table_name="deliveries")
    op.drop_index("ix_notifications_restreamed", table_name="notifications")
    op.drop_index("ix_notifications_scheduled", table_name="notifications")
    op.execute(
        "UPDATE notifications SET streamed_at = created_at WHERE streamed_at IS NULL AND send_at IS NULL"
    )
    op.create_index(
        "ix_notifications_unstreamed",
        "notifications",
        ["created_at"],
        postgresql_where=sa.text("streamed_at IS NULL"),
    )
    op.drop_table("reconciler_marks")
