"""templates and preferences

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 13:52:26.250975
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('templates',
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('locales', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('default_locale', sa.String(length=35), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_templates'))
    )
    op.add_column('deliveries', sa.Column('lang', sa.String(length=35), nullable=True))
    op.add_column('deliveries', sa.Column('deferred_until', sa.DateTime(timezone=True), nullable=True))
    op.add_column('notifications', sa.Column('renditions', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('users', sa.Column('locale', sa.String(length=35), nullable=True))
    op.add_column('users', sa.Column('timezone', sa.String(length=64), nullable=True))
    op.add_column('users', sa.Column('muted', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column('users', sa.Column('quiet_start', sa.Time(), nullable=True))
    op.add_column('users', sa.Column('quiet_end', sa.Time(), nullable=True))


def downgrade() -> None:
    op.drop_column('users', 'quiet_end')
    op.drop_column('users', 'quiet_start')
    op.drop_column('users', 'muted')
    op.drop_column('users', 'timezone')
    op.drop_column('users', 'locale')
    op.drop_column('notifications', 'renditions')
    op.drop_column('deliveries', 'deferred_until')
    op.drop_column('deliveries', 'lang')
    op.drop_table('templates')
