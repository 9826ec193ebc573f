"""Alembic environment: runs on the engine clara-mail hands over (db.alembic_config)."""

from alembic import context
from sqlalchemy import create_engine

from clara_mailer.store.models import Base
from clara_mailer.store.tables import declare_partial_indexes

config = context.config
declare_partial_indexes()  # the whole schema, for comparisons
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine") or create_engine(
        config.get_main_option("sqlalchemy.url")
    )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
