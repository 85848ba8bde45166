"""api keys have scopes

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 16:00:00
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing keys keep every power they had.
    op.add_column(
        "api_keys",
        sa.Column(
            "scopes",
            postgresql.ARRAY(sa.String(length=20)),
            server_default=sa.text("'{send,read,admin}'"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column("api_keys", "scopes")
